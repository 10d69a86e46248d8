"""Bounded backfill end to end: `floe run --from DATE --to DATE` re-reads exactly those days.

An append stream's rows of the range are replaced in one commit (FullStory, Singular); a merge
stream's are upserted (Twilio). The committed state stays what it was (a new version of it notes the
backfill), the stream's lease is taken as by any run, a kill leaves the old rows, and a stream that
cannot re-read a range of days refuses before anything loads.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from floe.config import parse_config
from floe.core.errors import ConfigError
from floe.core.stream import DayRange, RunOptions
from floe.engine import runner
from floe.sandbox import singular as singular_emu
from floe.sandbox.fullstory import DEFAULT_API_KEY, create_app
from floe.sandbox.server import RunningServer, serve_in_thread
from tests.fixtures.destinations import Place, place_of
from tests.test_singular import start as start_singular
from tests.test_singular import stored

TODAY = datetime.now(UTC).date()
DIMS = ["app", "source", "os", "country_field", "adn_campaign_name"]
SINGULAR_COLUMNS = ("reporting_date", *DIMS, "adn_impressions")


def project(place: Place, sources: dict[str, Any]) -> Path:
    """A floe.yml loading `sources` into `place` (destination `w`); its path."""
    path = place.base / "floe.yml"
    path.write_text(yaml.safe_dump({"sources": sources, "destinations": {"w": place.settings},
                                    "stage": str(place.base / "stage")}, sort_keys=False))
    return path


def run(path: Path, first: date | None = None, last: date | None = None, **kwargs: Any) -> list[Any]:
    options = RunOptions(backfill=DayRange(first, last) if first and last else None)
    results = runner.run(parse_config(yaml.safe_load(path.read_text()), path), options=options, **kwargs)
    assert [r.error for r in results] == [None] * len(results)
    return results


def state_log(place: Place, source: str, stream: str) -> list[Any]:
    dest = place.open()
    try:
        return dest.state_log(source, stream)
    finally:
        dest.close()


# --- Singular: an append stream of daily reports ---------------------------------------------------
def singular_rows(sandbox: singular_emu.SingularSandbox, days: list[date]) -> list[tuple[Any, ...]]:
    """The rows the emulator serves now for `days` (every day golden: values do not depend on the retrieval)."""
    return [(day, *combo, stored("adn_impressions", sandbox.cell("adn_impressions", day, combo, 1)))
            for day in days for combo in sandbox.combinations(DIMS)]


def loaded_singular(place: Place) -> list[tuple[Any, ...]]:
    return [(r[0] if isinstance(r[0], date) else date.fromisoformat(str(r[0])[:10]), *r[1:])
            for r in place.rows("ads", "campaign_stats", *SINGULAR_COLUMNS)]


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "bigquery", "files"])
def test_a_backfill_of_middle_days_replaces_their_rows_once_with_the_new_values(kind, emulator, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    server, sandbox = start_singular(emulator, rows_per_day=6, settle_days=0)
    end = TODAY - timedelta(days=10)
    days = [end - timedelta(days=k) for k in range(6, -1, -1)]
    path = project(place, {"ads": {"type": "singular", "api_key": "sandbox-singular-api-key",
                                   "base_url": f"{server.url}/api", "lookback_days": 6, "end_date": end.isoformat(),
                                   "poll_interval": 0.01}})
    run(path)
    before = loaded_singular(place)
    assert sorted(before) == sorted(singular_rows(sandbox, days))
    state, versions = place.state("ads", "campaign_stats"), place.versions("ads", "campaign_stats")

    sandbox.seed = 2  # Singular restates its numbers (and the rows' dimensions) for every day
    first, last = days[2], days[4]
    [result] = run(path, first, last)
    assert result.rows == 3 * 6
    middle = set(days[2:5])
    expected = [r for r in before if r[0] not in middle] + singular_rows(sandbox, days[2:5])
    assert sorted(loaded_singular(place)) == sorted(expected)  # each row once: the range's new rows, the rest as before
    assert place.state("ads", "campaign_stats") == state  # the bookmark did not move
    assert place.versions("ads", "campaign_stats") == [*versions, versions[-1] + 1]
    latest = state_log(place, "ads", "campaign_stats")[0]
    assert latest.action == "backfill" and latest.state == state
    assert latest.details["backfill"] == {"from": first.isoformat(), "to": last.isoformat()}

    sandbox.seed = 1
    run(path, first, last)  # again: the same rows replace themselves, nothing doubles
    assert sorted(loaded_singular(place)) == sorted(before)


# --- FullStory: an append stream of daily exports, below its sync point -------------------------------
EVENT = ("IndvId", "SessionId", "PageId", "EventStart", "EventType", "EventPageOffset")
DAY1 = date(2024, 1, 1)


@pytest.fixture
def fullstory(fullstory_cache: Path) -> Any:
    """A FullStory emulator with 60 events an hour (its state: `.app.state.fullstory`)."""
    with serve_in_thread(create_app(events_per_hour=60, cache_dir=str(fullstory_cache))) as server:
        yield server


def fullstory_project(place: Place, server: RunningServer, days: int = 3, first: date = DAY1, **extra: Any) -> Path:
    """Daily exports of `days` days from `first`."""
    start = datetime.combine(first, datetime.min.time(), UTC)
    return project(place, {"fs": {"type": "fullstory", "api_key": DEFAULT_API_KEY, "base_url": server.url,
                                  "start_time": start.isoformat(), "end_time": (start + timedelta(days=days)).isoformat(),
                                  "export_duration": "24h", "poll_interval": 0.02, **extra}})


def events(place: Place) -> list[tuple[Any, ...]]:
    return [(*r[:3], r[3].astimezone(UTC) if isinstance(r[3], datetime) else r[3], *r[4:])
            for r in place.rows("fs", "events", *EVENT)]


def on_day(rows: list[tuple[Any, ...]], days: set[date]) -> list[tuple[Any, ...]]:
    return [r for r in rows if r[3].date() in days]


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_a_fullstory_backfill_replaces_the_days_events_and_keeps_the_sync_point(kind, fullstory, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    path = fullstory_project(place, fullstory)
    run(path)
    before, state = events(place), place.state("fs", "events")
    assert state == {"sync_point": "2024-01-04T00:00:00Z"} and len(before) == 3 * 24 * 60

    fullstory.app.state.fullstory.seed = 7  # FullStory's export of that day now holds other events
    [result] = run(path, date(2024, 1, 2), date(2024, 1, 2))
    middle = {date(2024, 1, 2)}
    (tmp_path / "fresh").mkdir()
    fresh = place_of("duckdb", request, tmp_path / "fresh")
    run(fullstory_project(fresh, fullstory, days=1, first=date(2024, 1, 2)))  # what a load of it gets now
    after = events(place)
    assert result.rows == 24 * 60
    assert Counter(after) == Counter(on_day(before, {DAY1, date(2024, 1, 3)}) + events(fresh))
    assert on_day(after, middle) != on_day(before, middle)
    assert place.state("fs", "events") == state
    assert state_log(place, "fs", "events")[0].action == "backfill"


def test_a_snake_case_source_backfills_by_its_renamed_column(fullstory, request, tmp_path):
    place = place_of("duckdb", request, tmp_path)
    path = fullstory_project(place, fullstory, days=2, naming="snake_case")
    run(path)
    before = place.rows("fs", "events", "indv_id", "session_id", "page_id", "event_start", "event_type", "event_page_offset")
    fullstory.app.state.fullstory.seed = 7
    [result] = run(path, date(2024, 1, 2), date(2024, 1, 2))
    after = place.rows("fs", "events", "indv_id", "session_id", "page_id", "event_start", "event_type", "event_page_offset")
    assert result.rows == 24 * 60 and len(after) == len(before) == 2 * 24 * 60  # replaced, not appended
    assert after != before


def test_a_fullstory_backfill_past_the_sync_point_or_of_nothing_loaded_is_refused(fullstory, request, tmp_path):
    place = place_of("duckdb", request, tmp_path)
    path = fullstory_project(place, fullstory)
    config = parse_config(yaml.safe_load(path.read_text()), path)
    options = RunOptions(backfill=DayRange(date(2024, 1, 1), date(2024, 1, 2)))
    [never] = runner.run(config, options=options)
    assert never.error == ("fs.events: --from/--to re-reads days already loaded, and nothing is loaded yet: run it "
                           "without --from/--to first")
    run(path)
    rows = events(place)
    late = RunOptions(backfill=DayRange(date(2024, 1, 3), date(2024, 1, 4)))
    [past] = runner.run(config, options=late)
    assert past.error == ("fs.events: --to 2024-01-04 reaches past the sync point 2024-01-04T00:00:00Z (events up "
                          "to it are loaded): backfill up to the day before it, and let a run without --from/--to "
                          "load the newer events")
    assert events(place) == rows and place.state("fs", "events") == {"sync_point": "2024-01-04T00:00:00Z"}


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_a_backfill_killed_before_its_commit_leaves_the_old_rows_and_state(kind, fullstory, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    path = fullstory_project(place, fullstory, prefetch=1)  # one export at a time: the kill lands mid-range
    run(path)
    before, versions = events(place), place.versions("fs", "events")
    emulator = fullstory.app.state.fullstory
    emulator.seed, emulator.processing_seconds = 9, 1.0
    proc = subprocess.Popen([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(path),
                             "--from", "2024-01-01", "--to", "2024-01-02"], cwd=path.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr or []:
        seen.append(line)
        if "event=fullstory_window" in line:  # the first day is staged, the others are not read yet
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(seen)
    assert events(place) == before  # nothing of the backfill, every old row
    assert place.versions("fs", "events") == versions
    emulator.processing_seconds = 0.0
    run(path, DAY1, date(2024, 1, 2))  # the lease is free again; the backfill goes through
    after = events(place)
    assert len(after) == len(before) and on_day(after, {DAY1}) != on_day(before, {DAY1})
    assert on_day(after, {date(2024, 1, 3)}) == on_day(before, {date(2024, 1, 3)})


# --- Twilio: merge streams upsert the range; end_date bounds a load ---------------------------------------
@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_a_twilio_backfill_upserts_the_range_and_end_date_bounds_the_load(kind, emulator, request, tmp_path):
    from tests.test_twilio import COMPARED, DAY, served_row, source_config, start_twilio

    place = place_of(kind, request, tmp_path)
    server, sandbox = start_twilio(emulator, size=1500, days=6)
    end_date = TODAY - timedelta(days=1)
    stop = datetime.combine(TODAY, datetime.min.time(), UTC)
    path = project(place, {"tw": source_config(server, sandbox, streams=["calls"], page_size=200,
                                               end_date=end_date.isoformat())})
    at = COMPARED["calls"].index("start_time")
    calls = sandbox.list(sandbox.credentials()[0][0], "calls")

    def served(first: datetime, end: datetime) -> set[tuple[Any, ...]]:
        rows = {served_row(record, "calls") for record in calls.records()}
        return {r for r in rows if r[at] is not None and first <= r[at] < end}

    def loaded() -> list[tuple[Any, ...]]:
        return [tuple(v.astimezone(UTC) if isinstance(v, datetime) else v for v in row)
                for row in place.rows("tw", "calls", *COMPARED["calls"])]

    run(path)
    before = loaded()
    assert len({r[0] for r in before}) == len(before)
    started = [r for r in before if r[at] is not None]
    assert started and max(r[at] for r in started) < stop  # nothing after end_date
    assert set(started) == served(datetime(1970, 1, 1, tzinfo=UTC), stop)
    state = place.state("tw", "calls")

    sandbox.advance(2 * DAY)  # the calls of the last days end and get priced; newer calls arrive
    first, last = TODAY - timedelta(days=2), end_date
    start = datetime.combine(first, datetime.min.time(), UTC)
    run(path, first, last)
    after = loaded()
    assert len({r[0] for r in after}) == len(after) == len(before)  # upserted on sid: each call once
    inside = [r for r in after if r[at] is not None and start <= r[at] < stop]
    assert set(inside) == served(start, stop)  # the range as Twilio serves it now
    assert set(inside) != {r for r in before if r[at] is not None and start <= r[at] < stop}
    assert [r for r in after if r not in inside] == [r for r in before if r[at] is None or not start <= r[at] < stop]
    assert place.state("tw", "calls") == state


# --- refusals -----------------------------------------------------------------------------------------------
def test_streams_that_cannot_backfill_refuse_before_anything_loads(tmp_path):
    from floe.sandbox.sailthru import ExportSpec, generate

    export = tmp_path / "export"
    generate(export, ExportSpec(days=1, profiles=20))
    place = place_of("duckdb", None, tmp_path)  # type: ignore[arg-type]
    path = project(place, {
        "st": {"type": "sailthru", "path": str(export), "salt": "pepper-for-tests-7731"},
        "tw": {"type": "twilio", "account_sid": "AC" + "0" * 32, "auth_token": "x" * 32, "start_date": "2026-01-01",
               "base_url": "http://127.0.0.1:9"}})
    config = parse_config(yaml.safe_load(path.read_text()), path)
    days = RunOptions(backfill=DayRange(date(2026, 1, 1), date(2026, 1, 2)))
    with pytest.raises(ConfigError) as sailthru:
        runner.run(config, sources=["st"], options=days)
    assert str(sailthru.value).startswith("--from/--to: none of the selected streams can be backfilled (st.")
    with pytest.raises(ConfigError) as numbers:
        runner.run(config, streams=["tw.calls", "tw.incoming_phone_numbers"], options=days)
    assert str(numbers.value).startswith("--from/--to: tw.incoming_phone_numbers cannot be backfilled: floe "
                                         "re-reads a range of days only from the time-windowed sources")
    assert not place.base.joinpath("w.duckdb").exists()  # nothing was even opened

    cli = subprocess.run([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(path),
                          "--from", "2026-01-02"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines()[-1] == (
        "error: --from and --to go together: the first and the last day to backfill (YYYY-MM-DD)")


# --- SQL tables with a date or timestamp replication key ------------------------------------------------------
def test_a_sql_table_backfills_by_its_timestamp_key_and_one_with_a_number_key_refuses(postgres_db, request, tmp_path):
    import psycopg

    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.readings (at timestamptz, v text); "
                     "CREATE TABLE app.counters (n bigint, v text); INSERT INTO app.counters VALUES (1, 'a'); "
                     "INSERT INTO app.readings SELECT TIMESTAMPTZ '2026-01-01 00:00+00' + h * INTERVAL '1 hour', "
                     "'old' FROM generate_series(0, 71) h")
    place = place_of("duckdb", request, tmp_path)
    path = project(place, {"db": {"type": "sql", "url": postgres_db.url, "schema": "app", "tables": [
        {"name": "readings", "replication_key": "at"}, {"name": "counters", "replication_key": "n"}]}})
    run(path)
    state = place.state("db", "readings")
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("UPDATE app.readings SET v = 'new' WHERE at >= '2026-01-02' AND at < '2026-01-03'")
    run(path, date(2026, 1, 2), date(2026, 1, 2), streams=["db.readings"])
    values = Counter(place.column("db", "readings", "v"))
    assert values == {"old": 48, "new": 24}  # the day's 24 rows replaced, once each
    assert place.state("db", "readings") == state
    config = parse_config(yaml.safe_load(path.read_text()), path)
    [past] = runner.run(config, streams=["db.readings"], options=RunOptions(backfill=DayRange(date(2026, 1, 3),
                                                                                              date(2026, 1, 3))))
    assert past.error.startswith("sources.db: table readings (appended, no primary key) is loaded up to at = "
                                 "2026-01-03T23:00:00+00:00: --to 2026-01-03 must end before it")
    with pytest.raises(ConfigError, match="db.counters cannot be backfilled"):
        runner.run(config, streams=["db.counters"], options=RunOptions(backfill=DayRange(date(2026, 1, 1),
                                                                                         date(2026, 1, 1))))
