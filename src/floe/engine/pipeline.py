"""Runs a stream into its destinations: one read -> stage files -> each destination commits rows + state.

Extract once, load many: one read of a stream feeds every destination whose committed state is
the same (a *group*). Batches are staged once; at each checkpoint the new files go to each
destination of the group (its *lane*), which commits them on its own cadence
(`Destination.commit_due`: DuckDB folds appends up to `commit_rows`, BigQuery folds by
`commit_interval_seconds`), under its own lease, on top of its own state version, into its own
result. A file is deleted once every lane given it has committed it or failed (`FileShares`).
Destinations whose states differ (one added later, one whose last run failed) are read for
separately, one group after the other, each from its own state: a stream's API calls grow with the
number of distinct states among its destinations, not with the number of destinations.

Reading and loading overlap: each lane commits in a worker thread while the read goes on. A lane's
queue holds at most one commit besides the one in flight, so the read waits for the slowest lane,
and staged-but-uncommitted data stays bounded by a few commits' worth. A lane that fails takes no
more commits (its result carries the error; its state stays at its last commit, from which the
next run catches it up) while the others go on; the read stops at once when no lane is left.

The stage files of a group are Parquet if any of its destinations wants Parquet, Arrow IPC only if
all of them take it; Parquet's codec is the destinations' own when they agree, else the one that
compresses most (`CODECS`: shared files wait for the slowest destination).

A stream runs under its lease in each destination (taken first, waiting up to the destination's
`lease_wait_seconds`), and each commit names the state version it builds on, so an overlapping
run of the same stream (another `floe run`, `floe serve`, another machine) neither loads the
same rows again nor moves the state from under this one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from floe.core.destination import CommittedState, Destination, LoadJob, StagedFile, TableSpec
from floe.core.errors import DestinationError, FloeError
from floe.core.leases import Lease
from floe.core.secrets import redact
from floe.core.stream import Batch, RefreshScope, Source, State, Stream, merge_ledger
from floe.engine.progress import Progress
from floe.infra import killpoints
from floe.infra.stage import FileShares, StageRun, StageWriter, new_load_id, remove_leftovers
from floe.infra.threads import in_thread

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("floe.pipeline")
CODECS = ("zstd", "snappy", "lz4", "none")  # Parquet codecs, the most compressing first


@dataclass
class StreamResult:
    source: str
    stream: str
    destination: str
    rows: int = 0
    commits: int = 0
    seconds: float = 0.0
    error: str | None = None
    state: State | None = None
    details: dict[str, int] = field(default_factory=dict)
    schema_changes: list[dict[str, Any]] = field(default_factory=list)  # what its commits changed in the table

    @property
    def ok(self) -> bool:
        return self.error is None


def table_spec(source: str, stream: Stream, files: list[StagedFile]) -> TableSpec:
    """The stream's declared columns, overridden and extended by what the staged files hold."""
    import pyarrow as pa

    fields: dict[str, pa.Field] = {f.name: f for f in stream.landed_schema}
    for staged in files:
        for f in staged.schema:
            known = fields.get(f.name)
            if known is None or pa.types.is_null(known.type) or not pa.types.is_null(f.type):
                fields[f.name] = f if known is None or not known.metadata else f.with_metadata(known.metadata)
    return TableSpec(
        source, stream.name, pa.schema(list(fields.values())), stream.primary_key, stream.disposition,
        parent_key=stream.parent_key, parent_markers=stream.parent_markers, views=tuple(stream.views),
        schema_changes=stream.schema_changes, widen_to_text=stream.widen_to_text, drift=stream.drift,
        bad_rows=stream.bad_rows, bad_rows_max=stream.bad_rows_max,
    )


async def read_state(destination: Destination, source: str, stream: str) -> CommittedState:
    """The stream's saved state and its version; a failure to read it names the destination and the stream."""
    try:
        return await in_thread(destination.read_state, source, stream)
    except FloeError:
        raise
    except Exception as exc:
        raise DestinationError(f"{destination.name}: cannot read the state of {source}.{stream} from "
                               f"_floe_state: {type(exc).__name__}: {redact(str(exc))}") from None


