"""Several destinations per run: one extraction feeds them all, each keeping its own state.

Each source loads into all destinations or those it names. Destinations at the same state share
one read: the API sees the requests of one extraction and the warehouses hold the same rows (one
`when_retrieved`). A destination that is behind catches up in a read of its own while the others
read only new data; one that fails stops alone and later resumes without duplicates; each keeps
its own commit cadence, and the read waits for the slowest; a run killed with SIGKILL, run again,
equals a clean run in every destination. Pairs: DuckDB with DuckDB, PostgreSQL, BigQuery;
the files destination is the third of three destinations.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app as cli_app
from floe.config import load_config, parse_config
from floe.core.plugins import source_registry as source_registry
from floe.core.settings import SourceConfig
from floe.core.stream import Batch, Context, RunOptions, Source, State, Stream
from floe.destinations.duckdb import DuckDBConfig, DuckDBDestination
from floe.destinations.files import FilesConfig, FilesDestination
from floe.destinations.postgres import PostgresConfig, PostgresDestination
from floe.engine import runner
from floe.engine.pipeline import run_stream_into
from floe.engine.runner import run
from floe.infra import killpoints
from floe.sandbox.fullstory import DEFAULT_API_KEY
from floe.sandbox.singular import create_app as singular_app
from floe.sources.twilio import TwilioSource
from tests.fixtures.core import OneStreamSource, VersionedRows, staged_files
from tests.fixtures.destinations import Place, place_of
from tests.fixtures.fullstory import emulator as fullstory_emulator
from tests.test_overlap import fresh_place
from tests.test_twilio import source_config as twilio_source
from tests.test_twilio import start_twilio

READS: list[State | None] = []  # the state each read of a counting stream started from


class CountingConfig(SourceConfig):
    type: str = "counting"
    rows: int = 30


class CountingStream(Stream):
    name = "numbers"
    schema = pa.schema([("n", pa.int64())])
    primary_key = ("n",)
    disposition = "append"

    def __init__(self, rows: int) -> None:
        self.rows = rows

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        READS.append(state)
        start = (state or {}).get("next", 0)
        for low in range(start, self.rows, 10):
            high = min(low + 10, self.rows)
            yield Batch(pa.record_batch({"n": pa.array(range(low, high), pa.int64())}), checkpoint={"next": high})


class CountingSource(Source):
    Config = CountingConfig

    def streams(self) -> list[Stream]:
        return [CountingStream(self.config.rows)]


@pytest.fixture
def counting_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(source_registry._entries, "counting", f"{__name__}:CountingSource")
    READS.clear()


PAIRS = [("duckdb", "duckdb"), ("duckdb", "postgres"), ("duckdb", "bigquery")]


@pytest.fixture(params=PAIRS, ids=["+".join(p) for p in PAIRS])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Place, Place]:
    """Two destinations: `a` is always DuckDB (committing every checkpoint), `b` each kind in turn."""
    places = []
    for name, kind in zip("ab", request.param, strict=True):
        (tmp_path / name).mkdir()
        places.append(place_of(kind, request, tmp_path / name))
    return places[0], places[1]


def two_destinations(tmp_path: Path, sources: dict[str, Any], pair: tuple[Place, Place],
                     **a_settings: Any) -> Any:
    """The config of `sources` into both places (`a` with `a_settings` on top), also written to floe.yml."""
    a, b = pair
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump({"stage": str(tmp_path / "stage"), "sources": sources,
                                    "destinations": {"a": {**a.settings, **a_settings}, "b": b.settings}}))
    return load_config(path)


def by_destination(results: list[Any]) -> dict[str, Any]:
    return {r.destination: r for r in results}


# --- one extraction -------------------------------------------------------------------------------------------
def steady_windows(source: dict[str, Any], seconds: float = 30) -> None:
    """Return when the windows a first read of Twilio `source` cuts stay the same for `seconds` (waiting
    out a change): a short range is cut into hours by the time of day, and a message window ending at
    a midnight also holds that day (`DateSent<`): reads either side of a change are served different counts."""
    stream = TwilioSource("tw", parse_config({"sources": {"tw": source}}).sources["tw"]).streams()[0]
    now = datetime.now(UTC)
    if stream.windows(None, now) != stream.windows(None, now + timedelta(seconds=seconds)):
        time.sleep(seconds)  # past it: windows change on the hour only


def test_twilio_is_read_once_for_both_destinations_and_both_hold_the_same_rows(pair, emulator, tmp_path):
    server, sandbox = start_twilio(emulator, size=400, days=6)
    source = twilio_source(server, sandbox, streams=["calls", "messages"])
    steady_windows(source)  # the read alone and the read for both cut the same windows
    alone, _ = run_alone(sandbox, source, tmp_path / "alone")
    config = two_destinations(tmp_path, {"tw": source}, pair)
    results = run(config)
    assert sandbox.served == alone  # two destinations cost the API what one costs
    assert [(r.stream, r.destination, r.error) for r in results] == [
        ("calls", "a", None), ("calls", "b", None), ("messages", "a", None), ("messages", "b", None)]
    sid = sandbox.credentials()[0][0]
    asked = [(r["kind"], tuple(sorted(r["params"].items()))) for r in sandbox.requests]
    assert asked and len(asked) == len(set(asked))  # no page was asked for twice
    a, b = pair
    for kind in ("calls", "messages"):
        count = sandbox.list(sid, kind).count
        rows = a.rows("tw", kind, "sid", "status", "price", "when_retrieved")
        assert len(rows) == count and rows == b.rows("tw", kind, "sid", "status", "price", "when_retrieved")
        assert len({r[-1] for r in rows}) == 1  # one retrieval


def test_singular_reports_are_made_once_and_both_destinations_hold_the_same_retrieval(pair, emulator, tmp_path):
    today = datetime.now(UTC).date()
    server = emulator(singular_app, rows_per_day=4, today=today.isoformat())
    sandbox = server.app.state.singular
    source = {"type": "singular", "api_key": "sandbox-singular-api-key", "base_url": f"{server.url}/api",
              "lookback_days": 3, "end_date": today.isoformat(), "poll_interval": 0.01}
    results = run(two_destinations(tmp_path, {"ads": source}, pair))
    assert [(r.destination, r.error) for r in results] == [("a", None), ("b", None)]
    assert sandbox.created == 4  # one report per day of the window, not one per destination
    a, b = pair
    columns = ("reporting_date", "app", "source", "os", "country_field", "adn_cost", "when_retrieved")
    rows = a.rows("ads", "campaign_stats", *columns)
    assert len(rows) == 4 * 4 and rows == b.rows("ads", "campaign_stats", *columns)
    assert len({r[-1] for r in rows}) == 1


# --- a destination that is behind ------------------------------------------------------------------------------
def run_alone(sandbox: Any, source: dict[str, Any], folder: Path, copy_of: Place | None = None) -> tuple[dict[str, int], int]:
    """What the emulator serves (records per list) and how many rows load when `source` runs into one
    DuckDB file of its own: a new one, or a copy of `copy_of`'s (so at its state). Its counters start at 0."""
    folder.mkdir()
    db = folder / "alone.duckdb"
    if copy_of is not None:
        shutil.copy(copy_of.settings["path"], db)
    sandbox.reset_stats()
    config = parse_config({"stage": str(folder / "stage"), "sources": {"tw": source},
                           "destinations": {"alone": {"type": "duckdb", "path": str(db)}}}, folder / "floe.yml")
    results = run(config)
    assert all(r.ok for r in results), [r.error for r in results]
    served = dict(sandbox.served)
    sandbox.reset_stats()
    return served, sum(r.rows for r in results)


