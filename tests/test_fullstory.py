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
from floe.core.errors import ConfigError
from floe.engine import runner
from floe.infra import killpoints
from floe.sandbox.fullstory import DEFAULT_API_KEY
from floe.sources.fullstory import BASE_FIELDS, FullStoryConfig, FullStorySource, window_end
from tests.fixtures.fullstory import emulator, hauser_shaped_windows

KNOWN = {name for name, _ in BASE_FIELDS}
BY_LOWER = {name.lower(): name for name in KNOWN}


def direct_export(url: str, start: str, end: str, fields: list[str] | None = None) -> list[dict[str, Any]]:
    """The oracle: every event of [start, end) fetched straight from the emulator, parsed with orjson."""
    headers = {"Authorization": f"Basic {DEFAULT_API_KEY}"}
    with httpx.Client(base_url=url, headers=headers) as client:
        op = client.post("/segments/v1/exports", json={
            "segmentId": "everyone", "type": "TYPE_EVENT", "format": "FORMAT_NDJSON",
            "timeRange": {"start": start, "end": end}, **({"fields": fields} if fields else {})}).json()["operationId"]
        while (status := client.get(f"/operations/v1/{op}").json())["state"] != "COMPLETED":
            time.sleep(0.02)
        location = client.get(f"/search/v1/exports/{status['results']['searchExportId']}/results").json()["location"]
        body = httpx.get(location).content
    return [orjson.loads(line) for line in gzip.decompress(body).splitlines()]


