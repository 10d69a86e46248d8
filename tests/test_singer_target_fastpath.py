"""The Singer target's fast path (DuckDB's JSON reader on runs of RECORD lines) loads exactly what the
per-record path loads, takes the runs it can prove, and leaves the others to the per-record path."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from floe.apps.singer.fastpath import FastPath
from floe.apps.singer.target import SingerTarget
from floe.core.errors import SourceError

PROPERTIES: dict[str, Any] = {
    "id": {"type": "integer"},
    "big": {"type": ["null", "integer"]},
    "amount": {"type": ["null", "number"]},
    "flag": {"type": ["null", "boolean"]},
    "name": {"type": ["null", "string"]},
    "at": {"type": ["null", "string"], "format": "date-time"},
    "day": {"type": ["null", "string"], "format": "date"},
    "doc": {"type": ["null", "object"], "properties": {}},
    "tags": {"type": ["null", "array"]},
}
COLUMNS = ", ".join(f'"{name}"' for name in PROPERTIES)
TEXTS = ["plain", "Zoë Ångström", "李 雷", 'quote " and \\ backslash', "tab\tnew\nline", "emoji 😀", "", "/slash"]
STAMPS = ["2026-03-01T10:20:30Z", "2026-03-01T10:20:30.5+02:00", "2026-12-31T23:59:59.999999-05:30",
          "1999-01-01T00:00:00.000001+00:00", "2026-06-15T12:00:00.123-09:00"]


def schema_line(stream: str = "events", properties: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"type": "SCHEMA", "stream": stream, "key_properties": ["id"],
                         "schema": {"type": "object", "properties": properties or PROPERTIES}}) + b"\n"


def irregular(i: int, rng: random.Random) -> dict[str, Any]:
    """A record as taps write them: keys in any order, explicit nulls, missing and extra properties."""
    fields: dict[str, Any] = {
        "id": i,
        "big": rng.choice([None, 2**63 - 1, -(2**63), 0, -1, rng.randrange(10**12)]),
        "amount": rng.choice([None, 0, 7, -3, 0.1, 1e-7, 1.5e300, 12345.678, -0.0, rng.random()]),
        "flag": rng.choice([None, True, False]),
        "name": rng.choice([None, *TEXTS]) and f"{rng.choice(TEXTS)} {i}",
        "at": rng.choice([None, *STAMPS]),
        "day": rng.choice([None, "2026-02-28", "2024-02-29", "0001-01-01", "9999-12-31"]),
        "doc": rng.choice([None, {}, {"a": {"b": [1, 2.5, None, "é"]}, "big": 2**70, "x": 1e22},
                           {"nested": {"deep": {"k": "v\n", "n": -0.0}}, "f": 0.1 + 0.2}, {"u": "Ünï\u2028"}]),
        "tags": rng.choice([None, [], ["a", 1, {"b": None}], [1.0, 2e-9]]),
        "extra": {"ignored": True},  # not in the schema: neither path keeps it
    }
    for name in ("big", "amount", "day", "doc", "tags", "extra"):
        if rng.random() < 0.15:
            del fields[name]
    keys = list(fields)
    rng.shuffle(keys)
    return {k: fields[k] for k in keys}


def record_line(row: dict[str, Any], spaced: bool = False, **extra: Any) -> bytes:
    message = {"type": "RECORD", "stream": "events", "record": row, "time_extracted": "2026-12-01T00:00:00Z", **extra}
    return json.dumps(message, ensure_ascii=False, separators=None if spaced else (",", ":")).encode() + b"\n"


def state_line(n: int) -> bytes:
    return orjson.dumps({"type": "STATE", "value": {"n": n}}) + b"\n"


def messages(count: int = 1_200, every: int = 400, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    out = [schema_line()]
    for i in range(count):
        out.append(record_line(irregular(i, rng), spaced=i >= count // 2))  # json.dumps' spacing in the second half
        if (i + 1) % every == 0:
            out.append(state_line(i + 1))
    return out


def load(dest: Any, tmp_path: Path, lines: list[bytes], schema: str, fast: bool,
         **options: Any) -> tuple[SingerTarget, list[Any]]:
    out = io.BytesIO()
    target = SingerTarget(dest, tmp_path / schema, out, schema=schema, **options)
    target.fast = FastPath(min_run=10 if fast else 10**9)
    target.run(lines)
    return target, [orjson.loads(x) for x in out.getvalue().splitlines()]


def table(dest: Any, schema: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in dest.query(f"SELECT {COLUMNS} FROM {schema}.events ORDER BY id")]


@pytest.fixture(params=["duckdb", "postgres"])
def destination(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "duckdb":
        yield request.getfixturevalue("duckdb_destination")
        return
    from floe.destinations.postgres import PostgresConfig, PostgresDestination

    dest = PostgresDestination("pg", PostgresConfig.model_validate(request.getfixturevalue("postgres_db").config()))
    yield dest
    dest.close()


def same_load(dest: Any, tmp_path: Path, lines: list[bytes]) -> tuple[FastPath, list[tuple[Any, ...]]]:
    """Load `lines` through both paths; assert the tables and STATEs are identical; the fast run's counters."""
    fast, fast_states = load(dest, tmp_path, lines, "fast", fast=True)
    slow, slow_states = load(dest, tmp_path, lines, "slow", fast=False)
    assert slow.fast.taken == 0
    rows = table(dest, "fast")
    assert rows == table(dest, "slow")
    assert fast_states == slow_states
    return fast.fast, rows