def test_a_destination_added_later_catches_up_in_a_read_of_its_own_while_the_other_reads_only_new_calls(
        pair, emulator, tmp_path):
    server, sandbox = start_twilio(emulator, size=400, days=6)
    sid = sandbox.credentials()[0][0]
    calls = sandbox.list(sid, "calls")
    source = twilio_source(server, sandbox, streams=["calls"], lookback_days=1)
    assert all(r.ok for r in run(two_destinations(tmp_path, {"tw": {**source, "destinations": ["a"]}}, pair)))
    sandbox.advance(6 * 3600)  # new calls arrive; some older ones change
    a_alone, a_rows = run_alone(sandbox, source, tmp_path / "a-alone", copy_of=pair[0])  # from a's state
    new_alone, new_rows = run_alone(sandbox, source, tmp_path / "new-alone")  # from the start
    assert a_alone[f"{sid}/calls"] < new_alone[f"{sid}/calls"] / 2

    config = two_destinations(tmp_path, {"tw": source}, pair)
    results = by_destination(run(config))
    assert results["a"].ok and results["b"].ok, [r.error for r in results.values()]
    # b reads from the start; a reads from its own state, as it would alone; nothing more is asked.
    assert sandbox.served[f"{sid}/calls"] == a_alone[f"{sid}/calls"] + new_alone[f"{sid}/calls"]
    assert (results["a"].rows, results["b"].rows) == (a_rows, new_rows)
    a, b = pair
    assert a.rows("tw", "calls", "sid") == b.rows("tw", "calls", "sid") and len(set(b.rows("tw", "calls", "sid"))) == calls.count

    # Both are at the same state now: the next run reads once for both.
    assert a.state("tw", "calls") == b.state("tw", "calls")
    sandbox.advance(3600)
    again, _ = run_alone(sandbox, source, tmp_path / "again-alone", copy_of=a)
    assert all(r.ok for r in run(config))
    assert sandbox.served == again
    assert a.rows("tw", "calls", "sid") == b.rows("tw", "calls", "sid") and len(set(b.rows("tw", "calls", "sid"))) == calls.count


