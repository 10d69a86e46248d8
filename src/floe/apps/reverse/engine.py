"""Running one sync: check the mapping, diff in the warehouse, send changed rows, record outcomes.

1. Pendo's metadata schema is read and every mapped field checked (exists, type fits the column);
   the key column must be unique and non-null. Any problem: an error, nothing sent.
2. The diff query (see `store.diff_sql`) streams the changed rows as Arrow batches.
3. Rows become requests of at most `batch_rows` records and `batch_bytes` JSON bytes, sent
   concurrently (at most `concurrency` in flight; floe.infra.http retries 429/5xx honouring Retry-After).
   A 408 (the call ran past Pendo's time limit) splits the request in two and sends both halves.
4. Per-row outcomes: ids in `missing` and ids named in `errors` are failures; the rest of a request
   is accepted. Accepted (key, hash) pairs and failures are staged as Parquet and committed to the
   warehouse every `COMMIT_ROWS` accepted rows and at the end; the final commit writes the
   `_floe_loads` row. What Pendo accepted is committed also when the run stops on an error.
5. With `deletes: clear`, keys in the snapshot that the rows no longer hold are counted before
   anything is sent (above `max_deletes` the run stops unless forced), then, after the updates, sent
   with every field floe last set for them as null; a key leaves the snapshot in the commit that
   records Pendo's answer (a key Pendo no longer knows has nothing to clear and leaves it too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from floe.apps.reverse import store
from floe.apps.reverse.config import SyncConfig
from floe.apps.reverse.outcomes import Piece, RunOutcomes, SyncError, SyncLoad, SyncResult
from floe.apps.reverse.pendo import PENDO_TYPES, Outcome, PendoClient
from floe.apps.reverse.values import compatible, convert
from floe.config import FloeConfig
from floe.core.destination import RowReader, StagedFile
from floe.core.errors import ConfigError, FloeError
from floe.core.secrets import redact
from floe.destinations.sql import SqlDestination
from floe.infra.http import ApiError
from floe.infra.stage import new_load_id, remove_files
from floe.infra.threads import in_thread

log = logging.getLogger("floe.sync")
READ_BATCH_ROWS = 20_000
COMMIT_ROWS = 100_000  # accepted rows committed to the snapshot together (bounds the warehouse's work)
DRY_RUN_KEYS = 100  # keys a dry run lists that it would clear


def read_destination(config: FloeConfig, name: str, sync: SyncConfig) -> SqlDestination:
    from floe.engine.factory import context_for, make_destination

    if sync.source not in config.destinations:
        known = ", ".join(config.destinations) or "none"
        raise ConfigError(f"syncs.{name}.from: no destination named {sync.source!r} (configured: {known})")
    dest = make_destination(config, sync.source, context_for(config))
    if not isinstance(dest, SqlDestination) or not isinstance(dest, RowReader):
        dest.close()
        raise ConfigError(f"syncs.{name}.from: destination {sync.source!r} cannot be read as a source of rows")
    return dest


def _first(batches: Iterator[pa.RecordBatch]) -> pa.RecordBatch:
    try:
        return next(batches)
    finally:
        batches.close()  # type: ignore[attr-defined]


class SyncRun:
    """One run of one sync against an open destination and Pendo client."""

    def __init__(self, name: str, sync: SyncConfig, dest: SqlDestination, client: PendoClient, stage: Path,
                 *, dry_run: bool = False, full: bool = False, force: bool = False) -> None:
        self.name, self.sync, self.dest, self.client, self.stage = name, sync, dest, client, stage
        self.dry_run, self.full, self.force = dry_run, full, force
        target = sync.to
        self.result = SyncResult(name, f"pendo {target.kind}/{target.group}", dry_run=dry_run,
                                 clears=sync.deletes == "clear")
        self.lineage = False  # the rows carry a _floe_load_id column (see check)
        self.columns = list(sync.fields)
        self.names = [sync.fields[c] for c in self.columns]
        self.types: list[str] = []
        self.where = f"syncs.{name}"

    def read(self, sql: str, batch_size: int = 50_000) -> Iterator[pa.RecordBatch]:
        """Stream a query's rows. No parameters, ever: a `%` in the user's query must reach drivers
        like psycopg untouched."""
        return cast(RowReader, self.dest).read_batches(sql, batch_size=batch_size)

    # --- checks ------------------------------------------------------------------------------
    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a small query (read like any other: see `read`)."""
        try:
            batch = _first(self.read(sql))
            return list(zip(*(c.to_pylist() for c in batch.columns), strict=True))
        except FloeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the warehouse's own message says what is wrong
            raise SyncError(f"{self.where}: query on {self.sync.source!r} failed: "
                            f"{redact(str(exc)).strip().splitlines()[0]}") from None

    def _probe(self) -> pa.Schema:
        relation = self.sync.relation(self.dest.quote)
        try:
            return _first(self.read(f"SELECT * FROM {relation} AS src LIMIT 0")).schema
        except FloeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SyncError(f"{self.where}.{'query' if self.sync.query else 'table'}: cannot read rows from "
                            f"{self.sync.source!r}: {redact(str(exc)).strip().splitlines()[0]}") from None

    async def check(self) -> None:
        """Raise SyncError naming every problem with the mapping; nothing has been sent yet."""
        target = self.sync.to
        pendo = (await self.client.schema()).get(target.group, {})
        columns = await in_thread(self._probe)
        known = {f.name: f for f in columns}
        problems = []
        for column in [self.sync.key_column, *self.columns]:
            if column not in known:
                where = "key" if column == self.sync.key_column else f"fields.{column}"
                problems.append(f"{where}: no column {column!r} in the rows (columns: {', '.join(known)})")
        for column, name in self.sync.fields.items():
            kind = pendo.get(name)
            if name not in pendo:
                problems.append(f"fields.{column}: Pendo has no {target.kind} {target.group} field {name!r} "
                                f"(fields: {', '.join(sorted(pendo)) or 'none'}; create it in Data Mappings)")
            elif kind not in PENDO_TYPES:
                said = "no type" if kind is None else f"the type {kind!r}, which floe does not know,"
                self.warn(f"fields.{column}: Pendo's metadata schema gives {said} for {target.kind} {target.group} "
                          f"field {name!r}; its values are sent without a type check")
            elif column in known and not compatible(known[column].type, kind):
                hint = (" (text holding numbers, e.g. a PostgreSQL numeric without precision: cast it in the "
                        "query)" if pa.types.is_string(known[column].type) else "")
                problems.append(f"fields.{column}: column type {known[column].type} does not fit Pendo "
                                f"{target.kind} {target.group} field {name!r} of type {kind}{hint}")
        if problems:
            raise SyncError(f"{self.where}: mapping does not match Pendo's metadata schema, nothing sent: "
                            + "; ".join(problems))
        self.types = [pendo[n] or "" for n in self.names]
        self.lineage = store.LOAD_ID in known
        key = self.dest.quote(self.sync.key_column)
        total, non_null, distinct = (await in_thread(
            self._query, f"SELECT COUNT(*), COUNT(src.{key}), COUNT(DISTINCT src.{key}) "
                         f"FROM {self.sync.relation(self.dest.quote)} AS src"))[0]
        if non_null != total:
            raise SyncError(f"{self.where}.key: {total - non_null} rows have a NULL {self.sync.key_column}, "
                            "nothing sent")
        if distinct != total:
            raise SyncError(f"{self.where}.key: {self.sync.key_column} is not unique ({total - distinct} "
                            "duplicate rows), nothing sent")

    # --- rows -> requests ----------------------------------------------------------------------
    def signature(self) -> str:
        t = self.sync.to
        return f"{t.kind}/{t.group}/{self.sync.key_column}/" + ",".join(
            f"{c}={n}" for c, n in self.sync.fields.items())

    def pieces(self, batch: pa.RecordBatch) -> Iterator[Piece]:
        """The batch as requests capped by rows, then halved until each fits `batch_bytes`."""
        target = self.sync.to
        keys, hashes = batch.column(store.KEY), batch.column(store.HASH)
        values = [convert(batch.column(store.value_alias(i)), t) for i, t in enumerate(self.types)]
        # Arrow builds the {id, values} dicts in C++ (about twice as fast as a Python comprehension).
        records = pa.StructArray.from_arrays(
            [keys, pa.StructArray.from_arrays(values, names=self.names)], names=[target.id_field, "values"]
        ).to_pylist()
        sent = pa.array([orjson.dumps(r["values"]).decode() for r in records], pa.string())
        load_ids = batch.column(store.LINEAGE) if self.lineage else pa.nulls(len(records), pa.string())
        rows = pa.RecordBatch.from_arrays([keys, hashes, sent, load_ids], names=["key", "hash", "sent", "load_ids"])
        yield from self._capped(records, rows)

    def clear_pieces(self, batch: pa.RecordBatch) -> Iterator[Piece]:
        """Keys gone from the rows as requests setting every field floe last sent them to null."""
        keys, id_field = batch.column(store.KEY), self.sync.to.id_field
        records = [{id_field: key, "values": dict.fromkeys(orjson.loads(sent) if sent else self.names)}
                   for key, sent in zip(keys.to_pylist(), batch.column("sent").to_pylist(), strict=True)]
        yield from self._capped(records, pa.RecordBatch.from_arrays([keys], names=["key"]), clear=True)

    def _capped(self, records: list[dict[str, Any]], rows: pa.RecordBatch, clear: bool = False) -> Iterator[Piece]:
        size = self.sync.to.batch_rows
        for start in range(0, len(records), size):
            yield from self._fit(Piece(records[start:start + size], rows.slice(start, size), clear))

    def _fit(self, piece: Piece) -> Iterator[Piece]:
        if len(piece.records) > 1 and len(orjson.dumps(piece.records)) > self.sync.to.batch_bytes:
            for half in piece.split():
                yield from self._fit(half)
        else:
            yield piece

    # --- sending -----------------------------------------------------------------------------
    async def send(self, piece: Piece, outcomes: RunOutcomes) -> None:
        body = orjson.dumps(piece.records)
        self.result.requests += 1
        try:
            outcome = await self.client.update(body, create=self.sync.mode == "upsert" and not piece.clear)
        except ApiError as exc:
            if exc.status != 408:
                raise
            if len(piece.records) == 1:
                self._record(piece, Outcome(errors={piece.records[0][self.sync.to.id_field]:
                                                    "Pendo timed out (408) on this single record"}), outcomes)
                return
            self.result.splits += 1
            log.info("event=sync_split sync=%s rows=%d reason=408", self.name, len(piece.records))
            first, second = piece.split()
            await asyncio.gather(self.send(first, outcomes), self.send(second, outcomes))
            return
        self._record(piece, outcome, outcomes)

    def _record(self, piece: Piece, outcome: Outcome, outcomes: RunOutcomes) -> None:
        r = self.result
        failures: dict[str, tuple[str, str]] = {} if piece.clear else {  # nothing to clear on a missing id
            m: ("missing", f"no such Pendo {self.sync.to.kind}") for m in outcome.missing}
        prefix = "clearing its fields: " if piece.clear else ""
        failures.update({rid: ("error", prefix + message) for rid, message in outcome.errors.items()})
        if outcome.unattributed:  # Pendo failed rows without naming them: none of the rest is confirmed
            message = prefix + "unconfirmed: " + "; ".join(outcome.unattributed)[:900]
            for rid in piece.keys.to_pylist():
                failures.setdefault(rid, ("error", message))
        good = piece.rows
        rows: list[tuple[str, str, str]] = []
        if failures:
            bad = pc.is_in(piece.keys, value_set=pa.array(list(failures), pa.string()))
            good = piece.rows.filter(pc.invert(bad))
            rows = [(k, *failures[k]) for k in piece.keys.filter(bad).to_pylist()]
            outcomes.fail(rows)
        if piece.clear:
            r.cleared += good.num_rows
            r.clear_errors += len(rows)
            outcomes.gone(good.column("key"))
            return
        r.sent += len(piece.records)
        r.updated += outcome.updated
        r.missing += sum(1 for row in rows if row[1] == "missing")
        r.errors += sum(1 for row in rows if row[1] == "error")
        outcomes.accept(good)

    # --- the run ----------------------------------------------------------------------------
    async def run(self) -> SyncResult:
        started, r = time.monotonic(), self.result
        self.started_at, self.load_id = datetime.now(UTC), new_load_id()
        outcomes = RunOutcomes(self.stage, self.name, self.load_id)
        failure: BaseException | None = None
        checked = False
        try:
            await self.check()
            checked = True
            if self.dry_run:
                exists = await in_thread(store.snapshot_exists, self.dest)
            else:
                await in_thread(store.ensure_tables, self.dest)
                exists = True
            relation = self.sync.relation(self.dest.quote)
            gone = self.sync.deletes == "clear" and exists and await self._count_gone(relation)
            sql = store.diff_sql(self.dest, self.name, relation, self.sync.key_column, self.columns,
                                 self.signature(), full=self.full, snapshot_exists=exists, lineage=self.lineage)
            failure = await self._stream(sql, outcomes)
            if failure is None and gone:
                failure = await self._stream(store.gone_sql(self.dest, self.name, relation, self.sync.key_column),
                                             outcomes, clear=True)
            if failure is None and not self.dry_run:
                failure = await self._rejected_all()
        except Exception as exc:  # noqa: BLE001 - reported in the result; other syncs go on
            failure = exc
        finally:
            r.retries = self.client.http.metrics.retries
            if failure is not None:
                r.error = redact(str(failure)) if isinstance(failure, FloeError) else redact(
                    f"{type(failure).__name__}: {failure}")
            if self.dry_run or not checked:
                outcomes.abort()
            else:
                await in_thread(self._commit, *outcomes.files(), outcomes.committed, True)
        r.seconds = time.monotonic() - started
        return r

    async def _count_gone(self, relation: str) -> int:
        """How many synced keys the rows no longer hold; raises SyncError (nothing sent) above
        `max_deletes` unless forced (a dry run warns instead)."""
        sql = store.gone_sql(self.dest, self.name, relation, self.sync.key_column)
        gone = (await in_thread(self._query, f"SELECT COUNT(*) FROM ({sql}) AS gone"))[0][0]
        self.result.gone = gone
        synced = (await in_thread(self._query, store.synced_keys_sql(self.dest, self.name)))[0][0]
        limit = self.sync.delete_limit(synced)
        if limit is not None and gone > limit and not self.force:
            message = (f"{gone:,} of the {synced:,} keys synced before are gone from the rows, more than "
                       f"max_deletes ({self.sync.max_deletes}: {limit:,})")
            if not self.dry_run:
                raise SyncError(f"{self.where}: {message}; nothing sent. Check the query, or run again with "
                                "--force to clear their fields in Pendo")
            self.warn(f"max_deletes: {message}; a run would stop here unless --force")
        return gone

    async def _stream(self, sql: str, outcomes: RunOutcomes, *, clear: bool = False) -> BaseException | None:
        """Read changed rows (or, to `clear`, keys gone from the rows) and send them; returns the
        first error (in-flight requests still finish)."""
        concurrency = self.sync.to.concurrency
        slots = asyncio.Semaphore(concurrency * 2)  # requests queued or in flight: bounds memory
        inflight: set[asyncio.Task[None]] = set()
        errors: list[BaseException] = []

        def done(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())  # type: ignore[arg-type]

        batches = self.read(sql, READ_BATCH_ROWS)
        try:
            while not errors:
                try:
                    batch = await in_thread(next, batches, None)
                except Exception as exc:  # noqa: BLE001
                    raise SyncError(f"{self.where}: reading changed rows from {self.sync.source!r} failed: "
                                    f"{redact(str(exc)).strip().splitlines()[0]}") from None
                if batch is None:
                    break
                if outcomes.pending >= COMMIT_ROWS:  # in-flight requests go on meanwhile
                    # files are taken here, on the loop: sends finishing meanwhile write new ones
                    await in_thread(self._commit, *outcomes.files(), outcomes.committed, False)
                if clear and self.dry_run:
                    self.result.gone_keys += batch.column(store.KEY).to_pylist()[:DRY_RUN_KEYS]
                    del self.result.gone_keys[DRY_RUN_KEYS:]
                if not clear:
                    self.result.changed += batch.num_rows
                    self.result.fresh += batch.num_rows - (
                        pc.sum(batch.column(store.RETRY).cast(pa.int64())).as_py() or 0)
                for piece in (self.clear_pieces if clear else self.pieces)(batch):
                    if self.dry_run:
                        if clear:
                            continue
                        self.result.requests += 1
                        if len(self.result.samples) < 3:
                            self.result.samples.extend(piece.records[: 3 - len(self.result.samples)])
                        continue
                    await slots.acquire()
                    if errors:
                        slots.release()
                        break
                    task = asyncio.create_task(self.send(piece, outcomes))
                    inflight.add(task)
                    task.add_done_callback(done)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            await in_thread(batches.close)  # type: ignore[attr-defined]
            if inflight:
                await asyncio.gather(*list(inflight), return_exceptions=True)
        return errors[0] if errors else None

    async def _rejected_all(self) -> SyncError | None:
        """A run in which Pendo accepted none of the rows sent fails. Not when every row sent was
        already failing before (say ids missing in Pendo, retried each run) and earlier runs had
        rows accepted: that is the warning of partial rejections, run after run."""
        r, target = self.result, self.sync.to
        if not r.sent or r.missing + r.errors < r.sent:
            return None
        if not r.fresh and (await in_thread(self._query, store.accepted_sql(self.dest, self.name)))[0][0]:
            return None
        hint = ""
        if r.missing == r.sent and self.sync.mode == "update":
            hint = (f"; none of these {target.kind}s exists in Pendo (mode: update creates none, mode: upsert does), "
                    f"or {self.sync.key_column} holds other ids than {target.id_field}")
        return SyncError(f"{self.where}: Pendo accepted none of the {r.sent:,} rows sent ({r.missing:,} missing, "
                         f"{r.errors:,} errors){hint}; see {store.FAILURES}")

    def warn(self, message: str) -> None:
        self.result.warnings.append(message)
        log.info("event=sync_warning sync=%s %s", self.name, message)

    def _commit(self, accepted: list[StagedFile], failed: list[StagedFile], gone: list[StagedFile], total: int,
                final: bool) -> None:
        """Commit staged outcomes (runs in a worker thread); the final commit also writes the
        `_floe_loads` row, with `total` accepted rows."""
        job = SyncLoad(self.load_id, store.SYNC_SOURCE, self.name, store.snapshot_spec(self.dest), accepted, {},
                        self.started_at, details=self.result.details(), accepted=total)
        try:
            store.commit(self.dest, self.name, job, failed, final=final, complete=self.result.ok,
                         status="committed" if self.result.ok else "failed", error=self.result.error,
                         gone_files=gone)
        except Exception as exc:  # noqa: BLE001
            message = redact(f"{self.where}: recording outcomes in {self.sync.source!r} failed: {exc}")
            if not final:
                raise SyncError(message) from None
            self.result.error = f"{self.result.error}; {message}" if self.result.error else message
        finally:
            remove_files(accepted + failed + gone)