def test_fast_and_per_record_paths_load_identical_tables(destination: Any, tmp_path: Path) -> None:
    lines = messages()
    fast, rows = same_load(destination, tmp_path, lines)
    assert (fast.taken, fast.records, fast.refused) == (4, 1_200, 0)  # runs end at each STATE and the change of spacing
    assert len(rows) == 1_200
    assert {type(r[7]) for r in rows} > {type(None)}  # the json column holds documents
    assert any(r[5] is not None and r[5].microsecond for r in rows)  # offsets and fractions converted


@pytest.mark.parametrize(("odd", "why"), [
    ({"id": 1_000_001.0}, "an integral float in an integer column"),
    ({"id": 1_000_001, "at": "2026-03-01T10:20:30"}, "a date-time without offset"),
    ({"id": 1_000_001, "at": "2026-03-01 10:20:30Z"}, "a space for the T"),
    ({"id": 1_000_001, "day": "2026-03-01T00:00:00Z"}, "a timestamp in a date column"),
    ({"id": 1_000_001, "name": "😀 escaped"}, "an escaped surrogate pair"),
])
def test_a_run_the_fast_path_cannot_prove_goes_through_the_per_record_path(
    destination: Any, tmp_path: Path, odd: dict[str, Any], why: str
) -> None:
    lines = messages(600, 300)
    raw = record_line(odd)
    if "name" in odd:
        raw = raw.replace("😀".encode(), b"\\ud83d\\ude00")
    lines.insert(100, raw)  # in the first run
    fast, rows = same_load(destination, tmp_path, lines)
    assert (fast.taken, fast.refused) == (1, 1), why
    assert rows[-1][0] == 1_000_001


def test_escaped_characters_in_strings_dates_and_date_times_load_alike(destination: Any, tmp_path: Path) -> None:
    lines = messages(600, 300)
    for at, escaped in enumerate([b'"at":"2026-03-01T10:20:30\\u005a","day":"2026-02-2\\u0038"',
                                  b'"at":"\\u0032026-03-01T10:20:30Z"', b'"name":"a \\"b\\" \\\\ \\/ \\u00e9 \\t"']):
        lines.insert(100 + at, b'{"type":"RECORD","stream":"events","record":{"id":%d,%s}}\n' % (1_000_000 + at, escaped))
    fast, rows = same_load(destination, tmp_path, lines)
    assert (fast.taken, fast.refused) == (2, 0)
    assert [r[5] for r in rows[-3:-1]] == [datetime(2026, 3, 1, 10, 20, 30, tzinfo=UTC)] * 2
    assert rows[-3][6] == date(2026, 2, 28) and rows[-1][4] == 'a "b" \\ / é \t'