# --- failures --------------------------------------------------------------------------------------------------
def test_a_failing_destination_neither_blocks_nor_corrupts_the_others(counting_type, postgres_db, tmp_path):
    results = run(config_for(tmp_path, postgres_db, rows=30, pg_password="wrong-password"))
    by_dest = {(r.source, r.destination): r for r in results}
    assert set(by_dest) == {("everywhere", "lake"), ("everywhere", "pg"), ("everywhere", "files"),
                            ("lake_only", "lake")}  # lake_only goes only where it says
    assert "authentication failed" in (by_dest["everywhere", "pg"].error or "")
    assert "wrong-password" not in (by_dest["everywhere", "pg"].error or "")
    assert by_dest["everywhere", "lake"].ok and by_dest["everywhere", "files"].ok
    first = counts(tmp_path, postgres_db)
    assert first["lake"] == (30, 30) and first["lake_only"] == 5 and first["pg"] == (0, 0)
    assert first["states"] == ({"next": 30}, None, {"next": 30})
    assert READS == [None, None]  # everywhere: one read for lake and files; lake_only

    # The next run, with more data and the destination fixed: each one resumes from its own state.
    READS.clear()
    results = run(config_for(tmp_path, postgres_db, rows=45, pg_password=postgres_db.password))
    assert all(r.ok for r in results), [r.error for r in results]
    rows = {(r.source, r.destination): r.rows for r in results}
    assert rows[("everywhere", "lake")] == 15 and rows[("everywhere", "pg")] == 45
    assert READS == [{"next": 30}, None, {"next": 5}]  # lake and files together; pg on its own; lake_only
    second = counts(tmp_path, postgres_db)
    assert second["lake"] == (45, 45) and second["pg"] == (45, 45) and second["lake_only"] == 5
    assert second["states"] == ({"next": 45}, {"next": 45}, {"next": 45})
    assert second["pg_has_lake_only"] is False


