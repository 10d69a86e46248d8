"""Twilio source end to end: real HTTP against the Twilio emulator, into DuckDB."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pytest

from floe.config import parse_config
from floe.core.errors import ConfigError, SourceError
from floe.core.stream import Context
from floe.sandbox import twilio as emu
from floe.sources.twilio import TwilioSource
from floe.sources.twilio_records import RECORDINGS, PageParser, parse_rfc2822

SIZE = 1500
DAYS = 10
HOUR, DAY = 3600, 86400
END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
CURSOR = {"calls": "start_time", "messages": "date_sent", "recordings": "date_created"}
COMPARED = {  # the columns compared with what the emulator serves now
    "calls": ("sid", "status", "price", "duration", "start_time", "end_time", "answered_by", "queue_time",
              "caller_name", "parent_call_sid", "date_updated", "group_sid", "trunk_sid"),
    "messages": ("sid", "status", "price", "date_sent", "error_code", "num_segments", "num_media", "date_updated",
                 "messaging_service_sid"),
    "recordings": ("sid", "status", "price", "duration", "date_created", "channels", "date_updated"),
}
DATES = {"start_time", "end_time", "date_sent", "date_created", "date_updated"}
COUNTS = {"duration", "queue_time", "num_segments", "num_media"}


def start_twilio(emulator: Any, **options: Any) -> tuple[Any, emu.TwilioSandbox]:
    options.setdefault("size", SIZE)
    options.setdefault("days", DAYS)
    options.setdefault("end", END.isoformat())
    server = emulator(emu.create_app, **options)
    return server, server.app.state.twilio


def source_config(server: Any, sandbox: emu.TwilioSandbox, account: int = 0, **extra: Any) -> dict[str, Any]:
    sid, token = sandbox.credentials()[account]
    start = datetime.fromtimestamp(sandbox.start, UTC).date()
    return {"type": "twilio", "account_sid": sid, "auth_token": token, "start_date": start.isoformat(),
            "base_url": server.url, "window_days": 3, **extra}


def ts(value: str | None) -> datetime | None:
    return parsedate_to_datetime(value) if value else None


def served_row(record: dict[str, Any], stream: str) -> tuple[Any, ...]:
    """The compared columns of a record as served (a field the record lacks: None)."""
    return tuple(ts(record.get(c)) if c in DATES else int(record[c]) if c in COUNTS and record.get(c)
                 else Decimal(record[c]) if c == "price" and record.get(c) else record.get(c)
                 for c in COMPARED[stream])


def truth(sandbox: emu.TwilioSandbox, stream: str, account: int = 0) -> set[tuple[Any, ...]]:
    """Every record of a list as the emulator serves it now."""
    lst = sandbox.list(sandbox.credentials()[account][0], stream)
    return {served_row(record, stream) for record in lst.records()}


def loaded(project: Any, stream: str, schema: str = "tw") -> set[tuple[Any, ...]]:
    rows = project.query(f"SELECT {', '.join(COMPARED[stream])} FROM {schema}.{stream}")
    assert len(rows) == len({r[0] for r in rows}), f"{stream}: a sid loaded twice"
    return set(rows)


def without_cursor(rows: set[tuple[Any, ...]], stream: str) -> set[tuple[Any, ...]]:
    at = COMPARED[stream].index(CURSOR[stream])
    return {r for r in rows if r[at] is None}


def test_first_run_loads_exactly_what_the_emulator_serves(emulator: Any, api_project: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    server, sandbox = start_twilio(emulator)
    project = api_project(tw=source_config(server, sandbox))
    with caplog.at_level("WARNING", logger="floe.sources.twilio"):
        results = project.run()
    assert all(r.ok for r in results), [r.error for r in results]
    sid = sandbox.credentials()[0][0]

    for stream in ("calls", "messages", "recordings"):
        assert loaded(project, stream) == truth(sandbox, stream), stream
    # sparse records: some calls lack group_sid and trunk_sid (loaded NULL) and carry a field floe does not know
    served = sandbox.list(sid, "calls").records()
    assert any("trunk_sid" not in r for r in served) and any("trunk_sid" in r for r in served)
    unknown = [r.getMessage() for r in caplog.records if "event=unknown_fields" in r.getMessage()]
    assert unknown == ["event=unknown_fields stream=calls fields=annotation: Twilio sent fields floe does not load"]
    encrypted = {(r["sid"], r["encryption_details"]["encryption_cek"])
                 for r in sandbox.list(sid, "recordings").records() if r["encryption_details"]}
    assert encrypted and set(project.query(
        "SELECT sid, json_extract_string(encryption_details, '$.encryption_cek') FROM tw.recordings "
        "WHERE encryption_details IS NOT NULL")) == encrypted
    calls = truth(sandbox, "calls")
    assert {"canceled", "failed"} <= {r[1] for r in without_cursor(calls, "calls")} <= {"queued", "canceled", "failed"}
    assert {r[1] for r in without_cursor(truth(sandbox, "messages"), "messages")} >= {"canceled", "failed"}
    assert any(r[1] == "deleted" for r in truth(sandbox, "recordings"))  # listed with IncludeSoftDeleted
    busy = [r for r in calls if r[1] == "busy"]
    assert busy and all(r[2] is None and r[3] is None and r[5] is not None for r in busy)  # nulls stay null
    columns = {r[0] for r in project.query("SELECT column_name FROM information_schema.columns "
                                           "WHERE table_schema = 'tw' AND table_name = 'messages'")}
    assert "body" not in columns and "body_length" in columns  # bodies are not stored by default

    numbers = sandbox.list(sid, "incoming_phone_numbers")
    assert project.query("SELECT count(*) FROM tw.incoming_phone_numbers") == [(numbers.count,)]
    first = numbers.record(0)
    assert project.query("SELECT phone_number, capability_mms, voice_caller_id_lookup, beta, sms_application_sid "
                         "FROM tw.incoming_phone_numbers WHERE sid = ?", (first["sid"],)) == [
        (first["phone_number"], first["capabilities"]["mms"], first["voice_caller_id_lookup"], first["beta"], "")]

    # pricing: every page of countries (57 countries > the default page of 50), one row per country x number type
    expected_prices = {(iso, p["number_type"], Decimal(p["base_price"]), Decimal(p["current_price"]))
                       for iso, _ in emu.COUNTRIES for p in emu.country_prices(sandbox.seed, iso)}
    assert set(project.query("SELECT iso_country, number_type, base_price, current_price "
                             "FROM tw.pricing_phone_numbers")) == expected_prices
    assert {"US", "ZA", "CI"} <= {r[0] for r in expected_prices}

    for table in ("calls", "messages", "recordings", "incoming_phone_numbers", "pricing_phone_numbers"):
        assert project.query(f"SELECT DISTINCT channel_name FROM tw.{table}") == [("tw",)]
        assert len(project.query(f"SELECT DISTINCT when_retrieved FROM tw.{table}")) == 1
    state = json.loads(dict((r[1], r[3]) for r in project.states())["calls"])
    newest = max(r[4] for r in calls if r[4] is not None)
    assert datetime.fromisoformat(state["bookmark"]) == newest
    # the next sweeps start from the newest call any of this run's sweeps saw (not the oldest of their newest)
    swept = [ts(r["date_created"]) for r in served if r["status"] in ("queued", "canceled", "failed")]
    assert datetime.fromisoformat(state["swept_to"]) == max(swept)  # type: ignore[type-var]


def test_message_bodies_are_kept_only_when_asked(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator, size=200)
    project = api_project(tw=source_config(server, sandbox, include_message_body=True, streams=["messages"]))
    assert all(r.ok for r in project.run())
    rows = project.query("SELECT body, body_length FROM tw.messages")
    assert len(rows) == 200 and all(len(body) == n for body, n in rows)
    assert any("Zoë" in body for body, _ in rows)


@pytest.mark.parametrize("sweep", [True, False], ids=["swept", "not-swept"])
def test_rows_without_a_cursor_are_loaded_and_merged_once_they_get_one(emulator: Any, api_project: Any,
                                                                       sweep: bool) -> None:
    """Calls still queued or never started, messages scheduled or never sent: the date filters never
    return them (the emulator, like Twilio, leaves null dates out), the sweep does; once they start or
    are sent, the windows return them and the merge replaces the earlier row."""
    server, sandbox = start_twilio(emulator, size=3000, days=5)
    calls = sandbox.list(sandbox.credentials()[0][0], "calls")
    held = next(j for j in range(calls.count, calls.count + 20_000)  # the next call queued for half an hour
                if (calls.timeline(j)[1] or 0) - calls.time(j) > 1800)
    sandbox.advance(calls.time(held) + 60 - sandbox.now)  # ... is in the queue now
    project = api_project(tw=source_config(server, sandbox, streams=["calls", "messages"], null_cursor_rows=sweep))
    assert all(r.ok for r in project.run())
    before = {stream: without_cursor(truth(sandbox, stream), stream) for stream in ("calls", "messages")}
    assert {r[1] for r in before["calls"]} == {"queued", "canceled", "failed"}
    assert {r[1] for r in before["messages"]} >= {"scheduled", "canceled", "failed"}
    for stream in ("calls", "messages"):
        expected = truth(sandbox, stream)
        assert loaded(project, stream) == (expected if sweep else expected - before[stream])

    sandbox.advance(3 * HOUR)  # queued calls start, scheduled messages go out, new rows arrive
    assert all(r.ok for r in project.run())
    for stream in ("calls", "messages"):
        now = {r[0]: r for r in truth(sandbox, stream)}
        started = {r[0] for r in before[stream] if now[r[0]][COMPARED[stream].index(CURSOR[stream])] is not None}
        assert started, stream
        rows = loaded(project, stream)  # each sid once
        if sweep:
            assert rows == set(now.values())
        else:
            assert started <= {r[0] for r in rows} and rows == set(now.values()) - without_cursor(set(now.values()),
                                                                                               stream)


@pytest.mark.slow
def test_a_row_pending_beyond_the_lookback_is_swept_until_it_is_final(emulator: Any, api_project: Any) -> None:
    """A message scheduled days ahead and canceled days later (older than the re-read by then) ends
    `canceled`: the sweep reaches back to the oldest row that was still pending."""
    server, sandbox = start_twilio(emulator, size=6000, days=2)
    project = api_project(tw=source_config(server, sandbox, streams=["messages"], lookback_days=0))
    lst = sandbox.list(sandbox.credentials()[0][0], "messages")
    assert all(r.ok for r in project.run())
    for _ in range(4):
        sandbox.advance(DAY)
        assert all(r.ok for r in project.run())
    canceled = [i for i, record in enumerate(lst.records()) if record["status"] == "canceled"]
    late = [i for i in canceled if lst.timeline(i)[0].events[-1][0] - lst.time(i) > 2 * DAY]
    assert late  # canceled more than two days after it was created: long out of the lookback
    statuses = dict(project.query("SELECT sid, status FROM tw.messages"))
    assert {statuses[lst.sid(i)] for i in canceled} == {"canceled"}
    assert "pending_since" in json.loads(project.states()[-1][3])


@pytest.mark.slow
def test_the_default_lookback_catches_late_changes_that_one_day_missed(emulator: Any, api_project: Any) -> None:
    """Prices and delivery receipts arrive hours to days later (the emulator's delays: see
    floe.sandbox.twilio_data). Runs every two days: the default re-read catches every change,
    `lookback_days: 1` keeps rows that changed later than that as they first were."""
    server, sandbox = start_twilio(emulator, size=3000)
    streams = ["calls", "messages"]
    default = api_project(tw=source_config(server, sandbox, streams=streams))
    one_day = api_project(tw=source_config(server, sandbox, streams=streams, lookback_days=1))
    for step in range(4):
        if step:
            sandbox.advance(2 * DAY)
        assert all(r.ok for r in default.run()) and all(r.ok for r in one_day.run())
    for stream in streams:
        expected = truth(sandbox, stream)
        assert loaded(default, stream) == expected
        stale = loaded(one_day, stream) - expected
        price = COMPARED[stream].index("price")
        now = {r[0]: r for r in expected}
        assert any(r[price] is None and now[r[0]][price] is not None for r in stale), stream  # priced late
        if stream == "messages":
            assert any(r[1] == "sent" and now[r[0]][1] in ("delivered", "undelivered") for r in stale)


def test_second_run_reads_only_the_lookback_and_new_records_and_merges(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator)
    sid = sandbox.credentials()[0][0]
    project = api_project(tw=source_config(server, sandbox, streams=["calls", "messages"], page_size=100))
    assert all(r.ok for r in project.run())
    calls, messages = sandbox.list(sid, "calls"), sandbox.list(sid, "messages")
    states = {r[1]: json.loads(r[3]) for r in project.states()}
    bookmark = states["calls"]["bookmark"]
    assert datetime.fromisoformat(states["messages"]["swept_to"]) == max(ts(r["date_created"]) for r in
                                                                         messages.records())

    sandbox.advance(6 * HOUR)  # new calls; existing ones end, get priced
    sandbox.reset_stats()
    assert all(r.ok for r in project.run())
    first_day = (datetime.fromisoformat(bookmark) - timedelta(days=7)).date().isoformat()  # lookback_days: 7
    windows = [r["params"] for r in sandbox.requests if r["kind"] == "calls" and "StartTime>" in r["params"]]
    assert windows and min(p["StartTime>"] for p in windows) == first_day
    assert sandbox.served[f"{sid}/calls"] < calls.count  # the lookback, the new calls and the sweep's pages
    # the messages' sweep reads what arrived since the previous sweep (an hour's margin), to the first
    # page created entirely before that
    since = datetime.fromisoformat(states["messages"]["swept_to"]) - timedelta(hours=1)
    arrived = sum(1 for r in messages.records() if ts(r["date_created"]) >= since)  # type: ignore[operator]
    swept = sum(r["records"] for r in sandbox.requests if r["kind"] == "messages" and "DateSent>" not in r["params"])
    assert arrived <= swept <= arrived + 2 * 100
    for stream in ("calls", "messages"):
        assert loaded(project, stream) == truth(sandbox, stream)


def test_injected_429_5xx_and_truncation_leave_identical_tables(emulator: Any, api_project: Any) -> None:
    clean_server, clean = start_twilio(emulator)
    faulty_server, faulty = start_twilio(emulator, rate_429=0.06, rate_5xx=0.04, truncate_rate=0.03,
                                         retry_after=0)  # Twilio sends no Retry-After; "0" keeps the test fast
    a = api_project(tw=source_config(clean_server, clean, page_size=100))
    b = api_project(tw=source_config(faulty_server, faulty, page_size=100))
    assert all(r.ok for r in a.run())
    assert all(r.ok for r in b.run()), [r.error for r in b.run()]
    injected = faulty_server.app.state.faults.injected
    assert injected["429"] > 0 and injected["5xx"] > 0 and injected["truncate"] > 0
    for table, key in (("calls", "sid"), ("messages", "sid"), ("recordings", "sid"),
                       ("incoming_phone_numbers", "sid"), ("pricing_phone_numbers", "iso_country, number_type")):
        query = (f"SELECT * EXCLUDE (when_retrieved, _floe_load_id, _floe_loaded_at) FROM tw.{table} "
                 f"ORDER BY {key}")
        rows_a, rows_b = a.query(query), b.query(query)
        assert rows_a and rows_a == rows_b, table


def test_wrong_auth_token_fails_clearly_and_keeps_earlier_data_and_state(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator, size=300)
    good = source_config(server, sandbox)
    project = api_project(tw_main=good)
    assert all(r.ok for r in project.run())
    before_rows = project.query("SELECT count(*) FROM tw_main.calls")
    before_state = project.states()

    wrong = "0123456789abcdef0123456789abcdef"
    project.sources["tw_main"] = {**good, "auth_token": wrong}
    result = project.cli("run")
    assert result.exit_code != 0
    errors = result.stderr + result.stdout
    assert "tw_main" in errors and "HTTP 401" in errors
    assert "Your AccountSid or AuthToken was incorrect." in errors
    # One error, not one per stream: the first request alone judged the token, the rest never went out.
    final = [line for line in errors.splitlines() if line.startswith("error: ")]
    assert len(final) == 1 and "5 of 5 streams failed: tw_main: HTTP 401" in final[0]
    assert "other errors" not in final[0]
    assert wrong not in errors and wrong not in str(project.query("SELECT error FROM main._floe_loads"))
    assert project.query("SELECT count(*) FROM tw_main.calls") == before_rows
    assert project.states() == before_state


def test_several_accounts_load_into_their_own_schemas_with_their_own_state(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator, size=400, accounts=2)
    (sid_a, _), (sid_b, _) = sandbox.credentials()
    project = api_project(acme=source_config(server, sandbox, 0, streams=["calls", "recordings"]),
                          globex=source_config(server, sandbox, 1, streams=["calls", "recordings"]))
    assert all(r.ok for r in project.run())
    assert project.query("SELECT DISTINCT account_sid, channel_name FROM acme.calls") == [(sid_a, "acme")]
    assert project.query("SELECT DISTINCT account_sid, channel_name FROM globex.calls") == [(sid_b, "globex")]
    assert loaded(project, "calls", "acme") == truth(sandbox, "calls", 0)
    assert loaded(project, "calls", "globex") == truth(sandbox, "calls", 1)
    states = {(r[0], r[1]) for r in project.states()}
    assert states == {("acme", "calls"), ("acme", "recordings"), ("globex", "calls"), ("globex", "recordings")}

    sandbox.advance(DAY)  # both accounts get new calls; only the second is loaded
    sandbox.reset_stats()
    assert all(r.ok for r in project.run(sources=["globex"]))
    assert loaded(project, "calls", "globex") == truth(sandbox, "calls", 1)
    assert project.query("SELECT count(*) FROM acme.calls") == [(400,)]
    assert set(sandbox.served) <= {f"{sid_b}/calls", f"{sid_b}/recordings"}


def make_source(server: Any, sandbox: emu.TwilioSandbox, **extra: Any) -> TwilioSource:
    config = parse_config({"sources": {"tw": source_config(server, sandbox, **extra)}}).sources["tw"]
    return TwilioSource("tw", config, Context())


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def test_windows_are_contiguous_end_open_and_split_a_short_range_for_concurrency() -> None:
    config = parse_config({"sources": {"tw": {
        "type": "twilio", "account_sid": "AC" + "0" * 32, "auth_token": "x" * 32, "start_date": "2026-01-01",
        "window_days": 7, "lookback_days": 2}}}).sources["tw"]
    stream = TwilioSource("tw", config).streams()[0]
    now = datetime(2026, 1, 30, 10, 20, tzinfo=UTC)
    windows = stream.windows(None, now)
    assert windows[0][0] == midnight(date(2026, 1, 1)) and windows[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
    # a backfill of 30 days: whole days, about half as many windows as are read at once (8), window_days at most
    assert {b - a for a, b in windows[:-1]} == {timedelta(days=7)} and len(windows) == 5
    # a shorter one: fewer days a window
    weeks = stream.windows({"bookmark": "2026-01-19T10:00:00+00:00"}, datetime(2026, 2, 1, 10, 20, tzinfo=UTC))
    assert {b - a for a, b in weeks[:-1]} == {timedelta(days=4)} and len(weeks) == 4
    # a daily run re-reads 2 days before the bookmark: fewer than two days per request, so whole hours,
    # about two windows per request in flight
    daily = stream.windows({"bookmark": "2026-01-29T10:00:00+00:00"}, now)
    assert daily[0][0] == midnight(date(2026, 1, 27)) and daily[-1] == (datetime(2026, 1, 30, 6, tzinfo=UTC), None)
    assert {b - a for a, b in daily[:-1]} == {timedelta(hours=6)} and len(daily) == 14
    params = stream.params(windows[0])
    assert params == {"StartTime>": "2026-01-01", "StartTime<": "2026-01-08", "PageSize": "1000"}
    recordings = TwilioSource("tw", config).streams()[2]
    assert recordings.params(windows[-1]) == {"DateCreated>": windows[-1][0].date().isoformat(),
                                              "PageSize": "1000", "IncludeSoftDeleted": "true"}


def test_a_range_shorter_than_the_windows_read_at_once_is_split_by_the_hour() -> None:
    """A daily run without lookback reads one day: in whole-hour windows, about two per request in
    flight (max_concurrency), with date-time filter values in Twilio's own spelling."""
    config = parse_config({"sources": {"tw": {
        "type": "twilio", "account_sid": "AC" + "0" * 32, "auth_token": "x" * 32, "start_date": "2026-01-01",
        "lookback_days": 0, "max_concurrency": 8}}}).sources["tw"]
    stream = TwilioSource("tw", config).streams()[0]
    now = datetime(2026, 1, 30, 23, 40, tzinfo=UTC)
    windows = stream.windows({"bookmark": "2026-01-30T01:00:00+00:00"}, now)
    assert [w[0].hour for w in windows] == list(range(0, 24, 2)) and windows[-1][1] is None
    assert stream.params(windows[3]) == {"StartTime>": "Fri, 30 Jan 2026 06:00:00 +0000",
                                         "StartTime<": "Fri, 30 Jan 2026 08:00:00 +0000", "PageSize": "1000"}
    assert stream.params(windows[0])["StartTime>"] == "2026-01-30"