@asynccontextmanager
async def sync_ends(config: FloeConfig, name: str, sync: SyncConfig) -> AsyncIterator[tuple[SqlDestination,
                                                                                            PendoClient]]:
    """The warehouse sync `name` reads and its Pendo client, both closed on exit (a FloeError when the
    warehouse cannot be read from)."""
    dest = read_destination(config, name, sync)
    client = PendoClient(sync.to)
    try:
        yield dest, client
    finally:
        await client.aclose()
        dest.close()


async def run_sync(config: FloeConfig, name: str, *, dry_run: bool = False, full: bool = False,
                   force: bool = False) -> SyncResult:
    """Run the sync `name` of `config` (see module docstring); errors are in the result."""
    sync: SyncConfig = config.syncs[name]
    result = SyncResult(name, f"pendo {sync.to.kind}/{sync.to.group}", dry_run=dry_run)
    try:
        async with sync_ends(config, name, sync) as (dest, client):
            return await SyncRun(name, sync, dest, client, config.stage, dry_run=dry_run, full=full,
                                 force=force).run()
    except FloeError as exc:  # the warehouse could not be opened (a run reports its own errors)
        result.error = redact(str(exc))
        return result


def select(config: FloeConfig, names: list[str] | None) -> list[str]:
    if not config.syncs:
        raise ConfigError("syncs: nothing to run (no syncs configured)")
    unknown = [n for n in names or [] if n not in config.syncs]
    if unknown:
        raise ConfigError(f"syncs.{unknown[0]}: no such sync (configured: {', '.join(config.syncs)})")
    return list(names) if names else list(config.syncs)


async def run_syncs(config: FloeConfig, names: list[str] | None = None, *, dry_run: bool = False,
                    full: bool = False, force: bool = False) -> list[SyncResult]:
    """Run the named syncs (all by default) one after another."""
    results = []
    for name in select(config, names):
        result = await run_sync(config, name, dry_run=dry_run, full=full, force=force)
        log.info("event=sync_done sync=%s changed=%d sent=%d updated=%d missing=%d errors=%d seconds=%.1f%s",
                 name, result.changed, result.sent, result.updated, result.missing, result.errors,
                 result.seconds, f" error={result.error}" if result.error else "")
        results.append(result)
    return results