def test_a_destination_failing_midway_stops_alone_and_its_next_run_resumes_without_duplicates(
        pair, counting_type, tmp_path):
    a, b = pair  # a refuses rows with n >= 25 (a CHECK constraint on its table), in its third commit
    with duckdb.connect(a.settings["path"]) as conn:
        conn.execute("CREATE SCHEMA everywhere; CREATE TABLE everywhere.numbers (n BIGINT CHECK (n < 25), "
                     "_floe_load_id VARCHAR, _floe_loaded_at TIMESTAMPTZ)")
    config = two_destinations(tmp_path, {"everywhere": {"type": "counting", "rows": 45}}, pair)
    started = time.monotonic()
    cli = CliRunner().invoke(cli_app, ["run", "-c", str(tmp_path / "floe.yml")], catch_exceptions=False)
    assert time.monotonic() - started < 10
    assert cli.exit_code == 1, cli.output
    assert "1 of 2 streams failed" in cli.output and "CHECK constraint failed" in cli.output, cli.output
    assert READS == [None]  # one read, which went on for b after a failed
    assert a.column("everywhere", "numbers", "n") == list(range(20)) and a.state("everywhere", "numbers") == {"next": 20}
    assert b.column("everywhere", "numbers", "n") == list(range(45))
    assert not staged_files(tmp_path / "stage")

    with duckdb.connect(a.settings["path"]) as conn:  # the table is fixed
        conn.execute("CREATE TABLE everywhere.fixed AS SELECT * FROM everywhere.numbers; DROP TABLE everywhere.numbers; "
                     "ALTER TABLE everywhere.fixed RENAME TO numbers")
    READS.clear()
    results = by_destination(run(config))
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    assert READS == [{"next": 20}, {"next": 45}]  # a catches up on its own; b reads only what is new
    assert (results["a"].rows, results["b"].rows) == (25, 0)
    assert a.column("everywhere", "numbers", "n") == b.column("everywhere", "numbers", "n") == list(range(45))


# --- commit cadence and backpressure ------------------------------------------------------------------------------
def test_each_destination_keeps_its_own_commit_cadence_on_the_shared_files(pair, counting_type, tmp_path):
    # a folds its checkpoints (DuckDB's commit_rows); b commits each one, except BigQuery, which folds by time.
    config = two_destinations(tmp_path, {"everywhere": {"type": "counting", "rows": 45}}, pair, commit_rows=1000)
    results = by_destination(run(config))
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    assert results["a"].commits == 1
    assert results["b"].commits == (1 if pair[1].kind == "bigquery" else 5)
    assert READS == [None]
    assert pair[0].column("everywhere", "numbers", "n") == pair[1].column("everywhere", "numbers", "n") == list(range(45))
    assert not staged_files(tmp_path / "stage")


class Watched(VersionedRows):
    """VersionedRows that notes, before each batch, how many stage files wait under `stage`."""

    def __init__(self, ids: range, stage: Path) -> None:
        super().__init__(ids, "v1", per_batch=10)
        self.stage, self.waiting = stage, []

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        async for batch in super().read(state):
            self.waiting.append(len(staged_files(self.stage)))
            yield batch


def test_the_read_waits_for_the_slowest_destination(postgres_db, tmp_path):
    stage = tmp_path / "stage"
    fast = DuckDBDestination("fast", DuckDBConfig(path=str(tmp_path / "w.duckdb"), commit_rows=0), Context(tmp_path))
    slow = PostgresDestination("slow", PostgresConfig.model_validate(postgres_db.config()))
    try:
        first = Watched(range(10), stage)
        assert all(r.ok for r in asyncio.run(run_stream_into(OneStreamSource(first), first, [fast, slow], stage)))
        # Another session locks the table in PostgreSQL for a second: its commits wait, the read with them.
        with psycopg.connect(postgres_db.dsn) as lock:
            lock.execute("LOCK TABLE src.items IN ACCESS EXCLUSIVE MODE")
            threading.Timer(1.0, lock.rollback).start()
            stream = Watched(range(10, 110), stage)
            started = time.monotonic()
            results = asyncio.run(run_stream_into(OneStreamSource(stream), stream, [fast, slow], stage))
        assert [(r.error, r.rows, r.commits) for r in results] == [(None, 100, 10), (None, 100, 10)]
        assert time.monotonic() - started >= 1.0
        assert max(stream.waiting) <= 4  # one commit in flight, one queued, one handing over (+ one being written)
        assert fast.query("SELECT count(*), count(DISTINCT id) FROM src.items") == [(110, 110)]
        assert slow.query("SELECT count(*), count(DISTINCT id) FROM src.items") == [(110, 110)]
    finally:
        fast.close()
        slow.close()


