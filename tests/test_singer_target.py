"""floe as a Singer target: any Singer message stream loaded exactly once through floe's engine."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from floe.apps.singer.schema import json_schema_to_arrow
from floe.apps.singer.target import SingerTarget
from floe.core.errors import SourceError
from floe.destinations.duckdb import DuckDBDestination
from tests.fixtures.core import staged_files

FLOE = [str(Path(sys.executable).parent / "floe")]


def schema_msg(stream: str, properties: dict[str, Any], keys: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "SCHEMA", "stream": stream, "schema": {"type": "object", "properties": properties, **extra},
            "key_properties": keys or []}


def record(stream: str, row: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "RECORD", "stream": stream, "record": row, **extra}


def state(value: Any) -> dict[str, Any]:
    return {"type": "STATE", "value": value}


def lines(messages: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(m) + b"\n" for m in messages]


USERS = {"id": {"type": "integer"}, "name": {"type": ["string", "null"]},
         "seen": {"type": ["string", "null"], "format": "date-time"}}


def run_target(dest: DuckDBDestination, tmp_path: Path, messages: list[dict[str, Any]] | Iterator[bytes],
               **options: Any) -> tuple[SingerTarget, list[Any]]:
    out = io.BytesIO()
    target = SingerTarget(dest, tmp_path / "stage", out, **options)
    target.run(lines(messages) if isinstance(messages, list) else messages)
    return target, [orjson.loads(x) for x in out.getvalue().splitlines()]


def rows(dest: DuckDBDestination, sql: str) -> list[tuple[Any, ...]]:
    return dest.query(sql)


def test_merges_on_key_properties_and_appends_without_them(duckdb_destination: DuckDBDestination, tmp_path: Path) -> None:
    messages = [
        schema_msg("users", USERS, ["id"]), schema_msg("clicks", {"page": {"type": "string"}}),
        record("users", {"id": 1, "name": "ann", "seen": "2026-01-01T10:00:00+02:00"}),
        record("users", {"id": 2, "name": "bob"}), record("clicks", {"page": "/"}),
        state({"bookmarks": {"users": 1}}),
        record("users", {"id": 1, "name": "ann v2", "seen": "2026-01-02T00:00:00Z"}), record("clicks", {"page": "/"}),
        state({"bookmarks": {"users": 2}}),
    ]
    _, states = run_target(duckdb_destination, tmp_path, messages, batch_rows=1)
    assert rows(duckdb_destination, "SELECT id, name, seen FROM singer.users ORDER BY id") == [
        (1, "ann v2", datetime(2026, 1, 2, tzinfo=UTC)), (2, "bob", None)]
    assert rows(duckdb_destination, "SELECT count(*) FROM singer.clicks") == [(2,)]
    assert states == [{"bookmarks": {"users": 1}}, {"bookmarks": {"users": 2}}]
    stored = duckdb_destination.get_state("singer", "users")
    assert stored == {"singer_state": {"bookmarks": {"users": 2}}, "state_messages": 1, "records": 1,
                      "records_after_state": 0}


def test_each_state_is_written_only_after_the_data_before_it_is_committed(
    duckdb_destination: DuckDBDestination, tmp_path: Path
) -> None:
    out = io.BytesIO()
    target = SingerTarget(duckdb_destination, tmp_path / "stage", out, batch_rows=3)
    sent: list[int] = []
    checked = 0

    def feed() -> Iterator[bytes]:
        nonlocal checked
        yield from lines([schema_msg("users", USERS, ["id"])])
        for i in range(1, 11):
            yield from lines([record("users", {"id": i, "name": f"u{i}"})])
            sent.append(i)
            yield from lines([state({"upto": i})])
            for emitted in (orjson.loads(x) for x in out.getvalue().splitlines()[checked:]):
                committed = {r[0] for r in duckdb_destination.query("SELECT id FROM singer.users")}
                assert set(range(1, emitted["upto"] + 1)) <= committed
                checked += 1

    target.run(feed())
    emitted = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert emitted[-1] == {"upto": 10} and 1 < len(emitted) < 10  # batched commits, the last state always out
    assert duckdb_destination.query("SELECT count(*) FROM singer.users") == [(10,)]


@pytest.fixture(params=["duckdb", "postgres"])
def sql_destination(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "duckdb":
        yield request.getfixturevalue("duckdb_destination")
        return
    from floe.destinations.postgres import PostgresConfig, PostgresDestination

    db = request.getfixturevalue("postgres_db")
    dest = PostgresDestination("pg", PostgresConfig.model_validate(db.config()))
    yield dest
    dest.close()


def test_activate_version_removes_rows_of_older_versions(sql_destination: Any, tmp_path: Path) -> None:
    duckdb_destination = sql_destination
    def sync(version: int, codes: list[str]) -> list[dict[str, Any]]:
        return [schema_msg("plans", {"code": {"type": "string"}}),
                {"type": "ACTIVATE_VERSION", "stream": "plans", "version": version},
                *[record("plans", {"code": c}, version=version) for c in codes],
                {"type": "ACTIVATE_VERSION", "stream": "plans", "version": version}, state({"v": version})]

    run_target(duckdb_destination, tmp_path, sync(1, ["a", "b", "c"]))
    assert rows(duckdb_destination, "SELECT count(*) FROM singer.plans") == [(3,)]
    run_target(duckdb_destination, tmp_path, sync(2, ["a", "d"]))
    assert rows(duckdb_destination, "SELECT code, _sdc_table_version FROM singer.plans ORDER BY code") == [
        ("a", 2), ("d", 2)]


@pytest.mark.parametrize("group_size", [None, 2])
def test_the_tables_of_one_state_commit_in_one_transaction_of_at_most_group_size_tables(
    sql_destination: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_size: int | None
) -> None:
    if group_size:
        monkeypatch.setattr(type(sql_destination), "group_size", group_size)
    names = ["a", "b", "c"]
    run_target(sql_destination, tmp_path, [*(schema_msg(n, {"x": {"type": "integer"}}) for n in names),
                                           *(record(n, {"x": 1}) for n in names), state({"n": 1})])
    committed = {s["stream"]: s["committed_at"] for s in sql_destination.states()}  # a transaction's start time
    assert sorted(committed) == names
    together = [committed[n] == committed["a"] for n in names]
    assert together == ([True, True, False] if group_size else [True, True, True])


def test_schema_changes_mid_stream_add_columns(duckdb_destination: DuckDBDestination, tmp_path: Path) -> None:
    wider = {**USERS, "plan": {"type": ["string", "null"]}, "since": {"type": ["string", "null"], "format": "date"}}
    messages = [schema_msg("users", USERS, ["id"]), record("users", {"id": 1, "name": "ann"}),
                schema_msg("users", wider, ["id"]), record("users", {"id": 2, "plan": "pro", "since": "2025-05-06"}),
                state({"n": 1})]
    run_target(duckdb_destination, tmp_path, messages)
    assert rows(duckdb_destination, "SELECT id, name, plan, since FROM singer.users ORDER BY id") == [
        (1, "ann", None, None), (2, None, "pro", date(2025, 5, 6))]


@pytest.mark.parametrize(("bad", "problem"), [
    ({"id": "seven"}, "field 'id': expected integer"),
    ({"id": 1.5}, "field 'id': expected integer"),
    ({"id": None}, "field 'id': null is not allowed"),
    ({"name": "no id"}, "field 'id': required property is missing"),
    ({"id": 3, "seen": "yesterday"}, "field 'seen': 'yesterday' is not a valid date-time"),
    ({"id": 3, "name": 12}, "field 'name': expected string"),
])
def test_a_record_violating_its_schema_fails_naming_stream_and_record_and_commits_nothing_of_its_batch(
    duckdb_destination: DuckDBDestination, tmp_path: Path, bad: dict[str, Any], problem: str
) -> None:
    messages = [schema_msg("users", USERS, ["id"], required=["id"]), record("users", {"id": 1}), state({"n": 1}),
                record("users", {"id": 2}), record("users", bad), state({"n": 2})]
    out = io.BytesIO()
    target = SingerTarget(duckdb_destination, tmp_path / "stage", out, batch_rows=1)
    with pytest.raises(SourceError) as error:
        target.run(lines(messages))
    assert f"stream users, record 3: {problem}" in str(error.value)
    assert rows(duckdb_destination, "SELECT id FROM singer.users") == [(1,)]
    assert [orjson.loads(x) for x in out.getvalue().splitlines()] == [{"n": 1}]
    assert not staged_files(tmp_path / "stage")


@pytest.mark.parametrize(("schema", "expected"), [
    ({"type": ["null", "integer"]}, pa.int64()),  # draft 4 type arrays
    ({"type": "integer", "nullable": True}, pa.int64()),  # OpenAPI nullable
    ({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}, pa.timestamp("us", "UTC")),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, pa.float64()),
    ({"$ref": "#/$defs/when"}, pa.date32()),  # 2020-12 $defs
    ({"$ref": "#/definitions/flag"}, pa.bool_()),  # draft 4-7 definitions
    ({"type": ["string", "integer"]}, pa.string()),
    ({"type": "string", "format": "time"}, pa.time64("us")),
])
def test_json_schema_drafts_map_to_arrow(schema: dict[str, Any], expected: pa.DataType) -> None:
    root = {"type": "object", "properties": {"x": schema},
            "$defs": {"when": {"type": "string", "format": "date"}}, "definitions": {"flag": {"type": "boolean"}}}
    assert json_schema_to_arrow(root).field("x").type == expected


@pytest.mark.parametrize("schema", [{"type": "object"}, {"type": ["array", "null"]}, {}, {"type": ["object", "string"]}])
def test_objects_arrays_and_untyped_values_are_json_documents(schema: dict[str, Any]) -> None:
    f = json_schema_to_arrow({"type": "object", "properties": {"x": schema}}).field("x")
    assert f.metadata and f.metadata.get(b"floe.json") == b"1"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_meltano_batch_messages_are_loaded(duckdb_destination: DuckDBDestination, tmp_path: Path, fmt: str) -> None:
    data = [{"id": i, "name": f"n{i}", "seen": f"2026-01-0{i}T00:00:00Z"} for i in range(1, 4)]
    if fmt == "jsonl":
        path = tmp_path / "part-1.json.gz"
        with gzip.open(path, "wb") as handle:
            handle.write(b"".join(orjson.dumps(r) + b"\n" for r in data))
        encoding = {"format": "jsonl", "compression": "gzip"}
    else:
        path = tmp_path / "part-1.parquet"
        table = pa.Table.from_pylist(data)
        table = table.set_column(2, "seen", table.column("seen").cast(pa.timestamp("us", "UTC")))
        pq.write_table(table, path)
        encoding = {"format": "parquet", "compression": "none"}
    messages = [schema_msg("users", USERS, ["id"]),
                {"type": "BATCH", "stream": "users", "encoding": encoding, "manifest": [path.as_uri()]},
                state({"done": True})]
    _, states = run_target(duckdb_destination, tmp_path, messages)
    assert rows(duckdb_destination, "SELECT id, name, seen FROM singer.users ORDER BY id") == [
        (i, f"n{i}", datetime(2026, 1, i, tzinfo=UTC)) for i in range(1, 4)]
    assert states == [{"done": True}]


def test_record_before_schema_is_an_error_naming_the_line(duckdb_destination: DuckDBDestination, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="input line 1: RECORD for stream 'users' before its SCHEMA"):
        run_target(duckdb_destination, tmp_path, [record("users", {"id": 1})])


def test_cli_target_with_a_settings_file(tmp_path: Path) -> None:
    (tmp_path / "target.json").write_text(json.dumps({"path": "out.duckdb", "schema": "raw"}))
    messages = b"".join(lines([schema_msg("users", USERS, ["id"]), record("users", {"id": 1, "name": "x"}),
                               state({"s": 1})]))
    done = subprocess.run([*FLOE, "target", "duckdb", "--config", "target.json"], input=messages,
                          capture_output=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip().splitlines() == [b'{"s":1}']
    import duckdb

    with duckdb.connect(str(tmp_path / "out.duckdb")) as conn:
        assert conn.execute("SELECT id, name FROM raw.users").fetchall() == [(1, "x")]


def test_cli_target_fails_non_zero_on_a_bad_record(tmp_path: Path) -> None:
    (tmp_path / "target.json").write_text(json.dumps({"path": "out.duckdb"}))
    messages = b"".join(lines([schema_msg("users", USERS, ["id"]), record("users", {"id": "x"})]))
    done = subprocess.run([*FLOE, "target", "duckdb", "--config", "target.json"], input=messages,
                          capture_output=True, cwd=tmp_path, check=False)
    assert done.returncode == 1
    assert "CRITICAL stream users, record 1: field 'id': expected integer" in done.stderr.decode()