def test_a_short_range_read_in_hour_windows_loads_each_row_once(
        emulator: Any, api_project: Any) -> None:
    """A daily run re-reading a day and today (fewer days than windows read at once) reads them in
    hour windows: date-time filters the emulator honours as Twilio's examples show, every row once."""
    server, sandbox = start_twilio(emulator, size=4000, days=2)
    project = api_project(tw=source_config(server, sandbox, streams=["calls"], page_size=100))
    assert all(r.ok for r in project.run())
    state = json.loads(project.states()[-1][3])
    sandbox.advance(6 * HOUR)
    project.sources["tw"]["lookback_days"] = 1
    sandbox.reset_stats()
    assert all(r.ok for r in project.run())
    windows = [r for r in sandbox.requests if "StartTime>" in r["params"] and "Page" not in r["params"]]
    assert len(windows) >= 4 and any(":" in r["params"]["StartTime>"] for r in windows), windows
    pages = [r for r in sandbox.requests if "StartTime>" in r["params"]]
    assert len(pages) > 1.5 * len(windows)  # several pages per window, windows read at once
    bookmark = datetime.fromisoformat(state["bookmark"])
    reread = midnight(bookmark.date() - timedelta(days=1))
    now, served = loaded(project, "calls"), truth(sandbox, "calls")
    assert {r[0] for r in now} == {r[0] for r in served}
    at = COMPARED["calls"].index("start_time")
    assert {r for r in now if r[at] and r[at] >= reread} == {r for r in served if r[at] and r[at] >= reread}
    assert datetime.fromisoformat(json.loads(project.states()[-1][3])["bookmark"]) > bookmark