# --- full refresh and replace streams ------------------------------------------------------------------------------
class CountedReads(VersionedRows):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        self.reads += 1
        async for batch in super().read(state):
            yield batch


def load_both(pair: tuple[Place, Place], stream: CountedReads, stage: Path, full_refresh: bool = False,
              only_a: bool = False) -> list[Any]:
    source = OneStreamSource(stream)
    source.context = Context(options=RunOptions(full_refresh=full_refresh))
    destinations = [pair[0].open("a")] + ([] if only_a else [pair[1].open("b")])
    try:
        return asyncio.run(run_stream_into(source, stream, destinations, stage))
    finally:
        for destination in destinations:
            destination.close()


@pytest.mark.parametrize("disposition", ["append", "merge"])
def test_a_full_refresh_reads_once_and_replaces_the_rows_in_each_destination(pair, tmp_path, disposition):
    stage = tmp_path / "stage"
    assert load_both(pair, CountedReads(range(5), "v1", disposition), stage, only_a=True)[0].ok  # b is behind
    refresh = CountedReads(range(6), "v2", disposition)
    results = load_both(pair, refresh, stage, full_refresh=True)
    assert [r.error for r in results] == [None, None]
    assert refresh.reads == 1  # a full refresh reads from the start for every destination: one read
    for place in pair:
        assert place.rows("src", "items", "id", "v") == [(i, f"v2-{i}") for i in range(6)], place.kind
        assert place.state("src", "items") == {"next": 6}
    assert not staged_files(stage)


def test_a_replace_stream_replaces_the_rows_in_each_destination(pair, tmp_path):
    stage = tmp_path / "stage"
    assert all(r.ok for r in load_both(pair, CountedReads(range(5), "v1", "replace"), stage))
    second = CountedReads(range(10, 13), "v2", "replace")
    assert all(r.ok for r in load_both(pair, second, stage))
    assert second.reads == 1
    for place in pair:
        assert place.rows("src", "items", "id", "v") == [(i, f"v2-{i}") for i in range(10, 13)], place.kind


# --- SIGKILL ------------------------------------------------------------------------------------------------------
def fullstory_two_destinations(places: tuple[Place, Place], folder: Path, url: str) -> Path:
    """A floe.yml loading six hourly FullStory windows (3,600 events) into both places."""
    config = folder / "floe.yml"
    destinations = {name: {**place.settings, **({"commit_rows": 0} if place.kind == "duckdb" else {})}
                    for name, place in zip("ab", places, strict=True)}
    config.write_text(yaml.safe_dump({
        "sources": {"fs": {"type": "fullstory", "api_key": DEFAULT_API_KEY, "base_url": url,
                           "start_time": "2024-01-01T00:00:00Z", "end_time": "2024-01-01T06:00:00Z",
                           "poll_interval": 0.05}},
        "destinations": destinations, "stage": str(folder / "stage")}))
    return config


def events(place: Place) -> list[tuple[Any, ...]]:
    return place.rows("fs", "events", "IndvId", "SessionId", "PageId", "EventStart", "EventType", "EventPageOffset")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["batch:4", "before-commit:3", "after-commit:5"])