def describe(exc: BaseException) -> str:
    """The one-line error of a failed stream (redacted)."""
    return redact(str(exc)) if isinstance(exc, FloeError) else redact(f"{type(exc).__name__}: {exc}")


class _NoDestinationLeft(Exception):
    """Every lane of the read has failed: staged work has nowhere to go."""


@dataclass
class _Commit:
    files: list[StagedFile]
    checkpoint: State
    load_id: str


class _Lane:
    """One destination's side of a stream's run: its lease, state version, commit cadence, queue and result."""

    def __init__(self, source: Source, stream: Stream, destination: Destination, shares: FileShares,
                 progress: Progress | None, on_commit: Callable[[LoadJob], None] | None) -> None:
        self.source, self.stream, self.destination, self.shares = source, stream, destination, shares
        self.progress, self.on_commit = progress, on_commit
        self.labels = (source.name, stream.name, destination.name)  # its key in the progress
        self.result = StreamResult(source.name, stream.name, destination.name)
        self.started, self.started_at = time.monotonic(), datetime.now(UTC)
        # A full refresh of an append or merge stream loads into the table's refresh copy, which replaces
        # the table's rows in one last commit (a replace stream already commits once, at its end).
        self.refresh = source.context.options.full_refresh and stream.disposition != "replace"
        self.refreshed: list[StagedFile] = []  # every file the refresh committed to the copy
        # A backfill re-reads a day range (`read_range`) and commits it once, at the end, keeping the state.
        self.backfill = source.context.options.backfill
        self.scope: RefreshScope | None = None  # the rows the backfill replaces (see Stream.backfill_scope)
        self.lease: Lease | None = None
        self.committed = CommittedState()
        self.ledger_state: State | None = None  # the last state committed with the whole ledger (see `state_of`)
        self.version = 0  # the state version the next commit builds on
        self.attempting: LoadJob | None = None  # the commit in flight, named in _floe_loads if it fails
        self.queue: asyncio.Queue[_Commit | None] = asyncio.Queue(maxsize=1)
        self.consumer: asyncio.Task[None] | None = None
        self.folded: _Commit | None = None  # checkpoints folded together, not handed over yet
        self.last_commit = time.monotonic()

    @property
    def failed(self) -> bool:
        consumer = self.consumer
        return self.result.error is not None or (
            consumer is not None and consumer.done() and (consumer.cancelled() or consumer.exception() is not None))

    def fail(self, exc: BaseException) -> None:
        if self.result.error is None:
            if not isinstance(exc, FloeError):
                log.debug("stream failed", exc_info=exc)
            self.result.error = describe(exc)

    def job(self, files: list[StagedFile], checkpoint: State | None, load_id: str, refresh: bool = False,
            details: dict[str, object] | None = None) -> LoadJob:
        return LoadJob(load_id=load_id, source=self.source.name, stream=self.stream.name,
                       table=table_spec(self.source.name, self.stream, files), files=files, checkpoint=checkpoint,
                       started_at=self.started_at, details=details or {}, refresh=refresh,
                       base_version=self.version, lease=self.lease, run_id=self.source.context.run_id)

    # --- before the read ------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Take the lease, read the committed state and (full refresh) clear the refresh copy; a
        failure fails this lane only."""
        try:
            self.lease = await in_thread(self.destination.acquire_lease, self.source.name, self.stream.name)
            self.committed = await read_state(self.destination, self.source.name, self.stream.name)
            self.version = self.committed.version
            self.ledger_state = None if self.refresh else self.committed.state
            if self.backfill is not None:
                self.scope = self.stream.backfill_scope(self.backfill, self.committed.state)
            if self.refresh:
                await in_thread(self.destination.begin_refresh, table_spec(self.source.name, self.stream, []))
        except Exception as exc:  # noqa: BLE001 - reported in this destination's result
            self.fail(exc)

    @property
    def reads_from(self) -> State | None:
        options = self.source.context.options
        return None if options.full_refresh or options.backfill else self.committed.state

    @property
    def commits_once(self) -> bool:
        """Whether the whole read commits once, at its end (a replace stream, a backfill)."""
        return self.stream.disposition == "replace" or self.backfill is not None

    def commit_job(self, commit: _Commit, checkpoint: State) -> LoadJob:
        """The job of one commit, storing `checkpoint` (see `state_of`). A backfill's keeps the committed
        state (as a new version noting the backfill) and, for an append stream, replaces the range's rows."""
        if self.backfill is None:
            return self.job(commit.files, checkpoint, commit.load_id, self.refresh)
        job = self.job(commit.files, self.committed.state, commit.load_id, details={"backfill": {
            "from": self.backfill.first.isoformat(), "to": self.backfill.last.isoformat()}})
        return dataclasses.replace(job, replaces=self.scope if self.stream.disposition == "append" else None)

    # --- during the read: the producer's side -------------------------------------------------------
    def start(self) -> None:
        self.consumer = asyncio.create_task(self.consume())

    async def add(self, segment: list[StagedFile], checkpoint: State, load_id: str) -> None:
        """Take the files staged up to a checkpoint (this lane's share of them); commit now if due."""
        assert self.consumer is not None
        if self.consumer.done():  # failed: nothing more goes in
            self.drop()
            self.shares.release(segment)
            return
        files = (self.folded.files if self.folded else []) + segment
        if self.folded:  # the later checkpoint supersedes the folded one, but ledger entries add up
            checkpoint = cast(State, merge_ledger(self.folded.checkpoint, checkpoint))
        self.folded = _Commit(files, checkpoint, self.folded.load_id if self.folded else load_id)
        seconds = time.monotonic() - self.last_commit
        if self.commits_once or self.destination.commit_due(
                self.stream, sum(f.rows for f in files), seconds):
            commit, self.folded = self.folded, None
            await self.hand_over(commit)
            self.last_commit = time.monotonic()

    async def end(self) -> None:
        """The read is over: what is folded commits, then the queue ends."""
        if self.folded is not None:
            commit, self.folded = self.folded, None
            await self.hand_over(commit)
        await self.hand_over(None)

    async def hand_over(self, commit: _Commit | None) -> None:
        """Queue `commit` (None: the end) for the consumer, waiting for room. Once the consumer has
        stopped (it failed), nobody takes it any more: its files are let go instead of waiting for good."""
        assert self.consumer is not None
        putting = asyncio.ensure_future(self.queue.put(commit))
        try:
            await asyncio.wait({putting, self.consumer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not putting.done():
                putting.cancel()
                if commit is not None:
                    self.shares.release(commit.files)

    def drop(self) -> None:
        """Let go of every file this lane holds and has not committed (it failed, or the read is over)."""
        if self.folded is not None:
            self.shares.release(self.folded.files)
            self.folded = None
        while not self.queue.empty():
            if (pending := self.queue.get_nowait()) is not None:
                self.shares.release(pending.files)

    # --- during the read: the committing side --------------------------------------------------------
    def state_of(self, checkpoint: State) -> State:
        """What a commit stores as the state: the checkpoint, whose ledger entries a destination keeping
        the ledger adds to its table; else (and for a full refresh's finish) with the whole ledger so far."""
        if self.destination.keeps_ledger and not self.refresh:
            return checkpoint
        return cast(State, merge_ledger(self.ledger_state, checkpoint))

    async def consume(self) -> None:
        while (commit := await self.queue.get()) is not None:
            checkpoint = self.state_of(commit.checkpoint)
            try:
                job = self.attempting = self.commit_job(commit, checkpoint)
                job.check_lease()
                await in_thread(self.destination.load, job)
            finally:
                self.shares.release(commit.files)
            self.attempting = None
            if self.refresh:  # a refresh's commits write no state version (finish_refresh does)
                self.refreshed.extend(commit.files)
            else:
                self.version += 1
            rejected = int(job.details.get("rejected_rows", 0))  # left out by `bad_rows: quarantine`
            self.result.rows += job.rows - rejected
            self.result.commits += 1
            self.result.schema_changes += job.details.get("schema_changes", [])
            if rejected:
                self.result.details["rejected_rows"] = self.result.details.get("rejected_rows", 0) + rejected
                log.warning("event=rows_rejected source=%s stream=%s destination=%s rows=%d table=_floe_rejected",
                            self.source.name, self.stream.name, self.destination.name, rejected)
            self.result.state = self.ledger_state = job.checkpoint
            if self.progress:
                self.progress.add(self.labels, files=len(commit.files), commits=1)
            if self.on_commit:
                self.on_commit(job)

    # --- after the read ---------------------------------------------------------------------------
    async def finish(self, read_error: BaseException | None) -> None:
        """Settle the lane after its read: its consumer's or the read's error, else (full refresh) the swap."""
        assert self.consumer is not None
        if self.consumer.cancelled():
            self.fail(asyncio.CancelledError("the run was cancelled"))
        elif (error := self.consumer.exception()) is not None:
            self.fail(error)
        elif read_error is not None:
            self.fail(read_error)
        elif self.refresh and self.result.state is not None:
            try:
                self.attempting = self.job(self.refreshed, self.result.state, new_load_id(),
                                           details={"full_refresh": True})
                self.attempting.check_lease()
                await in_thread(self.destination.finish_refresh, self.attempting, self.stream.refresh_scope())
                self.attempting = None
                self.result.commits += 1
            except Exception as exc:  # noqa: BLE001 - reported in this destination's result
                self.fail(exc)

    async def close(self) -> None:
        """Give the lease up; note a failure in `_floe_loads` (best effort)."""
        if self.lease is not None:
            await in_thread(self.lease.release)
        if self.result.error:
            failed = self.attempting or self.job([], {}, new_load_id())
            await in_thread(self.destination.record_failure, failed, self.result.error)
        self.result.seconds = time.monotonic() - self.started
        if self.progress:  # its summary line, an error line when it failed
            self.progress.finish(self.labels, self.result.rows, self.result.commits, self.result.seconds,
                                 self.result.error)
        elif self.result.error:
            log.error("event=stream_failed source=%s stream=%s destination=%s error=%s",
                      self.source.name, self.stream.name, self.destination.name, self.result.error)


def stage_format(lanes: list[_Lane], stream: Stream) -> tuple[str, str]:
    """The stage format and Parquet codec of one read for `lanes` (see the module docstring)."""
    formats = {lane.destination.stage_format(stream.disposition) for lane in lanes}
    codecs = {lane.destination.stage_compression for lane in lanes}
    return ("arrow" if formats == {"arrow"} else "parquet",
            min(codecs, key=lambda c: CODECS.index(c) if c in CODECS else len(CODECS)))


async def read_into(stream: Stream, state: State | None, lanes: list[_Lane], run: StageRun,
                    shares: FileShares, progress: Progress | None) -> None:
    """Read `stream` once from `state`, staging into `run`, and commit into every lane; each lane's
    outcome lands in its result."""
    fmt, codec = stage_format(lanes, stream)
    scope, once = lanes[0].scope, lanes[0].commits_once  # a backfill's lanes share its range
    writer = StageWriter(run.folder, new_load_id(), compression=codec, format=fmt)

    async def deliver(files: list[StagedFile], checkpoint: State) -> None:
        """Give the files staged up to `checkpoint` to every lane still taking commits."""
        taking = [lane for lane in lanes if not lane.failed]
        if not taking:
            shares.release(files)
            raise _NoDestinationLeft
        shares.share(files, len(taking))
        load_id, writer.load_id = writer.load_id, new_load_id()
        for lane in taking:
            await lane.add(files, checkpoint, load_id)

    async def produce() -> None:
        """Stage the stream's batches and deliver each checkpoint. Every lane's queue ends with None
        however this ends (a consumer waiting for a queue nobody ends would wait for good), and whole
        checkpoints read before a failure still commit."""
        pending: State | None = None  # the latest checkpoint of a read that commits once, at the end
        read = stream.read(state) if scope is None else stream.read_range(scope)
        batches = cast(AsyncGenerator[Batch, None], read)  # see Stream.read
        try:
            try:
                async for batch in batches:
                    if batch.records is not None and batch.records.num_rows:
                        writer.write(stream.protected(batch.records))
                        killpoints.reached("batch")
                        if progress:
                            for lane in lanes:
                                if not lane.failed:
                                    progress.add(lane.labels, rows=batch.records.num_rows)
                    if batch.checkpoint is not None:
                        if once:
                            pending = batch.checkpoint
                        else:
                            await deliver(writer.flush(), batch.checkpoint)
            finally:
                await batches.aclose()  # the source's `finally` blocks run now: connections, threads, temp files
            if pending is not None:
                await deliver(writer.flush(), pending)
        finally:
            for lane in lanes:
                await lane.end()

    for lane in lanes:
        lane.start()
    producer = asyncio.create_task(produce())
    consumers = [lane.consumer for lane in lanes if lane.consumer is not None]
    try:
        while not producer.done():
            await asyncio.wait({producer, *(c for c in consumers if not c.done())},
                               return_when=asyncio.FIRST_COMPLETED)
            if not producer.done() and all(lane.failed for lane in lanes):
                producer.cancel()  # every destination failed: stop reading at once
                await asyncio.gather(producer, return_exceptions=True)
        await asyncio.wait(consumers)  # the last commits go in (the producer ended their queues)
    finally:
        writer.abort()
        for task in (producer, *consumers):
            task.cancel()
        await asyncio.gather(producer, *consumers, return_exceptions=True)
        for lane in lanes:
            lane.drop()
    read_error = None if producer.cancelled() else producer.exception()
    if isinstance(read_error, _NoDestinationLeft):
        read_error = None
    await asyncio.gather(*(lane.finish(read_error) for lane in lanes))


def groups(lanes: list[_Lane]) -> list[tuple[State | None, list[_Lane]]]:
    """The lanes still going, grouped by the state they read from, in order of first appearance."""
    by_state: dict[str, tuple[State | None, list[_Lane]]] = {}
    for lane in lanes:
        if not lane.failed:
            key = json.dumps(lane.reads_from, sort_keys=True, default=str)
            by_state.setdefault(key, (lane.reads_from, []))[1].append(lane)
    return list(by_state.values())


async def run_stream_into(
    source: Source,
    stream: Stream,
    destinations: list[Destination],
    stage: Path,
    progress: Progress | None = None,
    on_commit: Callable[[LoadJob], None] | None = None,
) -> list[StreamResult]:
    """Load one stream into each of `destinations` from that destination's saved state, under the
    stream's lease there; one read per distinct saved state. One result per destination, in order.

    Every checkpoint commits atomically, on top of the state version read at the start (a commit
    finding a newer version fails whole). A destination's error ends its loading only: the staged
    files of its uncommitted work are let go, the failure is noted in its `_floe_loads`, the error
    is returned in its result, and its commits before the error stay."""
    shares = FileShares()
    lanes = [_Lane(source, stream, destination, shares, progress, on_commit) for destination in destinations]
    if progress:
        for lane in lanes:
            progress.start(lane.labels)
    run: StageRun | None = None
    try:
        if leftovers := await in_thread(remove_leftovers, stage, source.name, stream.name):
            log.info("event=stage_cleaned source=%s stream=%s files=%d reason=left_by_a_dead_run",
                     source.name, stream.name, leftovers)
        await asyncio.gather(*(lane.prepare() for lane in lanes))
        for state, group in groups(lanes):
            if run is None:
                run = await in_thread(StageRun.open, stage, source.name, stream.name)
            await read_into(stream, state, group, run, shares, progress)
    except Exception as exc:  # noqa: BLE001 - the stage itself failed: every destination reports it
        for lane in lanes:
            lane.fail(exc)
    finally:
        if run is not None:
            run.close()
        await asyncio.gather(*(lane.close() for lane in lanes))
    return [lane.result for lane in lanes]


async def run_stream(
    source: Source,
    stream: Stream,
    destination: Destination,
    stage: Path,
    progress: Progress | None = None,
    on_commit: Callable[[LoadJob], None] | None = None,
) -> StreamResult:
    """`run_stream_into` one destination."""
    [result] = await run_stream_into(source, stream, [destination], stage, progress, on_commit)
    return result
