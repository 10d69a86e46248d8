"""Stage-only destination (`type: files`): data files in a folder, S3 or GCS, the sync point beside them.

Layout under `path`:

    <source>/<stream>/<YYYY>/<MM>/<DD>/<load_id>-<n>.<parquet|jsonl|csv>[.gz]
    <source>/<stream>/_floe_state/v<version:08d>.json
    <source>/<stream>/_floe_state/lease.json

A load writes its data objects first and its state object last. The state object (one per commit,
never overwritten) holds the stream's state, the load id and the files of the load; its existence
is the commit. It is written only if no object of that version exists yet (a conditional write),
so two runs never both commit one version; `lease.json` is the stream's lease (`leases.py`).
Objects left by a load that crashed before its state object are swept when the next load of the
stream has committed (not before: until then another load of that version could still commit):
their load ids sort after the previous commit's (load ids start with the UTC time), so only the
day folders since that commit are listed. `replace` streams keep only
the files of the latest commit. `merge` streams are written as a change log: readers keep, per
primary key, the row with the latest `_floe_loaded_at` (one load writes one row per key: the last
to arrive, as a warehouse merge keeps it).

Every row carries `_floe_load_id` and `_floe_loaded_at`, as in the warehouses.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import SecretStr

from floe.core.destination import (
    CommittedState,
    Destination,
    LoadJob,
    StateChange,
    StateVersion,
    TableSpec,
    state_conflict,
)
from floe.core.errors import DestinationError, LeaseLostError
from floe.core.leases import Holder, Lease, take_object_lease
from floe.core.runs import RunRecord
from floe.core.secrets import redact
from floe.core.settings import DestinationConfig, ExpiringLeaseConfig, local_place
from floe.core.stream import RefreshScope
from floe.destinations.files_layout import (
    EXTENSIONS,
    READERS,
    last_per_key,
    load_id_of,
    own_load_ids,
    quote,
    write_rows,
)
from floe.destinations.run_log import ObjectRunLog
from floe.destinations.state_ops import as_utc
from floe.infra.localstore import LocalStore
from floe.infra.objectstore import GCSStore, ObjectStore, S3Store, StoreUrl

STATE_DIR = "_floe_state"
REFRESH_DIR = "_floe_refresh"  # where a full refresh's objects wait for its commit
LOADS_DIR = "_floe_loads"  # the load log: one object per failed load and per recovery
RUNS_DIR = "_floe_runs"  # the run log: one object per run
log = logging.getLogger("floe.files")
KEEP_STATE_VERSIONS = 50


class FilesConfig(DestinationConfig, ExpiringLeaseConfig):
    type: str = "files"
    path: str  # s3://bucket/prefix | gs://bucket/prefix | a folder
    format: Literal["parquet", "jsonl", "csv"] = "parquet"
    gzip: bool = False  # jsonl/csv only (Parquet is compressed with zstd inside)
    region: str | None = None  # S3
    endpoint_url: str | None = None  # S3-compatible endpoint
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    project: str | None = None  # GCS

    def places(self, base: Path) -> list[str]:
        if "://" in self.path:
            return [f"files under {self.path.rstrip('/')}"]
        return [f"files under {local_place(base, self.path)}"]


@contextmanager
def failing_as(what: str) -> Iterator[None]:
    """An error other than a DestinationError becomes one: `what`, then the cause."""
    try:
        yield
    except DestinationError:
        raise
    except Exception as exc:
        raise DestinationError(f"{what}: {exc}") from exc


class FilesDestination(Destination):
    Config: ClassVar[type[FilesConfig]] = FilesConfig

    def __init__(self, name: str, config: Any, context: Any = None) -> None:
        super().__init__(name, config, context)
        self.where = f"destinations.{name}"
        try:
            self.url = StoreUrl.parse(config.path)
        except ValueError as exc:
            raise DestinationError(f"{self.where}.path: {exc}") from None
        self._store: ObjectStore | None = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            c = self.config
            if self.url.scheme == "s3":
                secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
                self._store = S3Store.connect(self.url, f"{self.where}.path", c.region, c.endpoint_url,
                                              secret(c.aws_access_key_id), secret(c.aws_secret_access_key))
            elif self.url.scheme == "gs":
                self._store = GCSStore.connect(self.url, f"{self.where}.path", c.project)
            else:
                self._store = LocalStore(self.context.path(self.url.prefix))
        return self._store

    def key(self, *parts: str) -> str:
        return self.url.key(*parts) if self.url.scheme != "file" else "/".join(p.strip("/") for p in parts if p)

    # --- state ----------------------------------------------------------------------------------
    def _versions(self, source: str, stream: str) -> list[tuple[int, str]]:
        prefix = self.key(source, stream, STATE_DIR) + "/"
        found = []
        for key, _ in self.store.list(prefix):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
                found.append((int(name[1:-5]), key))
        return sorted(found)

    def _latest(self, source: str, stream: str) -> dict[str, Any] | None:
        versions = self._versions(source, stream)
        if not versions:
            return None
        data = self.store.get_bytes(versions[-1][1])
        return json.loads(data) if data else None

    def read_state(self, source: str, stream: str) -> CommittedState:
        latest = self._latest(source, stream)
        return CommittedState(latest["version"], latest["state"]) if latest else CommittedState()

    def try_lease(self, source: str, stream: str) -> Lease | Holder:
        return take_object_lease(self.store, self.key(source, stream, STATE_DIR, "lease.json"),
                                 self.lease_name(source, stream), self.config.lease_expiry_seconds)

    def states(self) -> list[dict[str, Any]]:
        out = []
        root = f"{self.url.prefix}/" if self.url.scheme != "file" and self.url.prefix else ""
        for key, _ in self.store.list(root):
            parts = key.split("/")
            if len(parts) >= 3 and parts[-2] == STATE_DIR:
                out.append((parts[-4], parts[-3]))
        rows = []
        for source, stream in sorted(set(out)):
            latest = self._latest(source, stream)
            if latest:
                rows.append({"source": source, "stream": stream, "version": latest["version"],
                             "state": latest["state"], "load_id": latest["load_id"],
                             "committed_at": latest["committed_at"]})
        return rows

    # --- data -----------------------------------------------------------------------------------
    def _sweep(self, job: LoadJob, latest: dict[str, Any] | None, committed: set[str]) -> None:
        """Delete data objects no commit owns: those of crashed loads, and what a snapshot (a replace
        stream's commit, a full refresh) replaced.

        Only objects from the second of `latest`'s commit onwards are candidates (load ids start with
        the UTC time); among them, those of a load id in `committed` (recent commits) stay."""
        base = self.key(job.source, job.stream)
        snapshot = latest is not None and (job.table.disposition == "replace" or latest.get("full_refresh", False)
                                           or latest.get("snapshot", False))
        keep = set(latest["files"]) if latest and snapshot else None
        if latest is None or keep is not None:
            prefixes = [base + "/"]
        else:
            day = datetime.strptime(latest["load_id"][:8], "%Y%m%d").replace(tzinfo=UTC)
            prefixes = []
            while day.date() <= datetime.now(UTC).date():
                prefixes.append(f"{base}/{day:%Y/%m/%d}/")
                day += timedelta(days=1)
        since = latest["load_id"][:16] if latest else ""
        doomed = []
        for prefix in prefixes:
            for key, _ in self.store.list(prefix):
                if not self._is_data(key):
                    continue
                load_id = key.rsplit("/", 1)[-1].rsplit("-", 1)[0]
                if keep is not None:
                    if key not in keep and load_id not in committed:
                        doomed.append(key)
                elif load_id >= since and load_id not in committed:
                    doomed.append(key)
        for start in range(0, len(doomed), 1000):
            self.store.delete_keys(doomed[start : start + 1000])

    def _write(self, table: pa.Table, path: Path) -> None:
        write_rows(table, path, self.config.format, self.config.gzip)

    def load(self, job: LoadJob) -> None:
        with failing_as(f"{self.name}: writing {job.source}.{job.stream} failed, nothing committed"):
            self._load(job)

    def _load(self, job: LoadJob) -> None:
        versions, latest = self._base(job)
        recent = latest["recent_load_ids"] if latest else []
        now = datetime.now(UTC)
        keys: list[str] = []
        with tempfile.TemporaryDirectory(prefix="floe-files-") as tmp:
            uploads = []
            tables: Iterable[pa.Table] = (pq.read_table(staged.path) for staged in job.files)
            if job.table.disposition == "merge" and job.table.primary_key:
                tables = last_per_key(list(tables), job.table.primary_key)
            for n, table in enumerate(tables, start=1):
                table = table.append_column("_floe_load_id", pa.array([job.load_id] * table.num_rows, pa.string()))
                table = table.append_column("_floe_loaded_at", pa.array([now] * table.num_rows,
                                                                        pa.timestamp("us", "UTC")))
                local = Path(tmp) / f"{job.load_id}-{n:05d}.{self.extension}"
                self._write(table, local)
                # A full refresh's objects wait where readers do not look until finish_refresh.
                folder = REFRESH_DIR if job.refresh else f"{now:%Y/%m/%d}"
                key = self.key(job.source, job.stream, folder, local.name)
                uploads.append((key, local))
                keys.append(key)
            self.store.put_files(uploads)
        if job.refresh:  # no state object: finish_refresh commits the refresh
            return
        snapshot = job.replaces is not None  # a backfill: the new objects and every row outside its range
        kept: list[str] = []
        if job.replaces is not None:
            self._sweep(job, latest, {*recent, job.load_id})  # crashed loads' objects, before the kept ones are listed
            kept = self._rows_outside(job, job.replaces, first=len(keys) + 1)
            keys += [key for key in kept if load_id_of(key) == job.load_id]  # rewritten here: deleted on a conflict
            recent = list(dict.fromkeys(load_id_of(key) for key in kept if load_id_of(key) != job.load_id))
        version = (latest["version"] if latest else 0) + 1
        record = {
            "version": version, "state": job.checkpoint, "load_id": job.load_id, "files": keys, "rows": job.rows,
            "format": self.config.format, "disposition": job.table.disposition,
            "primary_key": list(job.table.primary_key), "started_at": job.started_at.isoformat(),
            "committed_at": datetime.now(UTC).isoformat(), "details": job.details, "run_id": job.run_id,
            "recent_load_ids": [*recent, job.load_id][-KEEP_STATE_VERSIONS:],
        }
        if snapshot:
            record["files"] = list(dict.fromkeys([*keys, *kept]))
            record["snapshot"] = True
        state_key = self._commit(job, record, keys)
        # Only now, committed: the objects of another load of this version (a run that lost its lease)
        # may be deleted, as that load can no longer commit.
        if job.table.disposition == "replace" or snapshot:
            self._sweep(job, record, {job.load_id})
        else:
            self._sweep(job, latest, {*recent, job.load_id})
        old = [*versions, (version, state_key)][:-KEEP_STATE_VERSIONS]
        self.store.delete_keys([key for _, key in old])

    def _base(self, job: LoadJob) -> tuple[list[tuple[int, str]], dict[str, Any] | None]:
        """The stream's state versions and latest state record; StateConflictError if that is not the
        version the job builds on."""
        versions = self._versions(job.source, job.stream)
        latest = json.loads(self.store.get_bytes(versions[-1][1]) or b"null") if versions else None
        if job.base_version is not None and (latest["version"] if latest else 0) != job.base_version:
            raise state_conflict(self.name, job, latest["version"] if latest else 0)
        if latest and latest.get("pending_deletes"):  # a state change committed, its deletes cut short
            self._delete(latest["pending_deletes"])
        return versions, latest

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            self.store.delete_keys(keys[start : start + 1000])

    # --- the run log: `_floe_runs/<run id>.json` at the top of the path -------------------------
    def record_run(self, run: RunRecord) -> None:
        ObjectRunLog(self.store, self.key(RUNS_DIR)).record(run)

    def runs(self, limit: int = 20) -> list[RunRecord]:
        return ObjectRunLog(self.store, self.key(RUNS_DIR)).last(limit)

    # --- the load log: failures and recoveries (a commit is its state object) ---------------------
    def _log_load(self, job: LoadJob, status: str, error: str | None) -> None:
        record = {"load_id": job.load_id, "run_id": job.run_id, "status": status, "error": error,
                  "started_at": job.started_at.isoformat(), "finished_at": datetime.now(UTC).isoformat()}
        name = f"{job.started_at.astimezone(UTC):%Y%m%dT%H%M%S%f}-{job.load_id}.json"
        self.store.put_bytes(self.key(job.source, job.stream, LOADS_DIR, name), json.dumps(record).encode())

    def record_failure(self, job: LoadJob, error: str) -> None:
        try:
            self._log_load(job, "failed", redact(error)[:4000])
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never hide the original error
            log.warning("event=files_record_failure_failed destination=%s error=%s", self.name, redact(str(exc)))

    def record_recovery(self, job: LoadJob) -> None:
        self._log_load(job, "recovered", None)

    def last_load_status(self, source: str, stream: str, before: datetime) -> str | None:
        entries = [json.loads(self.store.get_bytes(key) or b"{}")
                   for key, _ in self.store.list(self.key(source, stream, LOADS_DIR) + "/")]
        earlier = [e for e in entries if e.get("started_at") and datetime.fromisoformat(e["started_at"]) < before]
        return str(max(earlier, key=lambda e: e["finished_at"])["status"]) if earlier else None

    # --- state log and changes: the state object commits, the data objects of the undone loads go next ---
    def state_log(self, source: str, stream: str, limit: int | None = None) -> list[StateVersion]:
        out = []
        for _, key in reversed(self._versions(source, stream)[-limit:] if limit else self._versions(source, stream)):
            record = json.loads(self.store.get_bytes(key) or b"{}")
            details = record.get("details") or {}
            action = details.get("action") or ("full refresh" if record.get("full_refresh") else
                                               "backfill" if details.get("backfill") else "load")
            out.append(StateVersion(record["version"], as_utc(record.get("committed_at")), record["load_id"],
                                    record.get("rows"), record.get("state"), action, details))
        return out

    def change_state(self, change: StateChange) -> int:
        with failing_as(f"{self.name}: {change.action} of {change.source}.{change.stream} failed, nothing changed"):
            return self._change_state(change)

    def _change_state(self, change: StateChange) -> int:
        """Write the change's state object listing the data objects it deletes (`pending_deletes`: the
        next load deletes them too, should this be cut short), then delete them."""
        probe = change.job(0)
        versions, latest = self._base(probe)
        records = [json.loads(self.store.get_bytes(key) or b"{}") for _, key in versions]
        data = [key for key, _ in self.store.list(self.key(change.source, change.stream) + "/") if self._is_data(key)]
        if change.delete_after is None:
            doomed: list[str] = []
        elif change.delete_after == 0:
            doomed = data
        else:
            kept = [r for r in records if r["version"] <= change.delete_after]
            undone = {i for r in records if r["version"] > change.delete_after for i in own_load_ids(r)}
            undone -= {i for r in kept for i in own_load_ids(r)}
            since = kept[-1]["load_id"][:16] if kept else ""
            doomed = [key for key in data if (i := load_id_of(key)) in undone and i[:16] >= since]
        job = change.job(self._count_rows(doomed))
        gone = {load_id_of(key) for key in doomed}
        recent = [i for i in (latest["recent_load_ids"] if latest else []) if i not in gone]
        version = (latest["version"] if latest else 0) + 1
        record = {
            "version": version, "state": change.state, "load_id": change.change_id, "files": [], "rows": 0,
            "format": self.config.format, "disposition": change.table.disposition,
            "primary_key": list(change.table.primary_key), "started_at": job.started_at.isoformat(),
            "committed_at": datetime.now(UTC).isoformat(), "details": job.details, "run_id": job.run_id,
            "recent_load_ids": [*recent, change.change_id][-KEEP_STATE_VERSIONS:], "pending_deletes": doomed,
        }
        state_key = self._commit(job, record, [])
        self._delete(doomed)
        self._delete([key for _, key in [*versions, (version, state_key)][:-KEEP_STATE_VERSIONS]])
        return int(job.details["deleted_rows"])

    def _count_rows(self, keys: list[str]) -> int:
        reader = READERS[self.config.format]
        total = 0
        con = duckdb.connect()
        try:
            with tempfile.TemporaryDirectory(prefix="floe-files-") as tmp:
                for n, key in enumerate(keys):
                    local = Path(tmp) / f"{n}.{self.extension}"
                    local.write_bytes(self.store.get_bytes(key) or b"")
                    path = str(local).replace("'", "''")
                    total += int(con.execute(f"SELECT count(*) FROM {reader}('{path}')").fetchall()[0][0])
                    local.unlink()
        finally:
            con.close()
        return total

    def _commit(self, job: LoadJob, record: dict[str, Any], written: list[str]) -> str:
        """Write the state object of `record`'s version (the commit) unless another run wrote one first:
        then delete `written` (this load's own objects) and raise StateConflictError. Its key."""
        state_key = self.key(job.source, job.stream, STATE_DIR, f"v{record['version']:08d}.json")
        try:
            job.check_lease()
        except LeaseLostError:
            self.store.delete_keys(written)
            raise
        if self.store.put_if_absent(state_key, json.dumps(record, indent=1, sort_keys=True).encode()) is None:
            existing = json.loads(self.store.get_bytes(state_key) or b"{}")
            if existing.get("load_id") != job.load_id:  # not a retried write of this very commit
                self.store.delete_keys(written)
                raise state_conflict(self.name, job, record["version"])
        return state_key

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.config.format] + (".gz" if self.config.gzip and self.config.format != "parquet" else "")

    def _is_data(self, key: str) -> bool:
        """A data object in the stream's layout (not a state object, not a refresh's waiting object)."""
        return all(f"/{folder}/" not in f"/{key}" for folder in (STATE_DIR, REFRESH_DIR, LOADS_DIR))

    # --- full refresh: objects wait under _floe_refresh/, one snapshot state object commits them ------
    def begin_refresh(self, table: TableSpec) -> None:
        self.store.delete_prefix(self.key(table.schema_name, table.table, REFRESH_DIR) + "/")

    def finish_refresh(self, job: LoadJob, scope: RefreshScope | None = None) -> None:
        with failing_as(f"{self.name}: replacing {job.source}.{job.stream} by its full refresh failed, "
                        "nothing committed"):
            self._finish_refresh(job, scope)

    def _finish_refresh(self, job: LoadJob, scope: RefreshScope | None) -> None:
        """Move the refresh's objects into the layout, write the snapshot state object listing them (and,
        with a scope, the rows before it), then delete every other object of the stream."""
        versions, latest = self._base(job)
        self._sweep(job, latest, set(latest["recent_load_ids"] if latest else []))  # crashed loads' objects
        moves = []
        for key, _ in self.store.list(self.key(job.source, job.stream, REFRESH_DIR) + "/"):
            name = key.rsplit("/", 1)[-1]
            day = f"{name[:4]}/{name[4:6]}/{name[6:8]}"  # the day of its load id
            moves.append((key, self.key(job.source, job.stream, day, name)))
        keys = [target for _, target in moves]
        if scope is not None:
            keys += self._rows_outside(job, scope)
        self.store.move_keys(moves)
        version = (versions[-1][0] if versions else 0) + 1
        load_ids = list(dict.fromkeys(k.rsplit("/", 1)[-1].rsplit("-", 1)[0] for k in keys))
        record = {
            "version": version, "state": job.checkpoint, "load_id": job.load_id, "files": keys, "rows": job.rows,
            "format": self.config.format, "disposition": job.table.disposition, "full_refresh": True,
            "primary_key": list(job.table.primary_key), "started_at": job.started_at.isoformat(),
            "committed_at": datetime.now(UTC).isoformat(), "details": job.details, "run_id": job.run_id,
            "recent_load_ids": [*load_ids, job.load_id][-KEEP_STATE_VERSIONS:],
        }
        written = [k for k in keys if k.rsplit("/", 1)[-1].startswith(job.load_id)] + [t for _, t in moves]
        state_key = self._commit(job, record, written)
        self._sweep(job, record, {job.load_id})
        old = [*versions, (version, state_key)][:-KEEP_STATE_VERSIONS]
        self.store.delete_keys([key for _, key in old])

    def _rows_outside(self, job: LoadJob, scope: RefreshScope, first: int = 1) -> list[str]:
        """The objects holding the stream's rows outside `scope`: those wholly outside it as they are,
        and for each object that straddles it a new object (of this load, numbered from `first`) with
        its rows outside it."""
        kept: list[str] = []
        reader = READERS[self.config.format]
        column = quote(scope.column)
        inside = f"{column} >= $start" + (f" AND {column} < $end" if scope.end is not None else "")
        before = f"NOT ({inside}) OR {column} IS NULL"
        bounds = {"start": scope.start, **({"end": scope.end} if scope.end is not None else {})}
        con = duckdb.connect()
        try:
            con.execute("SET TimeZone = 'UTC'")
            with tempfile.TemporaryDirectory(prefix="floe-files-") as tmp:
                for key, _ in list(self.store.list(self.key(job.source, job.stream) + "/")):
                    if not self._is_data(key) or load_id_of(key) == job.load_id:  # this load's own: in scope
                        continue
                    local = Path(tmp) / key.rsplit("/", 1)[-1]
                    local.write_bytes(self.store.get_bytes(key) or b"")
                    rows = f"{reader}('{str(local).replace(chr(39), chr(39) * 2)}')"
                    total, kept_rows = con.execute(f"SELECT count(*), count(*) FILTER (WHERE {before}) FROM {rows}",
                                                   bounds).fetchall()[0]
                    if kept_rows == total:
                        kept.append(key)
                    elif kept_rows:
                        part = con.sql(f"SELECT * FROM {rows} WHERE {before}", params=bounds)
                        out = Path(tmp) / f"{job.load_id}-{first + len(kept):05d}.{self.extension}"
                        self._write(part.to_arrow_table(), out)
                        kept.append(self.key(job.source, job.stream, f"{datetime.now(UTC):%Y/%m/%d}", out.name))
                        self.store.put_file(kept[-1], out)
                    local.unlink()
        finally:
            con.close()
        return kept

    def check(self) -> list[str]:
        return [self.store.check()]