def test_record_messages_with_a_version_take_the_per_record_path(destination: Any, tmp_path: Path) -> None:
    lines = messages(600, 300)
    lines[50] = lines[50].replace(b'"stream":"events",', b'"stream":"events","version":7,')
    fast, _ = same_load(destination, tmp_path, lines)
    assert (fast.taken, fast.refused) == (1, 1)
    assert [r[0] for r in destination.query("SELECT count(*) FROM fast.events WHERE _sdc_table_version = 7")] == [1]


@pytest.mark.parametrize("bad", [
    {"id": "7"},  # a string in an integer column
    {"id": 7, "flag": "yes"},
    {"id": 7, "at": "yesterday"},
    {"id": 7, "big": 2**63},
    {"id": 7, "big": "5"},  # the fast path reads the JSON text: a string of digits is no integer
    {"id": 7, "flag": "true"},
    {"id": 7, "flag": 1},
    {"id": 7, "name": 5},
    {"id": 7, "name": True},
    {"id": 7, "name": {"a": "b"}},
    {"id": 7, "day": 20260301},
])
def test_a_bad_record_fails_alike_on_both_paths(duckdb_destination: Any, tmp_path: Path, bad: dict[str, Any]) -> None:
    lines = messages(600, 300)
    lines.insert(400, record_line(bad))  # in the second run, after the first STATE
    errors = []
    for fast in (True, False):
        with pytest.raises(SourceError) as error:
            load(duckdb_destination, tmp_path, lines, "fast" if fast else "slow", fast=fast, batch_rows=1)
        errors.append(str(error.value))
    assert errors[0] == errors[1]
    assert "stream events, record 399:" in errors[0]
    assert duckdb_destination.query("SELECT count(*) FROM fast.events") == [(300,)]  # the first STATE's records


def test_a_stream_with_columns_it_does_not_handle_never_takes_it(duckdb_destination: Any, tmp_path: Path) -> None:
    properties = {**PROPERTIES, "mixed": {"type": ["string", "integer"]}}  # a `text` column
    lines = [schema_line(properties=properties), *messages(600, 300)[1:]]
    fast, _ = same_load(duckdb_destination, tmp_path, lines)
    assert (fast.taken, fast.refused) == (0, 0)


def test_lines_without_a_final_newline_and_other_streams_between_runs(duckdb_destination: Any, tmp_path: Path) -> None:
    lines = messages(600, 600)
    other = schema_line("other", {"id": {"type": "integer"}})
    lines[1:1] = [other]
    lines.insert(200, orjson.dumps({"type": "RECORD", "stream": "other", "record": {"id": 1}}) + b"\n")
    lines = [line.rstrip(b"\n") for line in lines]
    fast, rows = same_load(duckdb_destination, tmp_path, lines)
    assert (fast.taken, fast.records) == (3, 600)  # before and after the other stream's record, then json.dumps'

    assert duckdb_destination.query("SELECT id FROM fast.other") == [(1,)]



def test_a_state_is_written_only_after_the_fast_path_runs_before_it_are_committed(
    destination: Any, tmp_path: Path
) -> None:
    out = io.BytesIO()
    target = SingerTarget(destination, tmp_path / "stage", out, batch_rows=250)
    target.fast = FastPath(min_run=10)
    checked = 0
    rng = random.Random(5)

    def feed() -> Iterator[bytes]:
        nonlocal checked
        yield schema_line()
        for n in range(1, 9):
            for i in range((n - 1) * 100, n * 100):
                yield record_line(irregular(i, rng))
            yield state_line(n * 100)
            for emitted in (orjson.loads(x) for x in out.getvalue().splitlines()[checked:]):
                committed = destination.query("SELECT count(*) FROM singer.events")[0][0]
                assert committed >= emitted["n"]
                checked += 1

    target.run(feed())
    emitted = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert emitted[-1] == {"n": 800} and 1 < len(emitted) < 8  # a commit every third STATE, the last one always
    assert checked >= 1  # a STATE was out while the input went on
    assert (target.fast.taken, target.fast.records) == (8, 800)
    assert destination.query("SELECT count(*) FROM singer.events") == [(800,)]