def test_a_daily_run_keeps_max_concurrency_requests_in_flight(emulator: Any, api_project: Any) -> None:
    """Each window has one request in flight, so as many windows as `max_concurrency` are read at once;
    a day is cut into more hour windows than that, so the hours holding the calls are read side by side
    (whatever the time of day: yesterday since midnight and today so far)."""
    server, sandbox = start_twilio(emulator, size=3000, days=1, latency=0.05)
    project = api_project(tw=source_config(server, sandbox, streams=["calls"], page_size=50, max_concurrency=4,
                                           null_cursor_rows=False))  # no sweeps: only windows
    assert all(r.ok for r in project.run())
    assert server.app.state.faults.most_in_flight == 4
    windows = [r for r in sandbox.requests if "Page" not in r["params"]]
    assert len(windows) > 4, windows  # 7 to 9 hour windows, by the hour of the day the test runs at
    started = COMPARED["calls"].index("start_time")
    assert {r[0] for r in loaded(project, "calls")} == {r[0] for r in truth(sandbox, "calls") if r[started]}


def most_windows_open(requests: list[dict[str, Any]]) -> int:
    """The most windows, over all streams, between their first and last request at one point of the log
    (a window: a stream and the lower bound of its date filter)."""
    keys = [(r["kind"], tuple(sorted((k, v) for k, v in r["params"].items() if k.endswith(">")))) for r in requests]
    first: dict[Any, int] = {}
    last: dict[Any, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
        last[key] = i
    return max(sum(first[w] <= i <= last[w] for w in first) for i in range(len(keys)))


def test_the_streams_of_a_source_share_the_windows_read_at_once(emulator: Any, api_project: Any) -> None:
    """Calls, messages and recordings are read at once, yet at most `max_concurrency` of their windows
    are being read at a time (each stream alone could read that many), so pages do not pile up."""
    server, sandbox = start_twilio(emulator, size=3000, days=1, latency=0.02)
    streams = ["calls", "messages", "recordings"]
    project = api_project(tw=source_config(server, sandbox, streams=streams, page_size=50, max_concurrency=4,
                                           null_cursor_rows=False))  # no sweeps: only windows, which take slots
    assert all(r.ok for r in project.run())
    assert {r["kind"] for r in sandbox.requests} == set(streams)
    assert most_windows_open(sandbox.requests) == 4


def test_a_run_stopped_among_concurrent_windows_commits_a_bookmark_its_rows_cover(emulator: Any,
                                                                                  api_project: Any) -> None:
    """Every request after the first 60 (of ~90) is refused (403) while windows are read at once: what was
    committed holds every row up to the committed bookmark, and the next run ends with each row once."""
    server, sandbox = start_twilio(emulator, size=4000, days=8)  # ~10 pages a day, two days read at once
    project = api_project(tw=source_config(server, sandbox, streams=["calls"], window_days=1, page_size=50,
                                           checkpoint_rows=1000, max_concurrency=2))
    server.app.state.faults.update({"refuse_after": 60})
    results = project.run()
    assert [r.ok for r in results] == [False] and "HTTP 403: Forbidden (code 20403)" in str(results[0].error)
    bookmark = datetime.fromisoformat(json.loads(project.states()[-1][3])["bookmark"])
    cursors = {r[0]: r[4] for r in truth(sandbox, "calls")}
    stored = {r[0] for r in loaded(project, "calls")}
    assert bookmark < max(c for c in cursors.values() if c) and stored < set(cursors)  # stopped midway
    assert {sid for sid, cursor in cursors.items() if cursor is not None and cursor <= bookmark} <= stored
    server.app.state.faults.update({"refuse_after": -1})
    project.sources["tw"]["page_size"] = 1000
    assert all(r.ok for r in project.run())
    assert loaded(project, "calls") == truth(sandbox, "calls")


def test_checkpoints_never_run_ahead_of_loaded_windows(emulator: Any) -> None:
    """Windows are fetched concurrently, yet at every checkpoint each record at or before the bookmark
    has already been yielded: resuming from any committed state never skips a record."""
    server, sandbox = start_twilio(emulator, size=3000)
    source = make_source(server, sandbox, window_days=1, max_concurrency=8, page_size=50, checkpoint_rows=1000)
    stream = source.streams()[0]
    calls = sandbox.list(sandbox.credentials()[0][0], "calls")
    cursors = {calls.sid(i): calls.meta(i)[0] for i in range(calls.count)}

    async def collect() -> list[tuple[set[str], str | None]]:
        yielded: set[str] = set()
        out = []
        try:
            async for batch in stream.read(None):
                if batch.records is not None:
                    yielded.update(batch.records.column("sid").to_pylist())
                if batch.checkpoint is not None:
                    out.append((set(yielded), batch.checkpoint.get("bookmark")))
        finally:
            await source.aclose()
        return out

    checkpoints = asyncio.run(collect())
    assert len(checkpoints) >= 3
    for yielded, bookmark in checkpoints:
        if bookmark is not None:
            limit = int(datetime.fromisoformat(bookmark).timestamp())
            assert {s for s, c in cursors.items() if c is not None and c <= limit} <= yielded
    final_yielded, final_bookmark = checkpoints[-1]
    assert final_yielded == set(cursors)  # the ones without a start_time too
    assert int(datetime.fromisoformat(final_bookmark).timestamp()) == max(c for c in cursors.values() if c)


def test_the_emulator_filters_like_twilio(emulator: Any) -> None:
    """Null dates never match a date filter; `Status` filters calls; soft-deleted recordings need
    IncludeSoftDeleted; `DateSent<=` includes its day, `StartTime<=` does not; a bad Status is a 400."""
    server, sandbox = start_twilio(emulator, size=3000)
    sid, token = sandbox.credentials()[0]

    def sids(resource: str, **params: str) -> list[str]:
        found, url = [], f"/2010-04-01/Accounts/{sid}/{resource}.json"
        with httpx.Client(base_url=server.url, auth=(sid, token)) as client:
            next_uri: str | None = url
            query: dict[str, str] | None = {**params, "PageSize": "200"}
            while next_uri:
                page = client.get(next_uri, params=query).raise_for_status().json()
                found += [r["sid"] for r in page[resource.lower()]]
                next_uri, query = page["next_page_uri"], None
        return found

    calls, messages = sandbox.list(sid, "calls"), sandbox.list(sid, "messages")
    day = (END - timedelta(days=3)).date()
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    started = {calls.sid(i) for i in range(calls.count) if (calls.meta(i)[0] or 0) >= start}
    assert set(sids("Calls", **{"StartTime>": day.isoformat()})) == started
    canceled = sids("Calls", Status="canceled")
    assert canceled and all(calls.record(calls.index_of(s) or 0)["start_time"] is None for s in canceled)
    assert not set(canceled) & set(sids("Calls", **{"StartTime<": END.date().isoformat()}))
    sent_that_day = {messages.sid(i) for i in range(messages.count)
                     if start <= (messages.meta(i)[0] or 0) < start + DAY}
    assert sent_that_day and set(sids("Messages", **{"DateSent<": day.isoformat(), "DateSent>": day.isoformat()})) \
        == sent_that_day  # "on and before": the day itself
    assert not set(sids("Calls", **{"StartTime<": day.isoformat(), "StartTime>": day.isoformat()}))
    everything, listed = sids("Recordings", IncludeSoftDeleted="true"), sids("Recordings")
    recordings = sandbox.list(sid, "recordings")
    deleted = {s for s in everything if recordings.record(recordings.index_of(s) or 0)["status"] == "deleted"}
    assert deleted and set(listed) == set(everything) - deleted
    response = httpx.get(f"{server.url}/2010-04-01/Accounts/{sid}/Calls.json", params={"Status": "done"},
                         auth=(sid, token))
    assert response.status_code == 400 and response.json()["code"] == 20001


def test_fields_only_some_records_carry_are_reported_and_missing_ones_load_null(
        caplog: pytest.LogCaptureFixture) -> None:
    """An unknown field (or nested key) in any record of a page is named once per run, never dropped
    silently; a record without a documented field gets NULL."""
    parser = PageParser("recordings", RECORDINGS, "tw", END, False)
    page = orjson.dumps({"recordings": [
        {"sid": "RE1", "status": "completed", "encryption_details": None},
        {"sid": "RE2", "track": "both", "encryption_details": {"encryption_cek": "k", "encryption_algorithm": "aes"}},
    ]})
    with caplog.at_level("WARNING", logger="floe.sources.twilio"):
        batch = parser.parse(page)[0]
        parser.parse(page)
    assert [r.getMessage() for r in caplog.records] == [
        "event=unknown_fields stream=recordings fields=encryption_details.encryption_algorithm,track: "
        "Twilio sent fields floe does not load"]
    assert batch.select(["sid", "status", "price"]).to_pylist() == [
        {"sid": "RE1", "status": "completed", "price": None}, {"sid": "RE2", "status": None, "price": None}]
    assert batch.column("encryption_details").to_pylist()[1]["encryption_cek"] == "k"


@pytest.mark.parametrize("value", ["AC123", "XX" + "0" * 32])
def test_account_sid_is_validated(value: str) -> None:
    with pytest.raises(ConfigError, match="sources.tw.account_sid"):
        parse_config({"sources": {"tw": {"type": "twilio", "account_sid": value, "auth_token": "secret-token",
                                         "start_date": "2026-01-01"}}})


RFC_DATES = ["Fri, 18 Oct 2019 17:00:00 +0000", "Thu, 29 Feb 2024 23:59:59 -0530", "Mon, 01 Jan 1900 00:00:00 +1400",
             "Sat, 31 Dec 2050 12:34:56 +0000", None]


@pytest.mark.parametrize("extra", [[], ["Fri, 8 Oct 2019 17:00:00 +0000"], ["Tue, 18 Oct 2019 17:00:00 GMT"]],
                         ids=["fixed-layout", "one-digit-day", "named-zone"])
def test_rfc2822_dates_parse_like_the_email_module(extra: list[str]) -> None:
    """The fast fixed-layout decoder and strptime (any other layout) agree with email.utils, nulls stay null."""
    values = RFC_DATES + extra
    if extra == ["Tue, 18 Oct 2019 17:00:00 GMT"]:  # strptime's %z does not read zone names: a clear error
        with pytest.raises(SourceError, match="Twilio field date_created: unexpected date format"):
            parse_rfc2822(pa.array(values), "date_created")
        return
    got = parse_rfc2822(pa.array(values).slice(0), "date_created").to_pylist()
    assert got == [ts(v) for v in values]
    assert parse_rfc2822(pa.array(values).slice(1, 2), "x").to_pylist() == [ts(v) for v in values[1:3]]


@pytest.mark.parametrize("bad", ["Fri, 18 Oct 2019 24:00:00 +0000", "Fri, 18 Oct 2019 17:60:00 +0000",
                                 "Fri, 18 Okt 2019 17:00:00 +0000", "Xyz, 18 Oct 2019 17:00:00 +0000"])
def test_impossible_rfc2822_dates_are_errors_not_wrong_timestamps(bad: str) -> None:
    with pytest.raises(SourceError, match="Twilio field start_time"):
        parse_rfc2822(pa.array([RFC_DATES[0], bad]), "start_time")
