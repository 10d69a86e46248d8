"""The Singer target's streams: a stream's shape as a floe Stream and what the target buffers for it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from floe.apps.singer.convert import Converter
from floe.apps.singer.replay import Replay
from floe.apps.singer.schema import Column
from floe.core.destination import Destination, LoadJob
from floe.core.errors import FloeError, SourceError
from floe.core.leases import Lease
from floe.core.stream import Batch, Disposition, State, Stream
from floe.infra.stage import StageWriter, remove_files

VERSION_COLUMN = "_sdc_table_version"


class SingerStream(Stream):
    """A Singer stream as a floe Stream: its shape only; its rows come from the message reader."""

    def __init__(self, name: str, schema: pa.Schema, key: tuple[str, ...], parent: tuple[str, ...] = (),
                 markers: bool = True) -> None:
        self.name = name
        self.schema = schema
        self.primary_key = key
        self.parent_key, self.parent_markers = parent, markers  # floe's SCHEMA extension (messages.py)
        self.disposition: Disposition = "merge" if key else "append"

    async def read(self, state: State | None) -> Iterator[Batch]:  # type: ignore[override]
        raise NotImplementedError("Singer streams are fed by the target's message reader")


@dataclass(frozen=True)
class StateLine:
    """A STATE to write out once its commit is done: its value, its number among the STATE messages
    read, and how many records of each stream came before it."""

    value: Any
    number: int
    received: dict[str, int]


@dataclass
class Buffer:
    stream: SingerStream
    columns: list[Column]
    converter: Converter
    writer: StageWriter
    lease: Lease  # the stream's lease in the destination, held until the input ends
    version: int  # the state version the stream's next commit builds on
    rows: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0  # records of this stream taken from `rows` so far (record numbers continue from here)
    staged: int = 0  # rows staged since the last commit
    versioned: bool = False
    at_state: int = 0  # records of this stream received before the latest STATE
    at_output: int = 0  # records of this stream received before the last STATE written out
    skip: int = 0  # records still to drop before staging: the destination holds them (see Replay)
    replay: Replay | None = None  # while its window is open: records may be a replay; they are not committed
    prefixes: tuple[bytes, ...] = ()  # how its RECORD lines start, when the fast path handles its columns
    # Runs of RECORD lines in the fast path's worker (lines, number of the first, its batch or None, the run's
    # number among those submitted), in order
    pending: list[tuple[list[bytes], int, Future[pa.RecordBatch | None], int]] = field(default_factory=list)
    pending_lines: int = 0

    @property
    def received(self) -> int:
        return self.records + len(self.rows) + self.pending_lines

    def stage(self) -> None:
        """Convert the buffered records to Arrow (validating them) and stage them."""
        if not self.rows:
            return
        rows, first = self.rows, self.records + 1
        if self.skip:  # the destination holds these already (a replay)
            dropped = min(self.skip, len(rows))
            rows, first, self.skip = rows[dropped:], first + dropped, self.skip - dropped
        if rows:
            self.writer.write(self.converter.batch(rows, first))
            self.staged += len(rows)
        self.records += len(self.rows)
        self.rows = []

    def drop(self) -> None:
        """Forget the records since the last commit (the destination holds them)."""
        remove_files(self.writer.flush())
        self.records += len(self.rows)
        self.rows, self.staged = [], 0


def with_version(columns: list[Column], versioned: bool) -> list[Column]:
    """The columns with `_sdc_table_version` added, for a stream whose records carry versions."""
    if not versioned or any(c.name == VERSION_COLUMN for c in columns):
        return columns
    return [*columns, Column(VERSION_COLUMN, "integer", True, False, frozenset({"integer"}))]


def bad_record(message: dict[str, Any], lineno: int, known: bool) -> SourceError:
    """The error for a RECORD of an unknown stream (`known` False) or one without a `record` object."""
    stream = message.get("stream")
    if not known:
        return SourceError(f"input line {lineno}: RECORD for stream {stream!r} before its SCHEMA")
    return SourceError(f"input line {lineno}: RECORD of stream {stream!r} has no `record` object")


def delete_older_versions(destination: Any, job: LoadJob, version: int) -> None:
    """In one transaction: ensure the table, delete rows of versions older than `version`, write state."""
    spec = destination.located(job.table)
    table = destination.qualified(spec.schema_name, spec.table)
    try:
        destination.prepare_meta()
        with destination.transaction() as cur:
            destination.ensure_table(cur, spec)
            cur.execute(f"DELETE FROM {table} WHERE {VERSION_COLUMN} IS NULL OR {VERSION_COLUMN} < {int(version)}")
            destination.write_state(cur, job)
            destination.write_load_row(cur, job, "committed", None, datetime.now(UTC))
    except FloeError:
        raise
    except Exception as exc:
        raise SourceError(f"{destination.name}: ACTIVATE_VERSION {version} of {spec.table} failed: {exc}") from exc


def apply_jobs(destination: Destination, jobs: list[LoadJob]) -> int:
    """Commit the jobs in transactions of `group_size` tables (all of them, where the destination can)."""
    size = destination.group_size
    groups = [jobs[start:start + size] for start in range(0, len(jobs), size)]
    try:
        for group in groups:
            try:
                destination.load_group(group)
            except Exception as exc:
                for job in group:
                    destination.record_failure(job, str(exc))
                raise
    finally:
        for job in jobs:
            remove_files(job.files)
    return sum(job.rows for job in jobs)
