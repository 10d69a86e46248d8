"""floe as a Singer target: a Singer message stream loaded through floe's stage + exactly-once loads.

Per stream, RECORDs are gathered into chunks, converted to Arrow in bulk (`convert.Converter`),
and staged as Parquet exactly like `floe run` stages a source's batches. A commit hands every
stream's staged files to `Destination.load_group` (data + state + load row of every table in ONE
transaction, up to the destination's `group_size` tables) and only then writes the latest STATE to
stdout, so every STATE a consumer sees covers committed data only. Commits happen when
`batch_rows` records are pending and a STATE arrives, when `max_seconds` passed since the last
commit and a STATE arrives, on ACTIVATE_VERSION, on a key change, and at the end of input.

Tables: `<schema>.<stream>` (schema `singer` by default), merged on `key_properties`, appended
when there are none. Records that carry a `version` store it in `_sdc_table_version`;
ACTIVATE_VERSION deletes the rows of older versions (and unversioned rows) of that table.
The destination keeps the STATE committed with each table under `_floe_state`
(source = the schema, stream = the Singer stream) as `{"singer_state": S, "state_messages": n,
"records": c, "records_after_state": r}`: the last STATE the commit covered, how many STATE
messages and how many of the table's records came after the last STATE written out before the
commit and up to S, and how many of the table's records followed S (at the end of input).

Overlap: the target takes the lease of each stream it loads (`Destination.acquire_lease`, on the
stream's first SCHEMA) and each commit names the state version it builds on, exactly like `floe
run`: a second target, or a `floe run` of the same `<schema>.<stream>`, waits up to the
destination's `lease_wait_seconds` and then fails naming the holder, and a commit on top of a state
that another run moved meanwhile is refused whole.

Fast path (fastpath.py): runs of RECORD lines go to DuckDB's JSON reader in worker threads, those it
cannot prove alike go the per-record path; a STATE waits for the runs before it only when it commits.

Replays (see `Replay`): an orchestrator that lost the STATE of the target's last commit (the
target died between committing and writing it) feeds the tap again from an earlier STATE, and a
deterministic tap sends again what the destination already holds. For a table without key
properties the target then drops those records instead of appending them twice.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa

from floe.apps.singer.batch import batch_rows
from floe.apps.singer.convert import Converter
from floe.apps.singer.fastpath import FastPath, record_prefixes, supported
from floe.apps.singer.messages import message_type, read_extension
from floe.apps.singer.replay import Replay
from floe.apps.singer.schema import Column, json_schema_columns
from floe.apps.singer.streams import (
    VERSION_COLUMN,
    Buffer,
    SingerStream,
    StateLine,
    apply_jobs,
    bad_record,
    delete_older_versions,
    with_version,
)
from floe.core.destination import Destination, LoadJob
from floe.core.errors import SourceError
from floe.core.settings import SourceConfig
from floe.core.stream import State
from floe.engine.pipeline import table_spec
from floe.infra.stage import StageRun, StageWriter, new_load_id, remove_leftovers

log = logging.getLogger("floe.singer.target")

CHUNK_ROWS = 50_000  # records converted to Arrow and staged at a time
# Records pending at a STATE that make a commit due: the loads of one overlap the reading and converting
# of the next records (500,000 made a run of that size one commit at the end, with nothing to overlap).
BATCH_ROWS = 200_000


class SingerTarget:
    def __init__(self, destination: Destination, stage: Path, out: IO[bytes], schema: str = "singer",
                 batch_rows: int = BATCH_ROWS, max_seconds: float = 60.0, policy: SourceConfig | None = None) -> None:
        self.destination = destination
        self.policy = policy or SourceConfig(type="singer")  # its `schema_changes` and `widen_to_text`
        self.stage = stage
        self.out = out
        self.schema = schema
        self.batch_rows = batch_rows
        self.max_seconds = max_seconds
        self.buffers: dict[str, Buffer] = {}
        self.state: Any = None
        self.state_unsent = False
        self.states_received = 0  # STATE messages read so far
        self.state_written = 0  # the number (in states_received) of the last STATE written out
        self.last_commit = time.monotonic()
        self.started_at = datetime.now(UTC)
        self.committed_rows = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="floe-target-load")
        self._inflight: tuple[Future[int], StateLine | None] | None = None
        self._replays: list[Buffer] = []  # streams whose replay window is open
        self._runs: list[StageRun] = []  # each stream's stage folder
        self.fast = FastPath()
        self._converter = ThreadPoolExecutor(FastPath.WORKERS, thread_name_prefix="floe-target-fast")
        self._converting = 0  # runs in the fast path's worker
        self._submitted = 0  # runs handed to it so far (each pending run holds its number)
        # A commit due at a STATE while runs before it were still converting: it is made once they are
        # staged (before any later run), while the reading and converting go on; the runs numbered below `_due_before`.
        self._due: StateLine | None = None
        self._due_before = 0
        self._fast: list[Buffer] = []  # the streams whose RECORD lines the fast path may take

    # --- input ---------------------------------------------------------------------------------
    def run(self, lines: Iterable[bytes]) -> int:
        """Consume every message; commit and emit the final STATE. Returns the rows committed."""
        run: list[bytes] = []  # raw RECORD lines of `held` (the fast path's run) from line `run_at` on
        held: Buffer | None = None
        run_at, start = 0, b""  # `start`: how the run's lines start
        collecting = gc.isenabled()
        try:
            gc.disable()  # records hold no cycles: refcounts free them
            for lineno, line in enumerate(lines, 1):
                if held is not None:
                    if line.startswith(start):
                        run.append(line)
                        if len(run) >= CHUNK_ROWS:
                            self._submit(held, run, run_at)
                            run, run_at = [], lineno + 1
                        continue
                    self._submit(held, run, run_at)
                    run, held = [], None
                for buf in self._fast:
                    start = next((p for p in buf.prefixes if line.startswith(p)), b"")
                    if start:
                        held, run, run_at = buf, [line], lineno
                        break
                else:
                    self._line(line, lineno)
            if held is not None:
                self._submit(held, run, run_at)
            for buf in self._replays:  # the input ended: what they hold is new
                buf.replay = None
            self._replays = []
            self.commit(wait=True)
        except BaseException:
            self.abort()
            raise
        finally:
            if collecting:  # (collections of the buffered records cost a third of the time)
                gc.enable()
            self._worker.shutdown(wait=True)
            self._converter.shutdown(wait=True, cancel_futures=True)
            self.close()
        return self.committed_rows

    def _line(self, line: bytes, lineno: int, replayed: Buffer | None = None) -> None:
        """One message line through the per-record path (`replayed`: a line of that stream's run)."""
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if not line.strip():
                return
            raise SourceError(f"input line {lineno}: not a JSON message ({exc.msg})") from None
        if replayed is None and self._converting and message_type(message) != "STATE":
            self._drain()  # what follows a run waits for it, but for a STATE (its commit waits: `commit`)
        if type(message) is dict and message.get("type") == "RECORD":  # the hot path: a RECORD of a known stream
            buf = self.buffers.get(message.get("stream"))  # type: ignore[arg-type]
            record = message.get("record")
            if buf is not None and type(record) is dict and "version" not in message:
                rows = buf.rows
                rows.append(record)
                if len(rows) >= CHUNK_ROWS:
                    buf.stage()
                return
        if replayed is not None and (message_type(message) != "RECORD" or message.get("stream") != replayed.stream.name):
            raise SourceError(f"input line {lineno}: starts as a RECORD of {replayed.stream.name}, reads otherwise")
        self._other(message, lineno)

    def _submit(self, buf: Buffer, run: list[bytes], first_line: int) -> None:
        """A run of RECORD lines of `buf` to the fast path's worker; a short one (or a replay's) to _line now."""
        if not run:  # (the run that a full one left) nothing waits for the worker
            return
        if buf.skip or len(run) < self.fast.min_run:
            self._drain()
            for lineno, line in enumerate(run, first_line):
                self._line(line, lineno)
            return
        future = self._converter.submit(self.fast.convert, buf.stream.name, buf.columns, buf.converter.schema, run,
                                        buf.writer.folder)
        buf.pending.append((run, first_line, future, self._submitted))
        buf.pending_lines += len(run)
        self._converting += 1
        self._submitted += 1
        self._drain(keep=FastPath.WORKERS)  # (reading ahead of the worker holds each line's bytes)

    def _drain(self, keep: int = 0, due_only: bool = False) -> None:
        """Stage the runs in the worker, oldest first, until `keep` are left (`due_only`: until the due
        commit is made): their batches, or their lines through the per-record path. The due commit is
        made once the runs before its STATE are staged."""
        while self._converting > keep:
            buf = min((b for b in self.buffers.values() if b.pending), key=lambda b: b.pending[0][3])
            if self._due is not None and buf.pending[0][3] >= self._due_before:
                self._commit_due()
            if due_only and self._due is None:
                return
            run, first_line, future, _ = buf.pending.pop(0)
            buf.pending_lines -= len(run)
            self._converting -= 1
            batch = future.result()
            if batch is None or not batch.schema.equals(buf.converter.schema):  # refused, or the columns changed
                for lineno, line in enumerate(run, first_line):
                    self._line(line, lineno, replayed=buf)
                continue
            buf.stage()  # records before the run
            buf.writer.write(batch)
            buf.staged += batch.num_rows
            buf.records += batch.num_rows
        if self._due is not None and all(b.pending[0][3] >= self._due_before for b in self.buffers.values() if b.pending):
            self._commit_due()

    def _fast_path(self, buf: Buffer) -> None:
        """Let the fast path take the stream's RECORD lines when it handles its columns."""
        buf.prefixes = record_prefixes(buf.stream.name) if supported(buf.columns) else ()
        self._fast = [b for b in self.buffers.values() if b.prefixes]

    def close(self) -> None:
        """Give the streams' leases up and delete their stage folders."""
        for buf in self.buffers.values():
            buf.lease.release()
        for run in self._runs:
            run.close()
        self.fast.close()

    def _other(self, message: Any, lineno: int) -> None:
        kind = message_type(message)
        where = f"input line {lineno}"
        if kind == "RECORD":  # a lower-case type
            return self._other_record(message, lineno)
        if kind == "SCHEMA":
            self._schema(message, where)
        elif kind == "STATE":
            self._state(message, where)
        elif kind == "ACTIVATE_VERSION":
            self._activate(message, where)
        elif kind == "BATCH":
            self._batch(message, where)
        elif kind is None:
            raise SourceError(f"{where}: not a Singer message (no `type`)")
        else:
            log.debug("ignoring %s message at %s", kind, where)

    def _state(self, message: dict[str, Any], where: str) -> None:
        """Commit what came before the STATE once a commit is due; with nothing pending, write it out."""
        if "value" not in message:
            raise SourceError(f"{where}: STATE message has no `value`")
        if self._due is not None:  # the commit due at the previous STATE first
            self._drain(due_only=True)
        self.state, self.state_unsent = message["value"], True
        self.states_received += 1
        for buf in self.buffers.values():
            buf.at_state = buf.received
        if self._replays:
            self._drain()
        if self._replays and self._look_for_replay():
            return  # a stream in its replay window holds records: nothing commits yet
        if self._inflight is not None and self._inflight[0].done():
            self._settle()
        due = self._pending_rows() >= self.batch_rows or time.monotonic() - self.last_commit >= self.max_seconds
        # A child table commits at each STATE, as `floe run` commits each checkpoint: a parent sent
        # again later replaces its set, which one commit of both would keep side by side.
        due = due or any(b.stream.parent_key and (b.rows or b.staged) for b in self.buffers.values())
        if due and self._converting:  # made once the runs before this STATE are staged (`_drain`)
            self._due, self._due_before = self._unsent_state(), self._submitted
        elif due or not self._has_pending():
            self.commit()

    def _other_record(self, message: dict[str, Any], lineno: int) -> None:
        buf = self.buffers.get(message.get("stream"))  # type: ignore[arg-type]
        record = message.get("record")
        if buf is None or not isinstance(record, dict):
            raise bad_record(message, lineno, message.get("stream") in self.buffers)
        if message.get("version") is not None:
            record[VERSION_COLUMN] = message["version"]
            if not buf.versioned:
                self._mark_versioned(buf)
        buf.rows.append(record)
        if len(buf.rows) >= CHUNK_ROWS:
            buf.stage()

    # --- streams -------------------------------------------------------------------------------
    def _schema(self, message: dict[str, Any], where: str) -> None:
        name = message.get("stream")
        if not isinstance(name, str) or not name:
            raise SourceError(f"{where}: SCHEMA message has no `stream`")
        columns = json_schema_columns(message.get("schema"), name)
        keys = message.get("key_properties") or []
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise SourceError(f"{where}: stream {name}: key_properties must be a list of property names")
        known = {c.name for c in columns}
        missing = [k for k in keys if k not in known]
        if missing:
            raise SourceError(f"{where}: stream {name}: key_properties {missing} are not in the schema")
        extension = read_extension(message, keys, where)
        parent, markers = extension.parent_key, extension.parent_markers
        columns = [dataclasses.replace(c, precision=d[0], scale=d[1]) if c.kind == "number" and (
            d := extension.decimals.get(c.name)) else c for c in columns]
        old = self.buffers.get(name)
        if old is not None:
            same_keys = (old.stream.primary_key, old.stream.parent_key) == (tuple(keys), parent)
            if old.columns == with_version(columns, old.versioned) and same_keys:
                return
            old.stage()
            if not same_keys:
                self.commit(only=old)  # rows staged under the old key merge on the old key
        buf_columns = with_version(columns, old.versioned if old else False)
        stream = SingerStream(name, pa.schema([c.arrow_field() for c in buf_columns]), tuple(keys), parent, markers)
        stream.schema_changes, stream.widen_to_text = self.policy.schema_policy(name)
        if old is not None:
            old.stream, old.columns = stream, buf_columns
            old.converter = Converter(name, buf_columns)
            self._fast_path(old)
        else:
            self._open_stream(stream, buf_columns)

    def _open_stream(self, stream: SingerStream, columns: list[Column]) -> None:
        """A stream's first SCHEMA: take its lease, read its committed state, open its stage folder."""
        name = stream.name
        lease = self.destination.acquire_lease(self.schema, name)
        try:
            committed = self.destination.read_state(self.schema, name)
            if leftovers := remove_leftovers(self.stage, self.schema, name):
                log.info("removed %d stage files of %s left by a dead run", leftovers, name)
            run = StageRun.open(self.stage, self.schema, name)
        except BaseException:
            lease.release()
            raise
        self._runs.append(run)
        writer = StageWriter(run.folder, new_load_id(), compression="none")  # read once, locally: no codec
        buf = self.buffers[name] = Buffer(stream, columns, Converter(name, columns), writer, lease,
                                           committed.version)
        self._fast_path(buf)
        if not stream.primary_key:  # merged tables take a replay as it comes: the merge is idempotent
            self._watch_for_replay(buf, committed.state)

    # --- replays -------------------------------------------------------------------------------
    def _watch_for_replay(self, buf: Buffer, committed: State | None) -> None:
        replay = Replay.of(committed)
        if replay is None:
            return
        buf.skip = replay.skip
        if self.states_received < replay.window_end:
            buf.replay = replay
            self._replays.append(buf)

    def _look_for_replay(self) -> bool:
        """At a STATE: drop the records of each watched stream that this STATE shows are loaded
        already, close the windows that end here; True while an open window holds records."""
        held = False
        for buf in list(self._replays):
            replay = buf.replay
            assert replay is not None
            if replay.marked_by(self.state, buf.at_state):
                buf.drop()
                buf.skip = replay.skip
            if self.states_received >= replay.window_end:
                self._end_replay(buf)
            elif buf.rows or buf.staged:
                held = True
        return held

    def _end_replay(self, buf: Buffer) -> None:
        if buf.replay is not None:
            buf.replay = None
            self._replays.remove(buf)

    def _mark_versioned(self, buf: Buffer) -> None:
        buf.versioned = True
        buf.columns = with_version(buf.columns, True)
        buf.converter = Converter(buf.stream.name, buf.columns)
        self._fast_path(buf)
        buf.stream.schema = pa.schema([c.arrow_field() for c in buf.columns])

    def _pending_rows(self) -> int:
        return sum(b.staged + len(b.rows) + b.pending_lines for b in self.buffers.values())

    def _has_pending(self) -> bool:
        return any(b.rows or b.staged or b.pending for b in self.buffers.values())

    # --- commits -------------------------------------------------------------------------------
    def _checkpoint(self, buf: Buffer) -> State:
        return {"singer_state": self.state, "state_messages": self.states_received - self.state_written,
                "records": buf.at_state - buf.at_output, "records_after_state": buf.records + len(buf.rows) - buf.at_state}

    def _load(self, buf: Buffer, details: dict[str, Any] | None = None) -> LoadJob:
        files = buf.writer.flush()
        job = LoadJob(
            load_id=buf.writer.load_id, source=self.schema, stream=buf.stream.name,
            table=table_spec(self.schema, buf.stream, files), files=files, checkpoint=self._checkpoint(buf),
            started_at=self.started_at, details=details or {}, base_version=buf.version, lease=buf.lease,
        )
        buf.version += 1  # should this commit fail, the target stops (nothing builds on it)
        buf.writer.load_id = new_load_id()
        return job

    def commit(self, only: Buffer | None = None, wait: bool = False) -> None:
        """Commit every stream with staged rows (or just `only`); the latest STATE follows once it is done.

        The loads run in a worker thread while reading goes on; one commit is in flight at a time,
        and its STATE is written only after all of its loads succeeded."""
        self._drain()
        if only is not None:  # what it holds commits now, so it is taken as new
            self._end_replay(only)
        self._commit_staged(only, None if only else self._unsent_state(), wait)

    def _commit_due(self) -> None:
        """The commit due at a STATE, now that the runs before it are staged (those after it still convert)."""
        state, self._due = self._due, None
        self._commit_staged(None, state)

    def _unsent_state(self) -> StateLine | None:
        """The latest STATE, if not yet written out (for the commit made now); restarts `max_seconds`."""
        self.last_commit = time.monotonic()
        if not self.state_unsent:
            return None
        self.state_unsent = False
        return StateLine(self.state, self.states_received, {name: b.at_state for name, b in self.buffers.items()})

    def _commit_staged(self, only: Buffer | None, state: StateLine | None, wait: bool = False) -> None:
        """Commit what is staged and buffered of every stream (or `only`) on the load thread; `state` follows it."""
        self._settle()
        jobs = []
        for buf in [only] if only else list(self.buffers.values()):
            buf.stage()
            if buf.staged:
                jobs.append(self._load(buf))
                buf.staged = 0
        if jobs:
            self._inflight = (self._worker.submit(apply_jobs, self.destination, jobs), state)
            if wait or only is not None:
                self._settle()
        elif state is not None:
            self._write_state(state)

    def _settle(self) -> None:
        """Wait for the commit in flight (raising its error), then write its STATE."""
        if self._inflight is None:
            return
        future, state = self._inflight
        self._inflight = None
        self.committed_rows += future.result()
        if state is not None:
            self._write_state(state)

    def _write_state(self, line: StateLine) -> None:
        self.out.write(orjson.dumps(line.value) + b"\n")
        self.out.flush()
        self.state_written = line.number
        for name, received in line.received.items():
            self.buffers[name].at_output = received

    def abort(self) -> None:
        if self._inflight is not None:  # let a running transaction finish; its STATE is not written
            self._inflight[0].exception()
            self._inflight = None
        self._due = None  # its STATE is not written
        for buf in self.buffers.values():
            for _, _, future, _ in buf.pending:
                future.cancel()
            buf.pending, buf.pending_lines, self._converting = [], 0, 0
            buf.writer.abort()
            buf.rows = []

    def _activate(self, message: dict[str, Any], where: str) -> None:
        name, version = message.get("stream"), message.get("version")
        buf = self.buffers.get(name)  # type: ignore[arg-type]
        if buf is None:
            raise SourceError(f"{where}: ACTIVATE_VERSION for stream {name!r} before its SCHEMA")
        if not isinstance(version, int) or isinstance(version, bool):
            raise SourceError(f"{where}: ACTIVATE_VERSION of stream {name}: version must be an integer")
        if not buf.versioned:
            self._mark_versioned(buf)
        self.commit(only=buf)
        from floe.destinations.sql import SqlDestination

        if not isinstance(self.destination, SqlDestination):
            log.warning("destination %s cannot delete old versions; ACTIVATE_VERSION of %s ignored",
                        self.destination.name, name)
            return
        delete_older_versions(self.destination, self._load(buf, {"activate_version": version}), version)

    # --- Meltano BATCH messages --------------------------------------------------------------
    def _batch(self, message: dict[str, Any], where: str) -> None:
        name = message.get("stream")
        buf = self.buffers.get(name)  # type: ignore[arg-type]
        if buf is None:
            raise SourceError(f"{where}: BATCH for stream {name!r} before its SCHEMA")
        for rows in batch_rows(message, where, CHUNK_ROWS):
            buf.rows.extend(rows)
            buf.stage()

