"""`floe run --full-refresh` is exactly once: the refreshed rows replace the old ones in one last commit.

Until that commit the table keeps its old rows and the stream its old state, whatever happens to the
refresh (a source failure midway, SIGKILL of the process); once it is made, each row is there once
and the state is the refresh's last. On DuckDB, PostgreSQL, the BigQuery emulator and the files
destination, for append, merge and child (parent_key) streams, and for a stream that re-reads only
from a start time (FullStory), whose earlier rows stay.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from floe.config import validate_model
from floe.core.destination import Destination
from floe.core.plugins import destination_registry as registry
from floe.core.stream import Context, RefreshScope, RunOptions, Stream
from floe.destinations.bigquery import BigQueryConfig, BigQueryDestination
from floe.destinations.files import FilesDestination
from floe.engine.pipeline import StreamResult, run_stream
from floe.sandbox.server import serve_in_thread
from tests.bigquery_emulator import BigQueryEmulator
from tests.fixtures.core import OneStreamSource, ResentParentStream, T, VersionedRows, staged_files
from tests.fixtures.destinations import files_rows


@dataclass
class Warehouse:
    """A destination under test and how to read back what it holds."""

    dest: Destination
    rows: Any  # () -> sorted [(id, v)]
    child_rows: Any = None  # the same, read as a child table (files: per parent, its latest load)

    def state(self) -> Any:
        return self.dest.get_state("src", "items")


@pytest.fixture
def bigquery(gcs_server, gcs_bucket) -> Iterator[tuple[BigQueryDestination, BigQueryEmulator]]:
    emulator = BigQueryEmulator("raw", "US", gcs_server.client())
    with serve_in_thread(emulator.app) as server:
        settings = {"type": "bigquery", "project": "proj", "dataset": "raw", "stage": f"gs://{gcs_bucket}/floe",
                    "api_endpoint": server.url, "commit_interval_seconds": 0}
        dest = BigQueryDestination("bq", validate_model(BigQueryConfig, settings, "destinations.bq"))
        yield dest, emulator
        dest.close()


def settings_of(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    """floe.yml settings of a destination kind (every checkpoint its own commit, to see each)."""
    if kind == "duckdb":
        return {"type": "duckdb", "path": str(tmp_path / "w.duckdb"), "commit_rows": 0}
    if kind == "postgres":
        return request.getfixturevalue("postgres_db").config()
    if kind.startswith("files"):  # a killed run's lease expires within a second (the re-runs come at once)
        return {"type": "files", "path": str(tmp_path / "out"), "format": kind.partition("-")[2] or "parquet",
                "lease_expiry_seconds": 1}
    raise ValueError(kind)


def make(settings: dict[str, Any], tmp_path: Path) -> Destination:
    cls = registry.load(settings["type"])
    return cls("warehouse", validate_model(cls.Config, settings, "destinations.warehouse"), Context(tmp_path))


def stored_rows(dest: Destination, emulator: BigQueryEmulator | None = None) -> list[tuple[Any, ...]]:
    """(id, v) of every row the destination holds for src.items."""
    if emulator is not None:
        return sorted(emulator.db.execute("SELECT id, v FROM raw.src_items").fetchall())
    if isinstance(dest, FilesDestination):
        return files_rows(dest)
    return sorted(dest.query("SELECT id, v FROM src.items"))  # type: ignore[attr-defined]


def open_warehouse(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Warehouse]:
    if kind == "bigquery":
        dest, emulator = request.getfixturevalue("bigquery")
        yield Warehouse(dest, lambda: stored_rows(dest, emulator))
        return
    dest = make(settings_of(kind, tmp_path, request), tmp_path)
    child_rows = (lambda: files_rows(dest, latest_per="id")) if isinstance(dest, FilesDestination) else None
    yield Warehouse(dest, lambda: stored_rows(dest), child_rows)
    dest.close()


@pytest.fixture(params=["duckdb", "postgres", "bigquery", "files"])
def warehouse(request, tmp_path) -> Iterator[Warehouse]:
    yield from open_warehouse(request.param, tmp_path, request)


def run(dest: Destination, stream: Stream, stage: Path, full_refresh: bool = False) -> StreamResult:
    source = OneStreamSource(stream)
    source.context = Context(options=RunOptions(full_refresh=full_refresh))
    return asyncio.run(run_stream(source, stream, dest, stage))


def version(v: str, ids: range) -> list[tuple[int, str]]:
    return [(i, f"{v}-{i}") for i in ids]


@pytest.mark.parametrize("disposition", ["append", "merge"])
def test_a_finished_full_refresh_leaves_each_row_once_and_its_state(warehouse, tmp_path, disposition):
    stage = tmp_path / "stage"
    assert run(warehouse.dest, VersionedRows(range(5), "v1", disposition), stage).ok
    refreshed = run(warehouse.dest, VersionedRows(range(6), "v2", disposition), stage, full_refresh=True)
    assert refreshed.ok, refreshed.error
    assert refreshed.commits == 4 and refreshed.rows == 6  # three checkpoints into the copy, then the swap
    assert warehouse.rows() == version("v2", range(6))  # each row once: the refresh's, not the old ones too
    assert warehouse.state() == {"next": 6}
    assert run(warehouse.dest, VersionedRows(range(8), "v3", disposition), stage).ok  # and the stream goes on from there
    assert warehouse.rows() == version("v2", range(6)) + version("v3", range(6, 8))
    assert not staged_files(stage)


def test_a_full_refresh_that_fails_midway_keeps_the_old_rows_and_state(warehouse, tmp_path):
    stage = tmp_path / "stage"
    assert run(warehouse.dest, VersionedRows(range(5), "v1"), stage).ok
    failed = run(warehouse.dest, VersionedRows(range(6), "v2", fail_at=4), stage, full_refresh=True)
    assert failed.error == "RuntimeError: the source broke"
    assert failed.commits == 2  # the checkpoints before the failure went to the refresh copy...
    assert warehouse.rows() == version("v1", range(5))  # ...and none of them into the table
    assert warehouse.state() == {"next": 5}
    assert run(warehouse.dest, VersionedRows(range(6), "v3"), stage, full_refresh=True).ok  # the next refresh starts afresh
    assert warehouse.rows() == version("v3", range(6))
    assert warehouse.state() == {"next": 6}


def test_a_child_stream_refreshed_keeps_each_parents_last_set(warehouse, tmp_path):
    stream = ResentParentStream()
    assert run(warehouse.dest, stream, tmp_path / "stage").ok
    assert run(warehouse.dest, stream, tmp_path / "stage", full_refresh=True).ok
    # Parent 1 arrives twice within the refresh, as in a normal run: its later set replaces the earlier.
    assert (warehouse.child_rows or warehouse.rows)() == [(1, "c"), (2, "x")]
    assert warehouse.state() == {"file": 2}


@pytest.fixture(params=["duckdb", "postgres", "bigquery", "files", "files-jsonl", "files-csv"])
def scoped(request, tmp_path) -> Iterator[Warehouse]:
    yield from open_warehouse(request.param, tmp_path, request)


def test_a_refresh_from_a_start_time_replaces_the_rows_from_then_on_and_keeps_the_earlier(scoped, tmp_path):
    # Rows are an hour apart from T; the refresh re-reads from T + 3h, like FullStory from `start_time`.
    stage = tmp_path / "stage"
    assert run(scoped.dest, VersionedRows(range(6), "v1", per_batch=4), stage).ok  # rows 0-3 in one commit: 3h falls inside it
    scope = RefreshScope("at", T + timedelta(hours=3))
    refreshed = run(scoped.dest, VersionedRows(range(3, 8), "v2", scope=scope), stage, full_refresh=True)
    assert refreshed.ok, refreshed.error
    assert scoped.rows() == version("v1", range(3)) + version("v2", range(3, 8))
    assert scoped.state() == {"next": 8}


# --- SIGKILL of a real process in the middle of a refresh ---------------------------------------------
CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    from floe.config import validate_model
    from floe.core.plugins import destination_registry as registry
    from floe.engine.pipeline import run_stream
    from floe.core.stream import Context, RunOptions
    from tests.fixtures.core import OneStreamSource
    from tests.fixtures.core import VersionedRows

    settings, folder = json.loads(sys.argv[1]), Path(sys.argv[2])
    cls = registry.load(settings["type"])
    dest = cls("warehouse", validate_model(cls.Config, settings, "destinations.warehouse"), Context(folder))

    class Slow(VersionedRows):
        async def read(self, state):
            async for batch in super().read(state):
                yield batch
                await asyncio.sleep(0.05)

    stream = Slow(range(10_000), "v2")
    source = OneStreamSource(stream)
    source.context = Context(options=RunOptions(full_refresh=True))
    asyncio.run(run_stream(source, stream, dest, folder / "stage", on_commit=lambda job: print("commit", flush=True)))
""")


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "files"])  # BigQuery: the injected failure above
def test_a_full_refresh_killed_midway_keeps_the_old_rows_and_state(kind, tmp_path, request):
    settings = settings_of(kind, tmp_path, request)
    dest = make(settings, tmp_path)
    try:
        assert run(dest, VersionedRows(range(5), "v1"), tmp_path / "stage").ok
    finally:
        dest.close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings), str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout is not None
    commits = 0
    for line in child.stdout:
        commits += line.strip() == "commit"
        if commits == 3:  # three checkpoints are in the refresh copy, more on the way
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert commits == 3, child.stderr.read() if child.stderr else ""

    dest = make(settings, tmp_path)
    try:
        assert stored_rows(dest) == version("v1", range(5))
        assert dest.get_state("src", "items") == {"next": 5}
        assert run(dest, VersionedRows(range(7), "v3"), tmp_path / "stage", full_refresh=True).ok  # then a whole refresh
        assert stored_rows(dest) == version("v3", range(7))
        assert dest.get_state("src", "items") == {"next": 7}
    finally:
        dest.close()
