"""Overlapping runs end to end: `floe run` in threads and in real processes, `floe serve`, SIGKILL.

Runs of one stream that overlap (cron overlap, a manual run beside `floe serve`, two pods) take
turns on the stream's lease: each row lands once and state versions stay unique; a run that gives
up waiting fails that stream with one line naming the holder and exits non-zero, while its other
streams go on. Killed runs free their leases, and a re-run then equals a clean run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from floe.apps.serve import Server
from floe.config import load_config, parse_config
from floe.core.plugins import source_registry as source_registry
from floe.core.settings import SourceConfig
from floe.core.stream import Batch, Source, State, Stream
from floe.engine import runner
from floe.engine.pipeline import StreamResult
from floe.sandbox.fullstory import DEFAULT_API_KEY
from tests.fixtures.destinations import Place, place_of

ROWS = 100  # per stream of the ticking source


class TickingConfig(SourceConfig):
    type: str = "ticking"
    streams: list[str] = ["numbers"]


class TickingStream(Stream):
    """ROWS rows `n` = 0.., ten per checkpoint, a few milliseconds apart (so that runs overlap)."""

    schema = pa.schema([("n", pa.int64())])

    def __init__(self, name: str) -> None:
        self.name = name

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        for low in range((state or {}).get("next", 0), ROWS, 10):
            await asyncio.sleep(0.01)
            yield Batch(pa.record_batch({"n": pa.array(range(low, low + 10), pa.int64())}),
                        checkpoint={"next": low + 10})


class TickingSource(Source):
    Config = TickingConfig

    def streams(self) -> list[Stream]:
        return [TickingStream(name) for name in self.config.streams]


@pytest.fixture
def ticking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(source_registry._entries, "ticking", f"{__name__}:TickingSource")


def ticking_config(place: Place, streams: tuple[str, ...] = ("numbers",), **destination: Any) -> Any:
    return parse_config({
        "stage": str(place.base / "stage"),
        "sources": {"tick": {"type": "ticking", "streams": list(streams)}},
        "destinations": {"w": {**place.settings, **destination}},
    }, place.base / "floe.yml")


def run_in_threads(config: Any, runs: int) -> list[StreamResult]:
    results: list[StreamResult] = []
    barrier = threading.Barrier(runs)

    def one() -> None:
        barrier.wait()
        results.extend(runner.run(config))

    threads = [threading.Thread(target=one) for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("runs", [2, 3])
@pytest.mark.parametrize("kind", ["duckdb", "postgres", "bigquery", "files"])
def test_overlapping_runs_in_threads_load_each_row_once(ticking, kind, runs, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    results = run_in_threads(ticking_config(place, lease_wait_seconds=60), runs)
    assert [r.error for r in results] == [None] * runs
    assert sum(r.rows for r in results) == ROWS  # the later runs found the work done
    assert place.column("tick", "numbers", "n") == list(range(ROWS))
    versions = place.versions("tick", "numbers")
    assert versions == list(range(1, len(versions) + 1))


def test_a_stream_held_by_another_run_fails_after_the_wait_and_the_others_go_on(ticking, request, tmp_path):
    place = place_of("postgres", request, tmp_path)
    config = ticking_config(place, ("numbers", "letters"), lease_wait_seconds=0.5)
    holder = place.open()
    lease = holder.acquire_lease("tick", "numbers")
    try:
        results = {r.stream: r for r in runner.run(config)}
        assert results["letters"].ok and results["letters"].rows == ROWS
        assert not results["numbers"].ok and results["numbers"].rows == 0
        assert results["numbers"].error.startswith(
            "tick.numbers -> w: another run is loading this stream (host ")
        # `floe serve` runs streams the same way: it is held up by the same lease.
        [cycle] = asyncio.run(serve_once(config)).history
        assert [r.error.split(" (")[0] for r in cycle.results if not r.ok] == [
            "tick.numbers -> w: another run is loading this stream"]
    finally:
        lease.release()
        holder.close()
    assert place.column("tick", "numbers", "n") == []
    assert runner.run(config)[0].ok  # free again
    assert place.column("tick", "numbers", "n") == list(range(ROWS))


async def serve_once(config: Any) -> Server:
    server = Server(config, backoff_base=3600)
    await server.run(max_cycles=1)
    return server


# --- real processes: `floe run` on the FullStory emulator --------------------------------------
def fullstory_project(place: Place, server_url: str, **destination: Any) -> Path:
    """A floe.yml loading six hourly FullStory windows (3,600 events) into `place`."""
    config = place.base / "floe.yml"
    config.write_text(yaml.safe_dump({
        "sources": {"fs": {"type": "fullstory", "api_key": DEFAULT_API_KEY, "base_url": server_url,
                           "start_time": "2024-01-01T00:00:00Z", "end_time": "2024-01-01T06:00:00Z",
                           "poll_interval": 0.05}},
        "destinations": {"w": {**place.settings, **destination}},
        "stage": str(place.base / "stage"),
    }))
    return config


def floe_run(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(config)],
                            cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(place: Place) -> list[tuple[Any, ...]]:
    """Every loaded event as (IndvId, SessionId, PageId, EventStart, EventType, EventPageOffset), sorted."""
    dest = place.open()
    try:
        return sorted(dest.query('SELECT "IndvId", "SessionId", "PageId", "EventStart", "EventType", '  # type: ignore[attr-defined]
                                 '"EventPageOffset" FROM fs.events'))
    except Exception as exc:  # noqa: BLE001 - no table yet: nothing loaded
        if "does not exist" in str(exc).lower() or "catalog" in str(exc).lower():
            return []
        raise
    finally:
        dest.close()


def fresh_place(kind: str, request: pytest.FixtureRequest, base: Path) -> Place:
    """Another place of `kind` (PostgreSQL: a database of its own)."""
    base.mkdir(parents=True, exist_ok=True)
    if kind != "postgres":
        return place_of(kind, request, base)
    server = request.getfixturevalue("postgres_server")
    db = server.create_database()
    request.addfinalizer(lambda: server.drop_database(db.database))
    return Place(kind, db.config(), base)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgres", "duckdb"])
def test_three_floe_run_processes_started_together_load_each_event_once(kind, fullstory_server, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    config = fullstory_project(place, fullstory_server.url, lease_wait_seconds=120)
    procs = [floe_run(config) for _ in range(3)]
    outcomes = [(p.wait(timeout=180), p.stderr.read() if p.stderr else "") for p in procs]
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    loaded = events(place)
    assert len(loaded) == len(set(loaded)) == 6 * 600
    versions = place.versions("fs", "events")
    assert versions == list(range(1, len(versions) + 1))


@pytest.mark.parametrize("kind", ["postgres", "duckdb"])
def test_a_floe_run_that_gives_up_waiting_exits_non_zero_with_one_line_naming_the_holder(
        kind, fullstory_server, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    config = fullstory_project(place, fullstory_server.url, lease_wait_seconds=1)
    holder = place.open()
    lease = holder.acquire_lease("fs", "events")  # DuckDB: this process now has the file open
    try:
        proc = floe_run(config)
        out, err = proc.communicate(timeout=120)
    finally:
        lease.release()
        holder.close()
    assert proc.returncode == 1
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: 1 of 1 streams failed: fs.events -> w: another run is loading this stream (host ")
    assert f"pid {os.getpid()}" in line and line.endswith(
        "gave up after waiting 1s (destinations.w.lease_wait_seconds)")
    if kind == "duckdb":
        assert f"DuckDB's lock on {place.base / 'w.duckdb'}" in line
    assert events(place) == []


class KilledTrial(threading.Thread):
    """Two `floe run` of one project started together; right after the k-th window read by either
    (k random, before the last window, so the reader is still running), the reader and, in half of
    the trials, the other run too are killed with SIGKILL."""

    def __init__(self, config: Path, rng: random.Random) -> None:
        super().__init__()
        self.config, self.kill_at, self.kill_both = config, rng.randint(1, 5), rng.random() < 0.5
        self.codes: list[int] = []

    def run(self) -> None:
        procs = [subprocess.Popen([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c",
                                   str(self.config)], cwd=self.config.parent, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        windows_read, lock = 0, threading.Lock()

        def watch(proc: subprocess.Popen[str]) -> None:
            nonlocal windows_read
            for line in proc.stderr or []:
                if "event=fullstory_window" not in line:
                    continue
                with lock:
                    windows_read += 1
                    if windows_read == self.kill_at:
                        for victim in procs if self.kill_both else [proc]:
                            victim.send_signal(signal.SIGKILL)

        watchers = [threading.Thread(target=watch, args=(p,)) for p in procs]
        for watcher in watchers:
            watcher.start()
        self.codes = [p.wait(timeout=180) for p in procs]
        for watcher in watchers:
            watcher.join()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgres", "duckdb"])
def test_sigkill_at_random_points_during_overlapping_runs_then_a_rerun_equals_a_clean_run(
        kind, fullstory_server, request, tmp_path):
    commit_each_window = {"commit_rows": 0} if kind == "duckdb" else {}
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    places = [fresh_place(kind, request, tmp_path / f"trial{n}") for n in range(3)]
    trials = [KilledTrial(fullstory_project(place, fullstory_server.url, lease_wait_seconds=120,
                                            **commit_each_window), rng) for place in places]
    for trial in trials:  # independent projects: the trials run side by side
        trial.start()
    clean = fresh_place(kind, request, tmp_path / "clean")
    assert all(r.ok for r in runner.run(load_config(fullstory_project(clean, fullstory_server.url,
                                                                      **commit_each_window))))
    expected = events(clean)
    assert len(expected) == len(set(expected)) == 6 * 600
    for trial, place in zip(trials, places, strict=True):
        trial.join()
        assert -signal.SIGKILL in trial.codes and set(trial.codes) <= {0, -signal.SIGKILL}, (seed, trial.codes)
        assert all(r.ok for r in runner.run(load_config(trial.config))), seed  # the re-run
        assert events(place) == expected, seed  # nothing lost, nothing twice
        versions = place.versions("fs", "events")
        assert versions == list(range(1, len(versions) + 1)), seed
