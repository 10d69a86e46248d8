"""The engine's contract: checkpoints commit atomically, failures keep earlier commits, dispositions apply."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pytest

from floe.core.errors import SourceError
from floe.core.stream import Batch, Disposition, State, Stream
from floe.destinations.duckdb import DuckDBDestination
from floe.engine.pipeline import run_stream
from floe.infra.stage import StageRun, StageWriter
from tests.fixtures.core import OneStreamSource, staged_files


class ListStream(Stream):
    """A stream that yields prepared batches; raises `fail_at` (an index) to simulate a broken input."""

    schema = pa.schema([("id", pa.int64()), ("v", pa.string())])

    def __init__(self, batches: list[Batch], disposition: Disposition = "merge", fail_at: int | None = None):
        self.name = "items"
        self.batches = batches
        self.disposition = disposition
        self.primary_key = ("id",) if disposition == "merge" else ()
        self.fail_at = fail_at
        self.seen_state: State | None = None

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        self.seen_state = state
        for i, batch in enumerate(self.batches):
            if i == self.fail_at:
                raise SourceError(f"broken input at batch {i}")
            yield batch


def rows(ids: list[int], values: list[str], **extra: list[object]) -> pa.RecordBatch:
    return pa.record_batch({"id": ids, "v": values, **extra})


def load(dest: DuckDBDestination, stream: ListStream, stage: Path):
    return asyncio.run(run_stream(OneStreamSource(stream), stream, dest, stage))


def table(dest: DuckDBDestination) -> list[tuple]:
    return dest.query("SELECT id, v FROM src.items ORDER BY id, v")


def test_each_checkpoint_commits_its_rows_and_state_together(duckdb_destination, tmp_path):
    stream = ListStream([Batch(rows([1, 2], ["a", "b"])), Batch(checkpoint={"n": 1}),
                         Batch(rows([3], ["c"]), checkpoint={"n": 2})])
    result = load(duckdb_destination, stream, tmp_path / "stage")
    assert result.ok and result.rows == 3 and result.commits == 2
    assert table(duckdb_destination) == [(1, "a"), (2, "b"), (3, "c")]
    assert duckdb_destination.get_state("src", "items") == {"n": 2}
    loads = duckdb_destination.query("SELECT rows, status FROM _floe_loads ORDER BY finished_at")
    assert loads == [(2, "committed"), (1, "committed")]


def test_rows_after_the_last_checkpoint_are_never_committed(duckdb_destination, tmp_path):
    stream = ListStream([Batch(rows([1], ["a"]), checkpoint={"n": 1}), Batch(rows([2], ["b"]))])
    load(duckdb_destination, stream, tmp_path / "stage")
    assert table(duckdb_destination) == [(1, "a")]


def test_a_failure_keeps_earlier_commits_and_state_and_is_recorded(duckdb_destination, tmp_path):
    stream = ListStream(
        [Batch(rows([1], ["a"]), checkpoint={"n": 1}), Batch(rows([2], ["b"])), Batch(checkpoint={"n": 2})],
        fail_at=2,
    )
    result = load(duckdb_destination, stream, tmp_path / "stage")
    assert not result.ok and "broken input at batch 2" in (result.error or "")
    assert table(duckdb_destination) == [(1, "a")]
    assert duckdb_destination.get_state("src", "items") == {"n": 1}
    assert duckdb_destination.query("SELECT status FROM _floe_loads ORDER BY finished_at") == [
        ("committed",), ("failed",)]
    assert not staged_files(tmp_path / "stage"), "staged files of the failed load are removed"


def test_the_next_run_reads_from_the_committed_state(duckdb_destination, tmp_path):
    load(duckdb_destination, ListStream([Batch(rows([1], ["a"]), checkpoint={"n": 7})]), tmp_path / "s")
    second = ListStream([Batch(checkpoint={"n": 8})])
    load(duckdb_destination, second, tmp_path / "s")
    assert second.seen_state == {"n": 7}
    assert duckdb_destination.query(
        "SELECT version FROM _floe_state WHERE source = 'src' AND stream = 'items' ORDER BY version") == [(1,), (2,)]


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [("append", [(1, "a"), (1, "a2"), (2, "b")]), ("replace", [(1, "a2"), (2, "b")])],
)
def test_append_and_replace(duckdb_destination, tmp_path, disposition, expected):
    load(duckdb_destination, ListStream([Batch(rows([1], ["a"]), checkpoint={})], disposition), tmp_path / "s")
    # a replace stream commits once, at its last checkpoint, with every batch of the run
    second = ListStream([Batch(rows([1], ["a2"]), checkpoint={"x": 1}), Batch(rows([2], ["b"]), checkpoint={"x": 2})],
                        disposition)
    load(duckdb_destination, second, tmp_path / "s")
    assert table(duckdb_destination) == expected


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_files_left_in_the_stage_by_a_dead_run_are_removed_and_never_loaded(duckdb_destination, tmp_path, fmt):
    stage = tmp_path / "stage"
    dead = StageRun.open(stage, "src", "items")
    writer = StageWriter(dead.folder, "20261124T000000Z-dead00", format=fmt)
    writer.write(pa.record_batch({"id": [99], "v": ["never committed"]}))
    [orphan] = [f.path for f in writer.flush()]
    os.close(dead._lock)  # the run dies: the operating system drops its lock
    load(duckdb_destination, ListStream([Batch(rows([1], ["a"]), checkpoint={})]), stage)
    assert not orphan.exists() and not dead.lock_path.exists()
    assert table(duckdb_destination) == [(1, "a")]
    assert not list((stage / "src" / "items").iterdir())  # the run's own folder went at its end too
