"""FullStory source against the Segment Export emulator over real HTTP, into DuckDB."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest

from floe.config import load_config
from floe.engine import runner
from floe.errors import ConfigError
from floe.sandbox.fullstory import DEFAULT_API_KEY
from floe.sources.fullstory import BASE_FIELDS, FullStoryConfig, FullStorySource, window_end
from tests.fixtures.fullstory import emulator

KNOWN = {name for name, _ in BASE_FIELDS}


def direct_export(url: str, start: str, end: str) -> list[dict[str, Any]]:
    """The oracle: every event of [start, end) fetched straight from the emulator, parsed with orjson."""
    headers = {"Authorization": f"Basic {DEFAULT_API_KEY}"}
    with httpx.Client(base_url=url, headers=headers) as client:
        op = client.post("/segments/v1/exports", json={
            "segmentId": "everyone", "type": "TYPE_EVENT", "format": "FORMAT_NDJSON",
            "timeRange": {"start": start, "end": end}}).json()["operationId"]
        while (status := client.get(f"/operations/v1/{op}").json())["state"] != "COMPLETED":
            time.sleep(0.02)
        location = client.get(f"/search/v1/exports/{status['results']['searchExportId']}/results").json()["location"]
        body = httpx.get(location).content
    return [orjson.loads(line) for line in gzip.decompress(body).splitlines()]


def table(db: Path) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT IndvId, EventStart, EventType, ReqUrl, CustomVars FROM fs.events "
                           "ORDER BY EventStart, IndvId").fetchall()
    finally:
        con.close()


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def floe_cli(config: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(config), *args],
                          capture_output=True, text=True, cwd=config.parent, timeout=120, **kw)


def run(config: Path) -> list[Any]:
    return runner.run(load_config(config))


@pytest.mark.parametrize(("fmt", "load_every", "commits"), [
    ("FORMAT_NDJSON", "window", 6),
    ("FORMAT_JSON", "window", 6),
    ("FORMAT_NDJSON", "day", 1),
])
def test_every_event_loaded_exactly_once_with_exact_ids_times_and_custom_vars(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path, fmt: str, load_every: str, commits: int
) -> None:
    config = fullstory_config(format=fmt, load_every=load_every)
    [result] = run(config)
    assert result.error is None and result.commits == commits
    assert result.state == {"sync_point": "2024-01-01T06:00:00Z"}

    # One export per window, aligned to the hour; the windows were committed in order.
    created = emulator(fullstory_server).created
    assert sorted(c["start"] for c in created) == [
        f"2024-01-01T{h:02d}:00:00Z" for h in range(6)]
    expected = [e for h in range(6) for e in direct_export(
        fullstory_server.url, f"2024-01-01T{h:02d}:00:00Z", f"2024-01-01T{h + 1:02d}:00:00Z")]
    rows = table(tmp_path / "w.duckdb")
    assert len(rows) == len(expected) == 3600
    for row, event in zip(rows, sorted(expected, key=lambda e: (e["EventStart"], e["IndvId"])), strict=True):
        indv, start, kind, req_url, custom = row
        assert indv == event["IndvId"] and indv > 2**53  # int64 exact: a float64 would have rounded it
        assert start.strftime("%Y-%m-%dT%H:%M:%S.%fZ") == event["EventStart"]  # microseconds kept
        assert kind == event["EventType"] and req_url == event.get("ReqUrl")
        unknown = {k: v for k, v in event.items() if k not in KNOWN}
        assert orjson.loads(custom) == unknown  # numbers compare by value (623.0 == 623)
        assert list(orjson.loads(custom)) == sorted(unknown)  # keys sorted
    points = [r[0] for r in query(tmp_path / "w.duckdb", "SELECT state FROM _floe_state ORDER BY version")]
    assert points == sorted(points) and len(points) == commits
    # Fields FullStory adds later land in CustomVars (unknown) or their own column (known).
    assert query(tmp_path / "w.duckdb", "SELECT count(*) FROM fs.events WHERE "
                 "json_extract_string(CustomVars, '$.EventFutureField') IS NOT NULL AND EventStart < "
                 "'2024-01-01T03:00:00Z'") == [(0,)]
    assert query(tmp_path / "w.duckdb", "SELECT count(*) > 0 FROM fs.events WHERE "
                 "json_extract_string(CustomVars, '$.EventFutureField') IS NOT NULL") == [(True,)]


def test_a_second_run_loads_only_new_windows(fullstory_config: Any, tmp_path: Path) -> None:
    run(fullstory_config(end_time="2024-01-01T02:30:00Z"))
    [result] = run(fullstory_config(end_time="2024-01-01T04:00:00Z"))
    assert result.commits == 2  # 02:30-03:00 (the partial window is finished), 03:00-04:00
    assert query(tmp_path / "w.duckdb", "SELECT count(*), count(DISTINCT (IndvId, EventStart)) FROM fs.events") \
        == [(2400, 2400)]


def test_failed_exports_429s_expired_links_and_cut_downloads_are_retried_to_a_clean_result(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path
) -> None:
    [clean] = run(fullstory_config(db="clean.duckdb"))
    assert clean.error is None
    faults = emulator(fullstory_server).faults
    faults.rate_limit_every, faults.retry_after = 7, 1
    faults.fail_operations, faults.expire_links, faults.cut_downloads = 2, 2, 1
    [result] = run(fullstory_config(db="faulty.duckdb"))
    assert result.error is None
    assert (faults.fail_operations, faults.expire_links, faults.cut_downloads) == (0, 0, 0)  # all were hit
    assert table(tmp_path / "faulty.duckdb") == table(tmp_path / "clean.duckdb")


def test_a_truncated_gzip_fails_its_window_keeps_earlier_ones_and_a_rerun_completes(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path
) -> None:
    run(fullstory_config(db="clean.duckdb"))
    run(fullstory_config(end_time="2024-01-01T02:00:00Z"))
    emulator(fullstory_server).faults.truncate_downloads = 1
    config = fullstory_config(prefetch=1)
    first = floe_cli(config)
    assert first.returncode != 0
    assert "truncated" in first.stderr + first.stdout
    assert DEFAULT_API_KEY not in first.stderr + first.stdout
    # The window 02:00-03:00 failed: nothing of it is committed, the two before it stay.
    assert query(tmp_path / "w.duckdb", "SELECT count(*), max(EventStart) < '2024-01-01T02:00:00Z' "
                 "FROM fs.events") == [(1200, True)]
    assert floe_cli(config).returncode == 0
    assert table(tmp_path / "w.duckdb") == table(tmp_path / "clean.duckdb")


def test_sigkill_mid_window_then_restart_loses_and_duplicates_nothing(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path
) -> None:
    emu = emulator(fullstory_server)
    emu.events_per_hour = 20000  # windows big enough to be killed inside one
    run(fullstory_config(db="clean.duckdb"))
    config = fullstory_config(prefetch=1)
    downloads = emu.downloads
    proc = subprocess.Popen([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(config)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while emu.downloads < downloads + 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    try:
        partial = query(tmp_path / "w.duckdb", "SELECT count(*) FROM fs.events")[0][0]
    except duckdb.CatalogException:  # on a loaded machine the kill can come before the first commit
        partial = 0
    assert partial < 6 * 20000 and partial % 20000 == 0  # whole windows only
    assert floe_cli(config).returncode == 0
    assert table(tmp_path / "w.duckdb") == table(tmp_path / "clean.duckdb")


def test_reloading_from_a_time_as_docs_fullstory_md_says(fullstory_config: Any, tmp_path: Path) -> None:
    # The refresh replaces the events from start_time on, in one commit; the earlier events stay.
    run(fullstory_config(db="clean.duckdb"))
    run(fullstory_config())
    assert floe_cli(fullstory_config(start_time="2024-01-01T03:00:00Z"), "--full-refresh").returncode == 0
    assert table(tmp_path / "w.duckdb") == table(tmp_path / "clean.duckdb")


def test_known_fields_enabled_later_become_columns(fullstory_config: Any, tmp_path: Path) -> None:
    run(fullstory_config(end_time="2024-01-01T01:00:00Z"))
    assert query(tmp_path / "w.duckdb", "SELECT count(*) FROM information_schema.columns "
                 "WHERE table_name = 'events' AND column_name = 'AppName'") == [(0,)]
    assert query(tmp_path / "w.duckdb", "SELECT count(*) > 0 FROM fs.events "
                 "WHERE json_extract_string(CustomVars, '$.AppName') = 'Shop'") == [(True,)]
    run(fullstory_config(end_time="2024-01-01T02:00:00Z", include_mobile_fields=True))
    rows = query(tmp_path / "w.duckdb", "SELECT EventStart >= '2024-01-01T01:00:00Z', count(AppName), "
                 "count(json_extract_string(CustomVars, '$.AppName')) FROM fs.events GROUP BY 1 ORDER BY 1")
    assert rows[0][1:] == (0, rows[0][2]) and rows[0][2] > 0  # the first hour keeps AppName in CustomVars
    assert rows[1][1] > 0 and rows[1][2] == 0  # later rows have the column


@pytest.mark.parametrize(("key", "value", "message"), [
    ("export_duration", "7m", "between 15m and 24h"),
    ("export_duration", "5h", "must divide 24h"),
    ("export_duration", "soon", "not a duration"),
    ("export_delay", "10m", "at least 1h"),
])
def test_bad_durations_are_config_errors_naming_the_key(key: str, value: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "floe.yml"
    path.write_text(f"sources:\n  fs:\n    type: fullstory\n    api_key: k\n    {key}: {value}\n"
                    "destinations:\n  w:\n    type: duckdb\n")
    with pytest.raises(ConfigError, match=f"sources.fs.{key}: .*{message}"):
        load_config(path)


def test_windows_align_to_the_duration_and_next_due_adds_the_delay() -> None:
    config = FullStoryConfig(api_key="k", start_time=datetime(2024, 1, 1, 0, 20, tzinfo=UTC),
                             export_duration="30m", export_delay="2h")
    source = FullStorySource("fs", config)
    stream = source.streams()[0]
    now = datetime(2024, 1, 1, 3, 45, tzinfo=UTC)
    windows = stream.windows(None, now)  # type: ignore[attr-defined]
    assert [(s.strftime("%H:%M"), e.strftime("%H:%M")) for s, e in windows] == [
        ("00:20", "00:30"), ("00:30", "01:00"), ("01:00", "01:30")]
    assert source.next_due({"events": {"sync_point": "2024-01-01T01:30:00Z"}}, now) == datetime(
        2024, 1, 1, 4, 0, tzinfo=UTC)
    assert window_end(datetime(2024, 1, 1, 23, 59, tzinfo=UTC), timedelta(hours=6)) == datetime(
        2024, 1, 2, tzinfo=UTC)


# Strings that need escaping, in a known column (EventTargetText) and in a custom var (user_label_str).
EVENTS = [{"IndvId": 2**62 + i, "EventStart": f"2024-01-01T00:00:0{i}.123456789Z", "EventType": "click",
           "EventTargetText": t, "evt_x.y_real": i / 2, "page_tags": ["a", i], "user_note": None, "user_label_str": t}
          for i, t in enumerate(['a "quoted" },{ brace', "line\nbreak", "{json-ish}", "plain", "tab\there",
                                 "back\\slash é ✓"])]


@pytest.mark.parametrize("layout", ["ndjson", "array per line", "array minified", "array pretty"])
@pytest.mark.parametrize("chunk", [40, 1 << 20])
def test_export_files_parse_the_same_in_every_layout_and_chunking(tmp_path: Path, layout: str, chunk: int) -> None:
    from floe.sources.fullstory_export import ExportReader

    reader_schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    if layout == "ndjson":
        body = b"\n".join(orjson.dumps(e) for e in EVENTS) + b"\n"
    elif layout == "array per line":
        body = b"[\n" + b",\n".join(orjson.dumps(e) for e in EVENTS) + b"\n]"
    elif layout == "array minified":
        body = orjson.dumps(EVENTS)
    else:
        body = orjson.dumps(EVENTS, option=orjson.OPT_INDENT_2)
    path = tmp_path / "export.gz"
    path.write_bytes(gzip.compress(body[:40]) + gzip.compress(body[40:]))  # two gzip members, as some writers do
    fmt = "FORMAT_NDJSON" if layout == "ndjson" else "FORMAT_JSON"
    rows = [r for b in ExportReader(reader_schema, fmt, chunk_bytes=chunk).batches(path) for r in b.to_pylist()]
    assert [r["IndvId"] for r in rows] == [e["IndvId"] for e in EVENTS]
    assert [r["EventTargetText"] for r in rows] == [e["EventTargetText"] for e in EVENTS]
    assert rows[0]["EventStart"].microsecond == 123456  # nanoseconds truncated to microseconds
    assert [orjson.loads(r["CustomVars"]) for r in rows] == [
        {"evt_x.y_real": e["evt_x.y_real"], "page_tags": e["page_tags"], "user_label_str": e["user_label_str"]}
        for e in EVENTS]


def test_a_known_field_that_does_not_fit_its_column_is_an_error_naming_it(tmp_path: Path) -> None:
    from floe.errors import SourceError
    from floe.sources.fullstory_export import ExportReader

    path = tmp_path / "export.gz"
    path.write_bytes(gzip.compress(b'{"IndvId": 1, "PageNumEvents": 1099511627776}\n'))  # 2**40: not an int32
    reader_schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    with pytest.raises(SourceError, match="field PageNumEvents is not a int32"):
        list(ExportReader(reader_schema, "FORMAT_NDJSON").batches(path))


@pytest.mark.parametrize("body", [b'{"IndvId": 1}\n', gzip.compress(b'{"IndvId": 1}\n')[:10] + b"\xff" * 40])
def test_a_file_that_is_not_gzip_is_an_error(tmp_path: Path, body: bytes) -> None:
    from floe.errors import SourceError
    from floe.sources.fullstory_export import ExportReader

    path = tmp_path / "export.gz"
    path.write_bytes(body)
    reader_schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    with pytest.raises(SourceError, match="not valid gzip"):
        list(ExportReader(reader_schema, "FORMAT_NDJSON").batches(path))


def test_known_fields_first_met_in_a_later_chunk_keep_their_declared_types(tmp_path: Path) -> None:
    """The reader declares to the JSON parser only known fields it has met; one that shows up late,
    in a form inference would mistype (a whole-number float, a timestamp, a small int), still gets
    its declared type, in this file and in the next one read by the same reader."""
    from floe.sources.fullstory_export import ExportReader

    early = [{"IndvId": i, "EventType": "click"} for i in range(50)]
    late = [{"IndvId": 50 + i, "EventCumulativeLayoutShift": 1, "UserCreated": "2024-01-01T00:00:00Z",
             "PageNumEvents": 7, "custom_int": 3} for i in range(3)]
    path = tmp_path / "export.gz"
    # One gzip member per event: the reader inflates member by member, so chunks stay small.
    path.write_bytes(b"".join(gzip.compress(orjson.dumps(e) + b"\n") for e in early + late))
    schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    reader = ExportReader(schema, "FORMAT_NDJSON", chunk_bytes=256)
    for _ in range(2):
        batches = list(reader.batches(path))
        assert len(batches) > 2 and all(b.schema.equals(schema) for b in batches)
        rows = [r for b in batches for r in b.to_pylist()]
        assert [r["IndvId"] for r in rows] == list(range(53))
        last = rows[-1]
        assert last["EventCumulativeLayoutShift"] == 1.0 and isinstance(last["EventCumulativeLayoutShift"], float)
        assert last["UserCreated"] == datetime(2024, 1, 1, tzinfo=UTC) and last["PageNumEvents"] == 7
        assert orjson.loads(last["CustomVars"]) == {"custom_int": 3}
        assert rows[0]["UserCreated"] is None and orjson.loads(rows[0]["CustomVars"]) == {}


@pytest.mark.parametrize("path_taken", ["vectorised", "row by row"])
def test_known_fields_match_case_insensitively_like_hauser(tmp_path: Path, path_taken: str) -> None:
    """`pageurl` is the PageUrl column and `EVENTSTART` the EventStart one, not custom vars."""
    from floe.sources.fullstory_export import ExportReader

    extra = {"page_mixed": ["a", 1]} if path_taken == "row by row" else {}  # pyarrow cannot type this list
    events = [{"IndvId": 1, "pageurl": "https://a.example/x", "EVENTSTART": "2024-01-01T00:00:00.5Z",
               "user_plan_str": "pro", **extra},
              {"IndvId": 2, "PageUrl": "https://a.example/y", "EventStart": "2024-01-01T00:00:01Z", **extra}]
    path = tmp_path / "export.gz"
    path.write_bytes(gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in events)))
    schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    rows = [r for b in ExportReader(schema, "FORMAT_NDJSON").batches(path) for r in b.to_pylist()]
    assert [r["PageUrl"] for r in rows] == ["https://a.example/x", "https://a.example/y"]
    assert [r["EventStart"] for r in rows] == [datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC),
                                               datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC)]
    assert orjson.loads(rows[0]["CustomVars"]) == {"user_plan_str": "pro", **extra}
    assert orjson.loads(rows[1]["CustomVars"]) == extra


@pytest.mark.parametrize(("fmt", "body"), [
    ("FORMAT_JSON", b'[{"IndvId": 1},\n{"IndvId": 2}'),
    ("FORMAT_JSON", b'[{"IndvId": 1},{"IndvId": 2, "EventType": "cl'),
])
def test_a_cut_array_is_an_error(tmp_path: Path, fmt: str, body: bytes) -> None:
    from floe.errors import SourceError
    from floe.sources.fullstory_export import ExportReader

    path = tmp_path / "export.gz"
    path.write_bytes(gzip.compress(body))
    reader_schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    with pytest.raises(SourceError, match="truncated"):
        list(ExportReader(reader_schema, fmt).batches(path))


def test_a_wrong_api_key_fails_with_the_status_and_url_and_never_shows_the_key(
    fullstory_config: Any, tmp_path: Path
) -> None:
    result = floe_cli(fullstory_config(api_key="wrong-key-123456"))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "HTTP 401" in output and "invalid API key" in output and "/segments/v1/exports" in output
    assert "wrong-key-123456" not in output
