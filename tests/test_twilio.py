"""Twilio source end to end: real HTTP against the Twilio emulator, into DuckDB."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from floe.config import parse_config
from floe.engine.stream import Context
from floe.sandbox import twilio as emu
from floe.sources.twilio import TwilioSource

SIZE = 1500
DAYS = 10


def start_twilio(emulator: Any, **options: Any) -> tuple[Any, emu.TwilioSandbox]:
    options.setdefault("size", SIZE)
    options.setdefault("days", DAYS)
    options.setdefault("end", END.isoformat())
    server = emulator(emu.create_app, **options)
    return server, server.app.state.twilio


END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def source_config(server: Any, sandbox: emu.TwilioSandbox, account: int = 0, **extra: Any) -> dict[str, Any]:
    sid, token = sandbox.credentials()[account]
    start = datetime.fromtimestamp(sandbox.start, UTC).date()
    return {"type": "twilio", "account_sid": sid, "auth_token": token, "start_date": start.isoformat(),
            "base_url": server.url, "window_days": 3, **extra}


def ts(value: str | None) -> datetime | None:
    return parsedate_to_datetime(value) if value else None


def expected_calls(sandbox: emu.TwilioSandbox, account: int = 0) -> set[tuple[Any, ...]]:
    lst = sandbox.list(sandbox.credentials()[account][0], "calls")
    out = set()
    for i in range(lst.count):
        r = lst.record(i)
        out.add((r["sid"], r["status"], r["price"], int(r["duration"]) if r["duration"] else None,
                 ts(r["start_time"]), ts(r["end_time"]), r["caller_name"], r["parent_call_sid"]))
    return out


def db_calls(project: Any, schema: str = "tw") -> set[tuple[Any, ...]]:
    rows = project.query(f'SELECT sid, status, price, duration, start_time, end_time, caller_name, parent_call_sid '
                         f'FROM {schema}.calls')
    return set(rows)


def test_first_run_loads_exactly_what_the_emulator_served(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator)
    project = api_project(tw=source_config(server, sandbox))
    results = project.run()
    assert all(r.ok for r in results), [r.error for r in results]
    sid = sandbox.credentials()[0][0]

    calls = db_calls(project)
    assert len(calls) == SIZE and calls == expected_calls(sandbox)
    in_progress = [c for c in calls if c[1] == "in-progress"]
    assert in_progress and all(c[5] is None and c[2] is None and c[3] is None for c in in_progress)  # nulls stay null

    messages = sandbox.list(sid, "messages")
    expected_messages = {(r["sid"], len(r["body"]), int(r["num_segments"]), r["error_code"], ts(r["date_sent"]))
                         for r in map(messages.record, range(messages.count))}
    assert set(project.query("SELECT sid, body_length, num_segments, error_code, date_sent FROM tw.messages")) \
        == expected_messages
    columns = {r[0] for r in project.query("SELECT column_name FROM information_schema.columns "
                                           "WHERE table_schema = 'tw' AND table_name = 'messages'")}
    assert "body" not in columns and "body_length" in columns  # bodies are not stored by default

    assert project.query("SELECT count(*), count(DISTINCT sid) FROM tw.recordings") == [(SIZE // 2, SIZE // 2)]
    numbers = sandbox.list(sid, "incoming_phone_numbers")
    assert project.query("SELECT count(*) FROM tw.incoming_phone_numbers") == [(numbers.count,)]
    first = numbers.record(0)
    assert project.query("SELECT phone_number, capability_mms, voice_caller_id_lookup FROM tw.incoming_phone_numbers "
                         "WHERE sid = ?", (first["sid"],)) == [
        (first["phone_number"], first["capabilities"]["mms"], first["voice_caller_id_lookup"])]

    # pricing: every page of countries (57 countries > the default page of 50), one row per country x number type
    expected_prices = {(iso, p["number_type"], p["base_price"], p["current_price"])
                       for iso, _ in emu.COUNTRIES for p in emu.country_prices(sandbox.seed, iso)}
    assert set(project.query("SELECT iso_country, number_type, base_price, current_price "
                             "FROM tw.pricing_phone_numbers")) == expected_prices
    assert {"US", "ZA", "CI"} <= {r[0] for r in expected_prices}

    for table in ("calls", "messages", "recordings", "incoming_phone_numbers", "pricing_phone_numbers"):
        assert project.query(f"SELECT DISTINCT channel_name FROM tw.{table}") == [("tw",)]
        assert len(project.query(f"SELECT DISTINCT when_retrieved FROM tw.{table}")) == 1
    bookmark = dict((r[1], r[3]) for r in project.states())["calls"]
    newest = max(c[4] for c in calls)
    assert datetime.fromisoformat(__import__("json").loads(bookmark)["bookmark"]) == newest


def test_message_bodies_are_kept_only_when_asked(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator, size=200)
    project = api_project(tw=source_config(server, sandbox, include_message_body=True, streams=["messages"]))
    assert all(r.ok for r in project.run())
    rows = project.query("SELECT body, body_length FROM tw.messages")
    assert len(rows) == 200 and all(len(body) == n for body, n in rows)
    assert any("Zoë" in body for body, _ in rows)


def test_second_run_reads_only_the_lookback_and_new_records_and_merges(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator)
    sid = sandbox.credentials()[0][0]
    project = api_project(tw=source_config(server, sandbox, streams=["calls", "messages"]))
    assert all(r.ok for r in project.run())
    calls = sandbox.list(sid, "calls")
    bookmark = max(calls.time(i) for i in range(calls.count))

    settled = calls.settle(last=40)  # Twilio changes status, price, duration after the fact
    assert settled
    calls.add(25)
    sandbox.list(sid, "messages").add(10)
    sandbox.reset_stats()
    assert all(r.ok for r in project.run())

    since = datetime.fromtimestamp(bookmark, UTC).date() - timedelta(days=1)  # lookback_days: 1, whole days
    since_ts = int(datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp())
    expected_served = calls.count - calls.first_at_or_after(since_ts)
    assert sandbox.served[f"{sid}/calls"] == expected_served < calls.count / 2
    assert project.query("SELECT count(*), count(DISTINCT sid) FROM tw.calls") == [(SIZE + 25, SIZE + 25)]
    assert project.query("SELECT count(*), count(DISTINCT sid) FROM tw.messages") == [(SIZE + 10, SIZE + 10)]
    assert db_calls(project) == expected_calls(sandbox)  # the settled calls carry their new status and price
    changed = calls.record(settled[0])
    assert project.query("SELECT status, price FROM tw.calls WHERE sid = ?", (changed["sid"],)) == [
        ("completed", changed["price"])]


def test_injected_429_5xx_and_truncation_leave_identical_tables(emulator: Any, api_project: Any) -> None:
    clean_server, clean = start_twilio(emulator)
    faulty_server, faulty = start_twilio(emulator, rate_429=0.06, rate_5xx=0.04, truncate_rate=0.03,
                                         retry_after=0)
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
    assert db_calls(project, "acme") == expected_calls(sandbox, 0)
    assert db_calls(project, "globex") == expected_calls(sandbox, 1)
    states = {(r[0], r[1]) for r in project.states()}
    assert states == {("acme", "calls"), ("acme", "recordings"), ("globex", "calls"), ("globex", "recordings")}

    sandbox.list(sid_b, "calls").add(7)  # only the second account gets new data
    sandbox.reset_stats()
    assert all(r.ok for r in project.run(sources=["globex"]))
    assert project.query("SELECT count(*) FROM globex.calls") == [(407,)]
    assert project.query("SELECT count(*) FROM acme.calls") == [(400,)]
    assert set(sandbox.served) <= {f"{sid_b}/calls", f"{sid_b}/recordings"}


def make_source(server: Any, sandbox: emu.TwilioSandbox, **extra: Any) -> TwilioSource:
    config = parse_config({"sources": {"tw": source_config(server, sandbox, **extra)}}).sources["tw"]
    return TwilioSource("tw", config, Context())


def test_backfill_windows_are_contiguous_and_end_open() -> None:
    config = parse_config({"sources": {"tw": {
        "type": "twilio", "account_sid": "AC" + "0" * 32, "auth_token": "x" * 32, "start_date": "2026-01-01",
        "window_days": 7, "lookback_days": 2}}}).sources["tw"]
    stream = TwilioSource("tw", config).streams()[0]
    today = date(2026, 1, 30)
    windows = stream.windows(None, today)
    assert windows[0][0] == date(2026, 1, 1) and windows[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
    assert stream.windows({"bookmark": "2026-01-29T10:00:00+00:00"}, today) == [(date(2026, 1, 27), None)]
    params = stream.params(windows[0])
    assert params == {"StartTime>": "2026-01-01", "StartTime<": "2026-01-08", "PageSize": "1000"}


def test_checkpoints_never_run_ahead_of_loaded_windows(emulator: Any) -> None:
    """Windows are fetched concurrently, yet at every checkpoint each record at or before the bookmark
    has already been yielded: resuming from any committed state never skips a record."""
    server, sandbox = start_twilio(emulator, size=3000)
    source = make_source(server, sandbox, window_days=1, max_concurrency=8, page_size=50, checkpoint_rows=1000)
    stream = source.streams()[0]
    calls = sandbox.list(sandbox.credentials()[0][0], "calls")

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
            covered = {calls.sid(i) for i in range(calls.count) if calls.time(i) <= limit}
            assert covered <= yielded
    final_yielded, final_bookmark = checkpoints[-1]
    assert len(final_yielded) == 3000
    assert int(datetime.fromisoformat(final_bookmark).timestamp()) == max(map(calls.time, range(calls.count)))


@pytest.mark.parametrize("value", ["AC123", "XX" + "0" * 32])
def test_account_sid_is_validated(value: str) -> None:
    from floe.errors import ConfigError

    with pytest.raises(ConfigError, match="sources.tw.account_sid"):
        parse_config({"sources": {"tw": {"type": "twilio", "account_sid": value, "auth_token": "secret-token",
                                         "start_date": "2026-01-01"}}})


DATES = ["Fri, 18 Oct 2019 17:00:00 +0000", "Thu, 29 Feb 2024 23:59:59 -0530", "Mon, 01 Jan 1900 00:00:00 +1400",
         "Sat, 31 Dec 2050 12:34:56 +0000", None]


@pytest.mark.parametrize("extra", [[], ["Fri, 8 Oct 2019 17:00:00 +0000"], ["Tue, 18 Oct 2019 17:00:00 GMT"]],
                         ids=["fixed-layout", "one-digit-day", "named-zone"])
def test_rfc2822_dates_parse_like_the_email_module(extra: list[str]) -> None:
    """The fast fixed-layout decoder and strptime (any other layout) agree with email.utils, nulls stay null."""
    import pyarrow as pa

    from floe.sources.twilio import parse_rfc2822

    values = DATES + extra
    if extra == ["Tue, 18 Oct 2019 17:00:00 GMT"]:  # strptime's %z does not read zone names: a clear error
        from floe.errors import SourceError

        with pytest.raises(SourceError, match="Twilio field date_created: unexpected date format"):
            parse_rfc2822(pa.array(values), "date_created")
        return
    got = parse_rfc2822(pa.array(values).slice(0), "date_created").to_pylist()
    assert got == [ts(v) for v in values]
    assert parse_rfc2822(pa.array(values).slice(1, 2), "x").to_pylist() == [ts(v) for v in values[1:3]]


@pytest.mark.parametrize("bad", ["Fri, 18 Oct 2019 24:00:00 +0000", "Fri, 18 Oct 2019 17:60:00 +0000",
                                 "Fri, 18 Okt 2019 17:00:00 +0000", "Xyz, 18 Oct 2019 17:00:00 +0000"])
def test_impossible_rfc2822_dates_are_errors_not_wrong_timestamps(bad: str) -> None:
    import pyarrow as pa

    from floe.errors import SourceError
    from floe.sources.twilio import parse_rfc2822

    with pytest.raises(SourceError, match="Twilio field start_time"):
        parse_rfc2822(pa.array([DATES[0], bad]), "start_time")