def test_a_line_that_is_not_utf8_fails_alike_on_both_paths(duckdb_destination: Any, tmp_path: Path) -> None:
    lines = messages(600, 300)
    lines[50] = lines[50].replace(b'"id":', b'"junk":"\xff","id":', 1)
    errors = []
    for fast in (True, False):
        with pytest.raises(SourceError) as error:
            load(duckdb_destination, tmp_path, lines, "fast" if fast else "slow", fast=fast)
        errors.append(str(error.value))
    assert errors[0] == errors[1] and errors[0].startswith("input line 51: not a JSON message")


def test_full_runs_and_their_states_do_not_wait_for_the_worker_and_reading_ahead_is_bounded(
    destination: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import floe.apps.singer.target as target_module

    monkeypatch.setattr(target_module, "CHUNK_ROWS", 100)  # each run is full: a STATE follows at once
    target = SingerTarget(destination, tmp_path / "stage", io.BytesIO(), batch_rows=10**6)
    target.fast = FastPath(min_run=10)
    in_flight = []
    rng = random.Random(9)

    def feed() -> Iterator[bytes]:
        yield schema_line()
        for n in range(1, 9):
            for i in range((n - 1) * 100, n * 100):
                yield record_line(irregular(i, rng))
            yield state_line(n * 100)
            in_flight.append(target._converting)  # read after the STATE of run n: runs not drained yet

    target.run(feed())
    assert max(in_flight) >= 1  # neither the full run nor its STATE drained the worker
    assert max(in_flight) <= FastPath.WORKERS  # the reader waits for the oldest run beyond that
    assert (target.fast.taken, target.fast.records) == (8, 800)
    assert destination.query("SELECT count(*) FROM singer.events") == [(800,)]


def test_a_commit_due_at_a_state_waits_for_the_runs_before_it_only(
    destination: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import floe.apps.singer.target as target_module

    monkeypatch.setattr(target_module, "CHUNK_ROWS", 100)  # each run is full: its STATE follows while it converts
    lines = messages(1_200, 100, seed=11)
    out = io.BytesIO()
    target = SingerTarget(destination, tmp_path / "fast", out, schema="fast", batch_rows=300)
    target.fast = FastPath(min_run=10)
    waiting, checked = [], 0

    def feed() -> Iterator[bytes]:
        nonlocal checked
        for line in lines:
            yield line
            if line.startswith(b'{"type":"STATE"'):
                waiting.append((target._due is not None, target._converting))
                for emitted in (orjson.loads(x) for x in out.getvalue().splitlines()[checked:]):
                    assert destination.query("SELECT count(*) FROM fast.events")[0][0] >= emitted["n"]
                    checked += 1

    target.run(feed())
    assert any(due and converting for due, converting in waiting)  # a due commit left the later runs converting
    _, slow_states = load(destination, tmp_path, lines, "slow", fast=False, batch_rows=300)
    states = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert states == slow_states == [{"n": 300}, {"n": 600}, {"n": 900}, {"n": 1200}]
    assert table(destination, "fast") == table(destination, "slow")
    assert (target.fast.taken, target.fast.records) == (12, 1_200)
    committed = destination.query("SELECT state FROM _floe_state WHERE source = 'fast' ORDER BY version")
    assert [orjson.loads(s)["records_after_state"] for (s,) in committed] == [0, 0, 0, 0]


def test_the_scan_of_a_run_finds_every_newline_and_escape_across_its_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    from floe.apps.singer import fastpath

    monkeypatch.setattr(fastpath, "SCAN", 7)
    rng = random.Random(2)
    data = b"".join(rng.choice([b"a", b"\\", b"u", b"\n", b"\\u", b"\\\\u"]) for _ in range(2_000))
    expected, at = [], data.find(b"\\u")
    while at >= 0:
        expected.append(at)
        at = data.find(b"\\u", at + 2)
    assert fastpath._scan(data) == (data.count(b"\n"), expected)
    assert fastpath._unsafe_escape(b'{"a":"\\u00e9 \\ud83d"}\n', fastpath._scan(b'{"a":"\\u00e9 \\ud83d"}\n')[1]) \
        == "\\ud83d in a string"