def split(event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An exported event as (its known fields by column name, whatever else it carries with a value)."""
    known = {BY_LOWER[k.lower()]: v for k, v in event.items() if k.lower() in BY_LOWER}
    return known, {k: v for k, v in event.items() if k.lower() not in BY_LOWER and v is not None}


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


LEGACY_AND_NEW = ["EventTargetSelectorTok", "EventFutureField"]


@pytest.mark.parametrize(("fmt", "load_every", "commits", "extra_fields"), [
    ("FORMAT_NDJSON", "window", 6, []),
    ("FORMAT_JSON", "window", 6, LEGACY_AND_NEW),  # windows alternate: one element per line, one minified line
    ("FORMAT_NDJSON", "day", 1, LEGACY_AND_NEW),
])
def test_every_event_loaded_exactly_once_with_exact_ids_times_and_custom_vars(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path, fmt: str, load_every: str, commits: int,
    extra_fields: list[str]
) -> None:
    config = fullstory_config(format=fmt, load_every=load_every, **({"extra_fields": extra_fields} if extra_fields else {}))
    [result] = run(config)
    assert result.error is None and result.commits == commits
    assert result.state == {"sync_point": "2024-01-01T06:00:00Z"}

    # One export per window, aligned to the hour, each asking for hauser's fields plus the extra ones.
    fields = FullStoryConfig(api_key="k", extra_fields=extra_fields).export_fields
    assert {"user_*", "evt_*", "page_*", "IndvId", "PageNumEvents", *extra_fields} <= set(fields)
    created = emulator(fullstory_server).created
    assert sorted(c["start"] for c in created) == [f"2024-01-01T{h:02d}:00:00Z" for h in range(6)]
    assert all(c["fields"] == fields for c in created)
    expected = [e for h in range(6) for e in direct_export(
        fullstory_server.url, f"2024-01-01T{h:02d}:00:00Z", f"2024-01-01T{h + 1:02d}:00:00Z", fields)]
    columns = ["IndvId", "UserId", "EventStart", "EventType", "EventTargetText", "UserAppKey", "PageUrl", "ReqUrl",
               "PageNumEvents", "CustomVars"]
    rows = query(tmp_path / "w.duckdb", f"SELECT {', '.join(columns)} FROM fs.events ORDER BY EventStart, IndvId")
    assert len(rows) == len(expected) == 3600
    without_vars = 0
    for values, event in zip(rows, sorted(expected, key=lambda e: (e["EventStart"], e["IndvId"])), strict=True):
        row = dict(zip(columns, values, strict=True))
        known, unknown = split(event)
        assert row["IndvId"] == known["IndvId"] and row["IndvId"] > 2**53  # exact: a float64 would round it
        assert row["UserId"] == known["UserId"]  # also when sent as `USERID`
        assert row["EventStart"].strftime("%Y-%m-%dT%H:%M:%S.%fZ") == known["EventStart"]  # microseconds kept
        for name in ("EventType", "EventTargetText", "UserAppKey", "PageUrl", "ReqUrl", "PageNumEvents"):
            assert row[name] == known.get(name), name  # '' stays '', absent and null are NULL
        assert orjson.loads(row["CustomVars"]) == unknown  # numbers by value (623.0 == 623), big ints exact
        assert list(orjson.loads(row["CustomVars"])) == sorted(unknown)  # keys sorted
        without_vars += row["CustomVars"] == "{}"
    assert without_vars > 1000  # most events carry no custom var (nor anything else unknown)
    points = [r[0] for r in query(tmp_path / "w.duckdb", "SELECT state FROM _floe_state ORDER BY version")]
    assert points == sorted(points) and len(points) == commits
    # Fields asked for that no column holds land in CustomVars: the legacy selector on some events,
    # a field FullStory adds later from 03:00 on. Fields not asked for are not exported.
    for name in LEGACY_AND_NEW:
        before, after = query(tmp_path / "w.duckdb", f"SELECT count(*) FILTER (WHERE EventStart < '2024-01-01T03:00:00Z'), "
                              f"count(*) FILTER (WHERE EventStart >= '2024-01-01T03:00:00Z') FROM fs.events "
                              f"WHERE json_extract_string(CustomVars, '$.{name}') IS NOT NULL")[0]
        if name not in extra_fields:
            assert before == after == 0
        else:
            assert after > 0 and (before > 0) == (name == "EventTargetSelectorTok")


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
    emu = emulator(fullstory_server)
    emu.faults.truncate_downloads = 1
    config = fullstory_config(prefetch=1)
    first = floe_cli(config)
    assert first.returncode != 0
    [export] = [e for e in emu.exports.values() if e.start == datetime(2024, 1, 1, 2, tzinfo=UTC)][-1:]
    assert (f"fs: window 2024-01-01T02:00:00Z..2024-01-01T03:00:00Z, export {export.id}: export file is truncated"
            in first.stderr + first.stdout)
    assert DEFAULT_API_KEY not in first.stderr + first.stdout
    # The window 02:00-03:00 failed: nothing of it is committed, the two before it stay.
    assert query(tmp_path / "w.duckdb", "SELECT count(*), max(EventStart) < '2024-01-01T02:00:00Z' "
                 "FROM fs.events") == [(1200, True)]
    assert floe_cli(config).returncode == 0
    assert table(tmp_path / "w.duckdb") == table(tmp_path / "clean.duckdb")


@pytest.mark.parametrize(("kill_at", "windows_kept"), [
    ("batch:1", 0), ("before-commit:1", 0), ("before-commit:3", 2), ("after-commit:2", 2)])
def test_sigkill_mid_window_then_restart_loses_and_duplicates_nothing(
    kill_at: str, windows_kept: int, fullstory_server: Any, fullstory_config: Any, tmp_path: Path
) -> None:
    emu = emulator(fullstory_server)
    emu.events_per_hour = 20000  # windows big enough to be killed inside one
    run(fullstory_config(db="clean.duckdb"))
    config = fullstory_config(prefetch=1)
    killed = floe_cli(config, env={**os.environ, killpoints.KILL_AT: kill_at})
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
    try:
        partial = query(tmp_path / "w.duckdb", "SELECT count(*) FROM fs.events")[0][0]
    except duckdb.CatalogException:  # killed before the first commit made the table
        partial = 0
    assert partial == windows_kept * 20000, kill_at  # whole windows only: each is one commit
    assert floe_cli(config).returncode == 0
    assert table(tmp_path / "w.duckdb") == table(tmp_path / "clean.duckdb")


def test_reloading_from_a_time_as_docs_fullstory_md_says(fullstory_config: Any, tmp_path: Path) -> None:
    # The refresh replaces the events from start_time on, in one commit; the earlier events stay.
    run(fullstory_config(db="clean.duckdb"))
    run(fullstory_config())
    assert floe_cli(fullstory_config(start_time="2024-01-01T03:00:00Z"), "--full-refresh").returncode == 0
    assert table(tmp_path / "w.duckdb") == table(tmp_path / "clean.duckdb")


def test_known_fields_enabled_later_become_columns(fullstory_config: Any, tmp_path: Path) -> None:
    # Asked for while not a column, AppName is kept in CustomVars; with include_mobile_fields it is a column.
    run(fullstory_config(end_time="2024-01-01T01:00:00Z", extra_fields=["AppName"]))
    assert query(tmp_path / "w.duckdb", "SELECT count(*) FROM information_schema.columns "
                 "WHERE table_name = 'events' AND column_name = 'AppName'") == [(0,)]
    assert query(tmp_path / "w.duckdb", "SELECT count(*) > 0 FROM fs.events "
                 "WHERE json_extract_string(CustomVars, '$.AppName') = 'Shop'") == [(True,)]
    run(fullstory_config(end_time="2024-01-01T02:00:00Z", include_mobile_fields=True))
    rows = query(tmp_path / "w.duckdb", "SELECT EventStart >= '2024-01-01T01:00:00Z', count(AppName), "
                 "count(json_extract_string(CustomVars, '$.AppName')) FROM fs.events GROUP BY 1 ORDER BY 1")
    assert rows[0][1:] == (0, rows[0][2]) and rows[0][2] > 0  # the first hour keeps AppName in CustomVars
    assert rows[1][1] > 0 and rows[1][2] == 0  # later rows have the column


def test_custom_vars_are_exported_whatever_fullstorys_default_field_set_is(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path
) -> None:
    """An account whose exports hold only hauser's base fields unless asked still gets its custom vars."""
    emulator(fullstory_server).default_fields = [name for name, _ in BASE_FIELDS]
    run(fullstory_config(end_time="2024-01-01T01:00:00Z"))
    [counts] = query(tmp_path / "w.duckdb", """SELECT count(*), count(*) FILTER (WHERE CustomVars <> '{}'),
        count(json_extract(CustomVars, '$.user_plan_str')), count(json_extract(CustomVars, '$."evt_order.total_real"')),
        count(json_extract(CustomVars, '$.page_experiment_bool')) FROM fs.events""")
    assert counts[0] == 600 and all(n > 0 for n in counts[1:]), counts


def test_fields_restrict_each_export_to_what_is_asked_for(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path
) -> None:
    fields = ["IndvId", "EventStart", "EventType", "evt_*"]
    run(fullstory_config(end_time="2024-01-01T01:00:00Z", fields=fields))
    assert [c["fields"] for c in emulator(fullstory_server).created] == [fields]
    [(rows, page_urls, other_vars, evt_vars)] = query(tmp_path / "w.duckdb", """SELECT count(*), count(PageUrl),
        count(*) FILTER (WHERE regexp_matches(CustomVars, '"(user|page)_')),
        count(*) FILTER (WHERE regexp_matches(CustomVars, '"evt_')) FROM fs.events""")
    assert (rows, page_urls, other_vars) == (600, 0, 0) and evt_vars > 0


@pytest.mark.parametrize(("key", "value", "message"), [
    ("export_duration", "7m", "between 15m and 24h"),
    ("export_duration", "5h", "must divide 24h"),
    ("export_duration", "soon", "not a duration"),
    ("export_delay", "10m", "at least 1h"),
    ("fields", "['Page Url']", "'Page Url' is not a field name"),
    ("extra_fields", "['evt_*_str']", "not a field name or a prefix followed by"),
    ("fields", "[]", "at least 1 item"),
])
def test_bad_settings_are_config_errors_naming_the_key(key: str, value: str, message: str, tmp_path: Path) -> None:
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


def export_body(events: list[dict[str, Any]], layout: str) -> bytes:
    """An export file's (uncompressed) bytes in one of the layouts FullStory and other writers use."""
    if layout == "ndjson":
        return b"\n".join(orjson.dumps(e) for e in events) + b"\n"
    if layout == "array per line":
        return b"[\n" + b",\n".join(orjson.dumps(e) for e in events) + b"\n]"
    if layout == "array minified":
        return orjson.dumps(events)
    return orjson.dumps(events, option=orjson.OPT_INDENT_2)


LAYOUTS = ["ndjson", "array per line", "array minified", "array pretty"]


# Strings that need escaping, in a known column (EventTargetText) and in a custom var (user_label_str).
EVENTS = [{"IndvId": 2**62 + i, "EventStart": f"2024-01-01T00:00:0{i}.123456789Z", "EventType": "click",
           "EventTargetText": t, "evt_x.y_real": i / 2, "page_tags": ["a", i], "user_note": None, "user_label_str": t}
          for i, t in enumerate(['a "quoted" },{ brace', "line\nbreak", "{json-ish}", "plain", "tab\there",
                                 "back\\slash é ✓"])]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk", [40, 1 << 20])
def test_export_files_parse_the_same_in_every_layout_and_chunking(tmp_path: Path, layout: str, chunk: int) -> None:
    from floe.sources.fullstory_export import ExportReader

    reader_schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    body = export_body(EVENTS, layout)
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
    from floe.core.errors import SourceError
    from floe.sources.fullstory_export import ExportReader

    path = tmp_path / "export.gz"
    path.write_bytes(gzip.compress(b'{"IndvId": 1, "PageNumEvents": 1099511627776}\n'))  # 2**40: not an int32
    reader_schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    with pytest.raises(SourceError, match="field PageNumEvents is not a int32"):
        list(ExportReader(reader_schema, "FORMAT_NDJSON").batches(path))


@pytest.mark.parametrize("body", [b'{"IndvId": 1}\n', gzip.compress(b'{"IndvId": 1}\n', mtime=0)[:10] + b"\xff" * 40],
                         ids=["plain-json", "gzip-header-then-garbage"])
def test_a_file_that_is_not_gzip_is_an_error(tmp_path: Path, body: bytes) -> None:
    from floe.core.errors import SourceError
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
    from floe.core.errors import SourceError
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windows_shaped_like_fullstorys_test_export_load_every_event_and_give_those_without_custom_vars_an_empty_object(
    tmp_path: Path, layout: str
) -> None:
    """Most events carry no custom var (keys absent or null); each var is set in a few events only."""
    from floe.sources.fullstory_export import ExportReader

    windows = hauser_shaped_windows()
    def has_vars(event: dict[str, Any]) -> bool:
        return any(v is not None for k, v in event.items() if k.startswith(("user_", "evt_", "page_")))
    assert [len(events) for _, _, events in windows] == [13, 20, 27, 31, 53]  # the shape of the real export
    assert sum(not has_vars(e) for _, _, events in windows for e in events) == 97
    schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    fmt = "FORMAT_NDJSON" if layout == "ndjson" else "FORMAT_JSON"
    reader = ExportReader(schema, fmt)
    for i, (_, _, events) in enumerate(windows):
        path = tmp_path / f"{i}.gz"
        path.write_bytes(gzip.compress(export_body(events, layout)))
        rows = [r for b in reader.batches(path) for r in b.to_pylist()]
        assert len(rows) == len(events)
        for row, event in zip(rows, events, strict=True):
            assert row["IndvId"] == event["IndvId"] and row["PageIp"] == "" and row["EventType"] == event["EventType"]
            expected = {k: v for k, v in event.items() if k not in KNOWN and v is not None}
            assert orjson.loads(row["CustomVars"]) == expected  # ints above 2**53 exact, date-like text as sent
        assert sum(r["CustomVars"] == "{}" for r in rows) > 0


GOOD = b'{"IndvId": 1, "EventStart": "2024-01-01T00:00:00Z", "EventType": "click"}'
WHERE = "window 2024-01-01T02:00:00Z..2024-01-01T03:00:00Z, export e-42"


@pytest.mark.parametrize(("bad", "message"), [
    (b'{"IndvId": 9, "EventType": }', "line 7: not valid JSON"),
    (b'["not", "an", "event"]', "line 7: not a JSON object"),
    (b'{"IndvId": 9, "PageNumEvents": 1099511627776}', "line 7: field PageNumEvents is not a int32"),  # 2**40
    (b'{"IndvId": 9223372036854775808}', "line 7: field IndvId is not a int64"),  # 2**63
    (b'{"IndvId": "nine"}', "line 7: field IndvId is not a int64"),
    (b'{"IndvId": 9, "EventStart": "yesterday"}', "line 7: field EventStart is not a timestamp"),
    (b'{"IndvId": 9, "pagenumevents": 1099511627776}', "line 7: field pagenumevents is not a int32"),
])
@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_a_bad_event_is_an_error_naming_the_window_export_line_and_field(
    tmp_path: Path, bad: bytes, message: str, chunk: int
) -> None:
    from floe.core.errors import SourceError
    from floe.sources.fullstory_export import ExportReader

    path = tmp_path / "export.gz"
    path.write_bytes(gzip.compress(b"\n".join([GOOD] * 6 + [bad] + [GOOD] * 3) + b"\n"))
    schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    with pytest.raises(SourceError) as caught:
        list(ExportReader(schema, "FORMAT_NDJSON", chunk_bytes=chunk).batches(path, WHERE))
    assert str(caught.value).startswith(WHERE + ": " + message), str(caught.value)


@pytest.mark.parametrize("layout", ["array per line", "array minified"])
def test_a_bad_element_of_a_json_array_is_named_by_its_place(tmp_path: Path, layout: str) -> None:
    from floe.core.errors import SourceError
    from floe.sources.fullstory_export import ExportReader

    events = [{"IndvId": i, "EventType": "click"} for i in range(10)]
    events[4]["PageNumEvents"] = 2**40
    path = tmp_path / "export.gz"
    path.write_bytes(gzip.compress(export_body(events, layout)))
    schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    with pytest.raises(SourceError, match=f"^{WHERE}: element 5: field PageNumEvents is not a int32"):
        list(ExportReader(schema, "FORMAT_JSON").batches(path, WHERE))


@pytest.mark.parametrize(("body", "message"), [
    (gzip.compress((GOOD + b"\n") * 1000)[:-30], "export file is truncated"),
    (GOOD + b"\n", "export file is not valid gzip"),
])
def test_a_broken_file_is_an_error_naming_the_window_and_export(tmp_path: Path, body: bytes, message: str) -> None:
    from floe.core.errors import SourceError
    from floe.sources.fullstory_export import ExportReader

    path = tmp_path / "export.gz"
    path.write_bytes(body)
    schema = FullStorySource("fs", FullStoryConfig(api_key="k")).streams()[0].schema
    with pytest.raises(SourceError, match=f"^{WHERE}: {message}"):
        list(ExportReader(schema, "FORMAT_NDJSON").batches(path, WHERE))


def test_custom_vars_render_only_set_values_in_key_order_with_json_escapes() -> None:
    import pyarrow as pa

    from floe.sources.fullstory_export import custom_vars

    table = pa.table({"a": pa.array([None, 1, None, 2]), "b": pa.array(['x"q', None, None, "y\n"]),
                      "c": pa.array([[1, 2], None, None, None]), "d": pa.nulls(4)})
    rendered = custom_vars(table, ["a", "b", "c", "d"]).to_pylist()
    assert rendered == ['{"b":"x\\"q","c":[1,2]}', '{"a":1}', "{}", '{"a":2,"b":"y\\n"}']
    assert [orjson.loads(r) for r in rendered][3] == {"a": 2, "b": "y\n"}
    assert custom_vars(table, []).to_pylist() == ["{}"] * 4
    assert custom_vars(table.slice(0, 0), ["a", "b"]).to_pylist() == []