@pytest.mark.parametrize("kinds", [("duckdb", "duckdb"), ("duckdb", "postgres")], ids="+".join)
def test_sigkill_during_a_two_destination_run_then_a_rerun_equals_a_clean_run_in_both(
        kinds, kill_at, fullstory_server, request, tmp_path):
    seed = kill_at  # named in the assertions below, as a random seed would be
    killed = (fresh_place(kinds[0], request, tmp_path / "a"), fresh_place(kinds[1], request, tmp_path / "b"))
    config = fullstory_two_destinations(killed, tmp_path, fullstory_server.url)
    proc = subprocess.run([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, killpoints.KILL_AT: kill_at})
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])

    clean = (fresh_place(kinds[0], request, tmp_path / "clean-a"), fresh_place(kinds[1], request, tmp_path / "clean-b"))
    (tmp_path / "clean").mkdir()
    exports = fullstory_emulator(fullstory_server).created
    before = len(exports)
    assert all(r.ok for r in runner.run(load_config(fullstory_two_destinations(clean, tmp_path / "clean",
                                                                              fullstory_server.url))))
    windows = [(e["start"], e["end"]) for e in exports[before:]]
    assert windows and len(windows) == len(set(windows))  # the clean run exported each window once, for both
    expected = events(clean[0])
    assert len(expected) == len(set(expected)) == 6 * 600 and events(clean[1]) == expected
    assert all(r.ok for r in runner.run(load_config(config))), seed  # the re-run
    for place in killed:
        assert events(place) == expected, (seed, place.kind)  # nothing lost, nothing twice
        versions = place.versions("fs", "events")
        assert versions == list(range(1, len(versions) + 1)), seed
    assert not staged_files(tmp_path / "stage")


# --- helpers of the configuration with three destinations -------------------------------------------------------
def config_for(tmp_path: Path, pg: Any, rows: int, pg_password: str) -> Any:
    return parse_config({
        "stage": str(tmp_path / "stage"),
        "sources": {
            "everywhere": {"type": "counting", "rows": rows},
            "lake_only": {"type": "counting", "rows": 5, "destinations": ["lake"]},
        },
        "destinations": {
            "lake": {"type": "duckdb", "path": str(tmp_path / "lake.duckdb")},
            "pg": pg.config(password=pg_password),
            "files": {"type": "files", "path": str(tmp_path / "files")},
        },
    }, tmp_path / "floe.yml")


def counts(tmp_path: Path, pg: Any) -> dict[str, Any]:
    lake = DuckDBDestination("lake", DuckDBConfig(path=str(tmp_path / "lake.duckdb")))
    pgd = PostgresDestination("pg", PostgresConfig.model_validate(pg.config()))
    files = FilesDestination("files", FilesConfig(path=str(tmp_path / "files")))
    try:
        def pg_count() -> Any:
            exists = pgd.query("SELECT to_regclass('everywhere.numbers') IS NOT NULL")[0][0]
            return pgd.query("SELECT COUNT(*), COUNT(DISTINCT n) FROM everywhere.numbers")[0] if exists else (0, 0)

        return {
            "lake": lake.query("SELECT COUNT(*), COUNT(DISTINCT n) FROM everywhere.numbers")[0],
            "lake_only": lake.query("SELECT COUNT(*) FROM lake_only.numbers")[0][0],
            "pg": pg_count(),
            "states": (lake.get_state("everywhere", "numbers"), pgd.get_state("everywhere", "numbers"),
                       files.get_state("everywhere", "numbers")),
            "pg_has_lake_only": pgd.query("SELECT to_regclass('lake_only.numbers') IS NOT NULL")[0][0],
        }
    finally:
        lake.close()
        pgd.close()


class FillsTheStage(VersionedRows):
    """A replace stream that fills the stage's disk (a file size limit at the stage file's current
    size) once its rows are read, so the stage file cannot be finished."""

    def __init__(self, stage: Path) -> None:
        super().__init__(range(50), "v1", "replace", per_batch=10)
        self.stage = stage

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        async for batch in super().read(state):
            yield batch
        [staged] = staged_files(self.stage)
        resource.setrlimit(resource.RLIMIT_FSIZE, (staged.stat().st_size, resource.RLIM_INFINITY))


def test_a_stage_file_that_cannot_be_finished_fails_every_destination_at_once(request, tmp_path):
    # Two PostgreSQL databases: the database server writes their files, not this process.
    stage = tmp_path / "stage"
    stream = FillsTheStage(stage)
    destinations = [fresh_place("postgres", request, tmp_path / name).open(name) for name in "ab"]
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    try:
        results = asyncio.run(asyncio.wait_for(
            run_stream_into(OneStreamSource(stream), stream, destinations, stage), timeout=10))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, xfsz)
        for destination in destinations:
            destination.close()
    assert [("cannot write" in (r.error or ""), r.commits) for r in results] == [(True, 0), (True, 0)], results
    assert not staged_files(stage)
