"""Runs streams into destinations: read -> stage files -> load + state in one transaction.

Reading and loading overlap: the reader stages batches while the previous checkpoint's files
are being committed in a worker thread. The queue between them holds at most one pending
commit, so staged-but-uncommitted data is bounded by one checkpoint's worth of files.

A stream runs under its lease in the destination (taken first, waiting up to the destination's
`lease_wait_seconds`), and each commit names the state version it builds on, so an overlapping
run of the same stream (another `floe run`, `floe serve`, another machine) neither loads the
same rows again nor moves the state from under this one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pyarrow as pa

from floe.destinations.base import CommittedState, Destination, LoadJob, TableSpec
from floe.destinations.leases import Lease
from floe.engine.progress import Progress
from floe.engine.stage import StagedFile, StageWriter, new_load_id, remove_files, remove_leftovers
from floe.engine.stream import Batch, Source, State, Stream
from floe.errors import DestinationError, FloeError
from floe.secrets import redact
from floe.threads import in_thread

log = logging.getLogger("floe.pipeline")


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

    @property
    def ok(self) -> bool:
        return self.error is None


def table_spec(source: str, stream: Stream, files: list[StagedFile]) -> TableSpec:
    """The stream's declared columns, overridden and extended by what the staged files hold."""
    fields: dict[str, pa.Field] = {f.name: f for f in stream.schema}
    for staged in files:
        for f in staged.schema:
            known = fields.get(f.name)
            if known is None or pa.types.is_null(known.type) or not pa.types.is_null(f.type):
                fields[f.name] = f if known is None or not known.metadata else f.with_metadata(known.metadata)
    return TableSpec(
        source, stream.name, pa.schema(list(fields.values())), stream.primary_key, stream.disposition,
        parent_key=stream.parent_key, parent_markers=stream.parent_markers, views=tuple(stream.views),
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


class _ConsumerStopped(Exception):
    """The committing task has ended (with an error): staged work has nowhere to go."""


@dataclass
class _Commit:
    files: list[StagedFile]
    checkpoint: State
    load_id: str


async def run_stream(
    source: Source,
    stream: Stream,
    destination: Destination,
    stage: Path,
    progress: Progress | None = None,
    on_commit: Callable[[LoadJob], None] | None = None,
) -> StreamResult:
    """Load one stream into one destination from that destination's saved state, under the stream's
    lease there.

    Every checkpoint commits atomically, on top of the state version read at the start (a commit
    finding a newer version fails whole). On any error the staged files of uncommitted work are
    deleted, the failure is noted in `_floe_loads`, and the error is returned in the result;
    commits made before the error stay."""
    key = f"{source.name}.{stream.name} -> {destination.name}"
    result = StreamResult(source.name, stream.name, destination.name)
    started = time.monotonic()
    queue: asyncio.Queue[_Commit | None] = asyncio.Queue(maxsize=1)
    writer = StageWriter(stage, source.name, stream.name, new_load_id(), compression=destination.stage_compression,
                         format=destination.stage_format(stream.disposition))
    started_at = datetime.now(UTC)
    attempting: LoadJob | None = None  # the commit in flight, named in _floe_loads if it fails
    # A full refresh of an append or merge stream loads into the table's refresh copy, which replaces
    # the table's rows in one last commit (a replace stream already commits once, at its end).
    refresh = source.context.options.full_refresh and stream.disposition != "replace"
    refreshed: list[StagedFile] = []  # every file the refresh committed to the copy
    lease: Lease | None = None
    version = 0  # the state version the next commit builds on

    async def hand_over(commit: _Commit | None) -> None:
        """Queue `commit` (None: the end) for the consumer, or remove its files. Once the consumer
        has stopped (it failed), nobody takes it any more: raise instead of waiting for good."""
        putting = asyncio.ensure_future(queue.put(commit))
        try:
            await asyncio.wait({putting, consumer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            queued = putting.done()
            if not queued:
                putting.cancel()
                if commit is not None:
                    remove_files(commit.files)
        if not queued:
            raise _ConsumerStopped

    async def produce(state: State | None) -> None:
        """Stage the stream's batches and queue each commit; the queue ends with None."""
        pending_checkpoint: State | None = None
        grouped: _Commit | None = None  # checkpoints folded together (destination.commit_interval)
        last_commit = time.monotonic()
        batches = cast(AsyncGenerator[Batch, None], stream.read(state))  # see Stream.read
        try:
            async for batch in batches:
                if batch.records is not None and batch.records.num_rows:
                    writer.write(batch.records)
                    if progress:
                        progress.add(key, rows=batch.records.num_rows)
                if batch.checkpoint is not None:
                    pending_checkpoint = batch.checkpoint
                    if stream.disposition != "replace":
                        files = (grouped.files if grouped else []) + writer.flush()
                        grouped = _Commit(files, batch.checkpoint, writer.load_id)
                        rows, seconds = sum(f.rows for f in files), time.monotonic() - last_commit
                        if destination.commit_due(stream, rows, seconds):
                            await hand_over(grouped)
                            writer.load_id, pending_checkpoint, grouped = new_load_id(), None, None
                            last_commit = time.monotonic()
        except asyncio.CancelledError:
            if grouped is not None:
                remove_files(grouped.files)
            raise
        except Exception:
            if grouped is not None:  # whole checkpoints read before the failure still commit
                await hand_over(grouped)
            await hand_over(None)
            raise
        finally:
            await batches.aclose()  # the source's `finally` blocks run now: connections, threads, temp files
        if grouped is not None:
            await hand_over(grouped)
        elif stream.disposition == "replace" and pending_checkpoint is not None:
            await hand_over(_Commit(writer.flush(), pending_checkpoint, writer.load_id))
        await hand_over(None)

    async def consume() -> None:
        nonlocal attempting, version
        while (commit := await queue.get()) is not None:
            job = LoadJob(
                load_id=commit.load_id, source=source.name, stream=stream.name,
                table=table_spec(source.name, stream, commit.files), files=commit.files,
                checkpoint=commit.checkpoint, started_at=started_at, refresh=refresh, base_version=version,
                lease=lease,
            )
            attempting = job
            try:
                job.check_lease()
                await in_thread(destination.load, job)
            finally:
                remove_files(commit.files)
            attempting = None
            if refresh:  # a refresh's commits write no state version (finish_refresh does)
                refreshed.extend(commit.files)
            else:
                version += 1
            result.rows += job.rows
            result.commits += 1
            result.state = commit.checkpoint
            if progress:
                progress.add(key, files=len(commit.files), commits=1)
            if on_commit:
                on_commit(job)

    try:
        lease = await in_thread(destination.acquire_lease, source.name, stream.name)
        # Under the lease: no other run loads this stream into this destination now.
        if leftovers := remove_leftovers(stage, source.name, stream.name):
            log.info("event=stage_cleaned source=%s stream=%s files=%d reason=left_by_an_interrupted_run",
                     source.name, stream.name, leftovers)
        committed = await read_state(destination, source.name, stream.name)
        version = committed.version
        state = None if source.context.options.full_refresh else committed.state
        if refresh:
            await in_thread(destination.begin_refresh, table_spec(source.name, stream, []))
        consumer = asyncio.create_task(consume())
        producer = asyncio.create_task(produce(state))
        await asyncio.wait({producer, consumer}, return_when=asyncio.FIRST_EXCEPTION)
        if not consumer.done():  # the producer ended (maybe failing): its last commits still go in
            await asyncio.wait({consumer})
        if consumer.exception():  # stop reading at once (the producer would stop at its next commit anyway)
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            raise consumer.exception()  # type: ignore[misc]
        if producer.exception():
            raise producer.exception()  # type: ignore[misc]
        if refresh and result.state is not None:
            attempting = LoadJob(
                load_id=new_load_id(), source=source.name, stream=stream.name,
                table=table_spec(source.name, stream, refreshed), files=refreshed, checkpoint=result.state,
                started_at=started_at, details={"full_refresh": True}, base_version=version, lease=lease,
            )
            attempting.check_lease()
            await in_thread(destination.finish_refresh, attempting, stream.refresh_scope())
            attempting = None
            result.commits += 1
    except FloeError as exc:
        result.error = redact(str(exc))
    except Exception as exc:  # noqa: BLE001 - reported per stream; the run goes on with other streams
        log.debug("stream failed", exc_info=True)
        result.error = redact(f"{type(exc).__name__}: {exc}")
    finally:
        writer.abort()
        while not queue.empty():
            pending = queue.get_nowait()
            if pending is not None:
                remove_files(pending.files)
        if lease is not None:
            await in_thread(lease.release)
    if result.error:
        failed = attempting or LoadJob(
            load_id=writer.load_id, source=source.name, stream=stream.name,
            table=table_spec(source.name, stream, []), files=[], checkpoint={}, started_at=started_at,
        )
        await in_thread(destination.record_failure, failed, result.error)
        log.error("event=stream_failed source=%s stream=%s destination=%s error=%s",
                  source.name, stream.name, destination.name, result.error)
    result.seconds = time.monotonic() - started
    return result
