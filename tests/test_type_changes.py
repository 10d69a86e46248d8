"""No load narrows, rounds or truncates a value.

When a staged column's type differs from the table's column, the load either stores every value
exactly or fails with one line naming the table, the column, the warehouse type and the staged
type, committing nothing (data and state stay; the bookmark does not move). The rule is each
destination's data (`column_rules`); these tests hold it against the real engines for every pair
of staged types (DuckDB, PostgreSQL), against the SQL source and a Singer stream whose types change
between runs, and against each destination's own type map (also Redshift and BigQuery).
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pyarrow as pa
import pytest

from floe.apps.singer.target import SingerTarget
from floe.config import load_config
from floe.core.destination import LoadJob, TableSpec, json_field
from floe.core.errors import DestinationError
from floe.core.stream import Batch, Stream
from floe.destinations.bigquery import BigQueryDestination
from floe.destinations.bigquery_sql import COLUMN_RULES as BIGQUERY_RULES
from floe.destinations.column_types import ColumnRules, compare
from floe.destinations.duckdb import DuckDBDestination
from floe.destinations.postgres import PostgresDestination
from floe.destinations.redshift import RedshiftDestination
from floe.destinations.schema_changes import variant_name
from floe.destinations.sql import SqlDestination
from floe.engine import runner
from floe.engine.pipeline import run_stream
from floe.infra.stage import StageWriter, new_load_id
from tests.fixtures.core import OneStreamSource
from tests.test_destinations import make_destination, settings_for

FLOE = str(Path(sys.executable).parent / "floe")

# Two values of each staged type key, the extremes where a type has them.
SAMPLES: dict[str, pa.Array] = {
    "bool": pa.array([True, False]),
    "int32": pa.array([-(2**31), 2**31 - 1], pa.int32()),
    "int64": pa.array([-(2**63), 2**63 - 1], pa.int64()),
    "float64": pa.array([0.1, -1.5e300]),
    "decimal": pa.array([Decimal("9999999999.99"), Decimal("-0.01")], pa.decimal128(12, 2)),
    "string": pa.array(['a, "b"', ""]),
    "json": pa.array(['{"a": [1, 2]}', "[]"]),
    "nested": pa.array([[1, 2], []], pa.list_(pa.int64())),
    "binary": pa.array([b"\x00\xff", b""]),
    "date": pa.array([date(2026, 3, 1), date(1970, 1, 1)]),
    "time": pa.array([time(17, 45, 0, 123456), time(0, 0)]),
    "timestamp": pa.array([datetime(2026, 3, 1, 17, 45, 0, 123456), datetime(1970, 1, 1)], pa.timestamp("us")),
    "timestamp_tz": pa.array([datetime(2026, 3, 1, 17, 45, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)],
                             pa.timestamp("us", "UTC")),
}


def sample_field(key: str) -> pa.Field:
    return json_field("v") if key == "json" else pa.field("v", SAMPLES[key].type)


def exactly(got: Any, want: Any, key: str) -> bool:
    """Whether a value read back is the staged value `want` (of type key `key`), unchanged."""
    if key in ("json", "nested"):
        return (json.loads(got) if isinstance(got, str) else got) == (json.loads(want) if key == "json" else want)
    if isinstance(got, str) and key != "string":  # a text column holds the value's text
        parse = {"bool": lambda s: {"true": True, "false": False}[s.lower()], "int32": int, "int64": int,
                 "float64": float, "decimal": Decimal, "date": date.fromisoformat, "time": time.fromisoformat,
                 "timestamp": datetime.fromisoformat}[key]
        return bool(parse(got) == want)
    if key == "date" and isinstance(got, datetime):  # midnight (UTC, where the column has a zone)
        return got == datetime.combine(want, time(), UTC if got.tzinfo else None)
    if key == "timestamp" and isinstance(got, datetime) and got.tzinfo:
        return got == want.replace(tzinfo=UTC)
    return bool(got == want)


# --- the rule, per destination, as data -----------------------------------------------------------
def bigquery_type(f: pa.Field) -> str | None:
    return BigQueryDestination.column_type(f)


def sql_type(cls: type[SqlDestination]) -> Any:
    return lambda f: cls.column_type(cls.__new__(cls), f)


RULES: dict[str, tuple[ColumnRules, Any]] = {
    "duckdb": (DuckDBDestination.column_rules, sql_type(DuckDBDestination)),
    "postgres": (PostgresDestination.column_rules, sql_type(PostgresDestination)),
    "redshift": (RedshiftDestination.column_rules, sql_type(RedshiftDestination)),
    "bigquery": (BIGQUERY_RULES, bigquery_type),
}


@pytest.mark.parametrize("destination", list(RULES))
@pytest.mark.parametrize("key", list(SAMPLES))
def test_the_column_a_destination_creates_holds_its_values(destination, key):
    rules, create = RULES[destination]
    created = create(sample_field(key))
    assert compare(rules, created, sample_field(key), create).lossless, created


def field(t: pa.DataType) -> pa.Field:
    return pa.field("v", t)


DEC = pa.decimal128
TZ = pa.timestamp("us", "UTC")


@pytest.mark.parametrize(("destination", "old", "new", "verdict"), [
    # the measured cases: int -> numeric(12,2), integer -> number, date -> timestamptz
    ("duckdb", "INTEGER", field(DEC(12, 2)), "DECIMAL(12,2)"),
    ("duckdb", "BIGINT", field(pa.float64()), None),
    ("duckdb", "DATE", field(TZ), "TIMESTAMPTZ"),
    ("postgres", "integer", field(DEC(12, 2)), "NUMERIC(12,2)"),
    ("postgres", "bigint", field(pa.float64()), None),
    ("postgres", "date", field(TZ), "TIMESTAMPTZ"),
    ("redshift", "integer", field(DEC(12, 2)), "NUMERIC(12,2)"),
    ("redshift", "date", field(TZ), "TIMESTAMPTZ"),
    ("bigquery", "INT64", field(DEC(12, 2)), "NUMERIC(21,2)"),  # BigQuery's INT64 is 19 digits
    ("bigquery", "INT64", field(pa.float64()), None),
    ("bigquery", "DATE", field(TZ), None),  # BigQuery coerces DATE to DATETIME only
    # exact: wider integers, more digits, text for numbers, midnight UTC for a date
    ("duckdb", "BIGINT", field(pa.int32()), "lossless"),
    ("duckdb", "DECIMAL(12,2)", field(DEC(10, 2)), "lossless"),
    ("duckdb", "DECIMAL(12,2)", field(DEC(12, 4)), "DECIMAL(14,4)"),
    ("duckdb", "TIMESTAMP WITH TIME ZONE", field(pa.date32()), "lossless"),
    ("duckdb", "VARCHAR", field(pa.int64()), "lossless"),
    ("duckdb", "BIGINT", field(DEC(12, 2)), "DECIMAL(21,2)"),
    ("postgres", "numeric", field(pa.decimal256(60, 20)), "lossless"),  # NUMERIC without (p,s) is unbounded
    ("postgres", "numeric(12,2)", field(pa.int64()), "NUMERIC(21,2)"),
    ("postgres", "text", field(pa.bool_()), "lossless"),
    ("postgres", "jsonb", field(pa.string()), "TEXT"),  # text is not a JSON document; text holds both
    ("postgres", "timestamp without time zone", field(TZ), "TIMESTAMPTZ"),  # the zone would be dropped
    ("redshift", "numeric", field(DEC(20, 2)), "NUMERIC(20,2)"),  # Redshift's NUMERIC is NUMERIC(18,0)
    ("redshift", "character varying", field(pa.int64()), "lossless"),
    ("redshift", "character varying", field(TZ), None),
    ("redshift", "super", field(pa.string()), None),
    ("redshift", "double precision", field(pa.int32()), "lossless"),
    ("bigquery", "NUMERIC(12, 2)", field(DEC(12, 4)), "NUMERIC(14,4)"),
    ("bigquery", "NUMERIC", field(DEC(38, 10)), "BIGNUMERIC"),  # NUMERIC holds 9 fraction digits
    ("bigquery", "FLOAT64", field(pa.int32()), "lossless"),
    ("bigquery", "DATETIME", field(pa.date32()), "lossless"),
    ("bigquery", "STRING", field(pa.int64()), None),  # no implicit INT64 -> STRING
    ("bigquery", "TIMESTAMP", field(pa.timestamp("us")), None),
])
def test_a_type_change_is_lossless_a_widening_or_incompatible(destination, old, new, verdict):
    rules, create = RULES[destination]
    got = compare(rules, old, new, create)
    assert ("lossless" if got.lossless else got.widen_to) == verdict
    assert got.incompatible == (verdict is None)


def load_values(dest: SqlDestination, folder: Path, table: str, ids: list[int], key: str,
                checkpoint: dict[str, Any], policy: str = "evolve") -> None:
    """Stage (id, v) rows with `v` of type key `key` and commit them to src.<table>, as the pipeline would."""
    batch = pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), SAMPLES[key]],
                                       schema=pa.schema([pa.field("id", pa.int64()), sample_field(key)]))
    writer = StageWriter(folder / table, new_load_id(), format=dest.stage_format("append"))
    writer.write(batch)
    files = writer.flush()
    spec = TableSpec("src", table, batch.schema, schema_changes=policy)  # type: ignore[arg-type]
    dest.load(LoadJob(writer.load_id, "src", table, spec, files, checkpoint, datetime.now(UTC)))


def read_back(dest: SqlDestination, table: str, ids: list[int], column: str) -> list[Any] | None:
    """The values of `column` of the rows `ids` (None: the table has no such column)."""
    with dest.transaction() as cur:
        if column not in dest.existing_columns(cur, "src", table):
            return None
    listed = ", ".join(map(str, ids))
    return [r[0] for r in dest.query(f'SELECT "{column}" FROM src."{table}" WHERE id IN ({listed}) ORDER BY id')]


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_every_type_change_evolves_the_table_and_keeps_every_value_exactly(kind, tmp_path, request):
    """For every pair of staged types: a table made by the first, then values of the second (schema_changes:
    evolve). Each load succeeds; its values come back exactly, in the column (widened if need be) or in
    the variant column `v__v_<type>` beside it, the other one NULL; the first rows keep their values."""
    dest = make_destination(settings_for(kind, tmp_path, request), tmp_path)
    wrong: list[str] = []
    try:
        for old in SAMPLES:
            table = f"from_{old}"
            load_values(dest, tmp_path, table, [0, 1], old, {"n": 0})
            for n, new in enumerate(SAMPLES, start=1):
                ids, want = [2 * n, 2 * n + 1], SAMPLES[new].to_pylist()
                try:
                    load_values(dest, tmp_path, table, ids, new, {"n": n})
                except DestinationError as exc:
                    wrong.append(f"{old} -> {new}: the load failed: {exc}")
                    continue
                in_column = read_back(dest, table, ids, "v")
                variant = read_back(dest, table, ids, variant_name("v", sample_field(new)))
                if in_column is not None and all(exactly(g, w, new) for g, w in zip(in_column, want, strict=True)):
                    if variant not in (None, [None, None]):
                        wrong.append(f"{old} -> {new}: the variant column holds {variant!r} too")
                elif variant is None or not all(exactly(g, w, new) for g, w in zip(variant, want, strict=True)):
                    wrong.append(f"{old} -> {new}: stored {in_column!r} / variant {variant!r} for {want!r}")
                elif in_column != [None, None]:
                    wrong.append(f"{old} -> {new}: the column holds {in_column!r} beside the variant")
                first = read_back(dest, table, [0, 1], "v") or []
                if not all(exactly(g, w, old) for g, w in zip(first, SAMPLES[old].to_pylist(), strict=True)):
                    wrong.append(f"{old} -> {new}: the first rows now read {first!r}")
            if dest.get_state("src", table) != {"n": len(SAMPLES)}:
                wrong.append(f"{old}: the state is {dest.get_state('src', table)!r}")
    finally:
        dest.close()
    assert wrong == []


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_with_freeze_every_type_change_loads_exactly_or_fails_naming_both_types(kind, tmp_path, request):
    """schema_changes: freeze. What the destination's rule calls lossless must come back exactly; everything
    else must fail with the table, column and both types named, leaving the table's rows and state as they were."""
    dest = make_destination(settings_for(kind, tmp_path, request), tmp_path)
    rules: ColumnRules = dest.column_rules
    wrong: list[str] = []
    try:
        for old in SAMPLES:
            table = f"from_{old}"
            load_values(dest, tmp_path, table, [0, 1], old, {"n": 0}, "freeze")
            with dest.transaction() as cur:
                column = dest.existing_columns(cur, "src", table)["v"]
            before = ([(2,)], {"n": 0})  # the table's row count and state
            for n, new in enumerate(SAMPLES, start=1):
                verdict = compare(rules, column, sample_field(new), dest.column_type)
                try:
                    load_values(dest, tmp_path, table, [2 * n, 2 * n + 1], new, {"n": n}, "freeze")
                except DestinationError as exc:
                    staged = "JSON text" if new == "json" else str(SAMPLES[new].type)
                    named = (f"loading src.{table} failed, nothing committed: column 'v' is {rules.parse(column)} "
                             f"in the warehouse and the new values are {staged} and schema_changes is freeze")
                    if verdict.lossless:
                        wrong.append(f"{old} -> {new} ({column}): called lossless, but the load failed: {exc}")
                    elif named not in str(exc):
                        wrong.append(f"{old} -> {new}: the error does not name table, column and types: {exc}")
                    if (dest.query(f'SELECT count(*) FROM src."{table}"'), dest.get_state("src", table)) != before:
                        wrong.append(f"{old} -> {new}: the failed load changed the table or its state")
                    continue
                before = ([(before[0][0][0] + 2,)], {"n": n})
                if not verdict.lossless:
                    wrong.append(f"{old} -> {new} ({column}): loaded although the rule refuses it")
                    continue
                got = [r[0] for r in dest.query(f'SELECT v FROM src."{table}" WHERE id IN ({2 * n}, {2 * n + 1}) ORDER BY id')]
                if not all(exactly(g, w, new) for g, w in zip(got, SAMPLES[new].to_pylist(), strict=True)):
                    wrong.append(f"{old} -> {new} ({column}): stored {got!r} for {SAMPLES[new].to_pylist()!r}")
    finally:
        dest.close()
    assert wrong == []


# --- through the CLI: a source's column types change between runs ---------------------------------
@pytest.fixture(params=["duckdb", "postgres"])
def warehouse(request, tmp_path, postgres_server):
    """Settings of a DuckDB file or of a PostgreSQL database of its own (the source has another)."""
    if request.param == "duckdb":
        yield {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}
        return
    db = postgres_server.create_database()
    yield db.config()
    postgres_server.drop_database(db.database)


def warehouse_rows(settings: dict[str, Any], tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    dest = make_destination(settings, tmp_path)
    try:
        return dest.query(sql)
    finally:
        dest.close()


def warehouse_state(settings: dict[str, Any], tmp_path: Path, source: str, stream: str) -> Any:
    dest = make_destination(settings, tmp_path)
    try:
        return dest.get_state(source, stream)
    finally:
        dest.close()


ORDERS = """
CREATE SCHEMA app;
CREATE TABLE app.orders (id integer PRIMARY KEY, updated_at timestamptz NOT NULL, amount integer, due date);
CREATE TABLE app.plans (id integer PRIMARY KEY, updated_at timestamptz NOT NULL, seats bigint, code text);
INSERT INTO app.orders SELECT i, timestamptz '2026-03-01 00:00+00' + i * interval '1 minute', 9900 + i,
       date '2026-03-01' FROM generate_series(0, 10) AS i;
INSERT INTO app.plans VALUES (1, '2026-03-01 00:00+00', 5, 'a');
"""
# What the measured runs did: int -> numeric(12,2) and date -> timestamptz (11 changed rows), and two
# changes that stay exact (bigint -> integer, text -> integer) in another table.
CHANGES = """
ALTER TABLE app.orders ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN due TYPE timestamptz;
UPDATE app.orders SET amount = amount + 10.25, due = timestamptz '2026-03-01 17:45:00+00',
       updated_at = updated_at + interval '1 day';
ALTER TABLE app.plans ALTER COLUMN seats TYPE integer, ALTER COLUMN code TYPE integer USING 7;
UPDATE app.plans SET seats = 2147483647, updated_at = updated_at + interval '1 day';
"""


def floe_yml(tmp_path: Path, source_url: str, settings: dict[str, Any], notify: str | None = None,
             **policy: Any) -> Path:
    config = {"sources": {"shop": {"type": "sql", "url": source_url, "schema": "app", **policy,
                                   "tables": [{"name": "orders", "replication_key": "updated_at"},
                                              {"name": "plans", "replication_key": "updated_at"}]}},
              "destinations": {"warehouse": settings}, **({"notify": {"webhook": notify}} if notify else {})}
    (tmp_path / "floe.yml").write_text(json.dumps(config))  # JSON is YAML
    return tmp_path / "floe.yml"


def floe_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLOE, "run", "-c", str(config)], capture_output=True, text=True, cwd=config.parent,
                          timeout=120, check=False)


def test_floe_run_widens_the_columns_of_a_source_type_change_and_keeps_every_value(postgres_db, warehouse, tmp_path,
                                                                                   webhook):
    url, received = webhook
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
    config = floe_yml(tmp_path, postgres_db.url, warehouse, notify=url)
    assert all(r.ok for r in runner.run(load_config(config)))  # the first run, in this process
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(CHANGES)

    second = floe_run(config)
    assert second.returncode == 0, second.stderr
    # int -> numeric(12,2) and date -> timestamptz: the columns were widened, each value is exact (the
    # changed rows replaced the first ones: the tables have primary keys, so their streams merge).
    rows = warehouse_rows(warehouse, tmp_path, "SELECT id, amount, due FROM shop.orders ORDER BY id")
    assert rows == [(i, Decimal(9900 + i) + Decimal("10.25"), datetime(2026, 3, 1, 17, 45, tzinfo=UTC))
                    for i in range(11)]
    assert rows[0][1] == Decimal("9910.25")
    assert str(warehouse_state(warehouse, tmp_path, "shop", "orders")["replication_key_value"]).startswith("2026-03-02")
    lines = [line for line in second.stderr.splitlines() if "event=schema_change" in line and "shop.orders" in line]
    assert len(lines) == 2 and any("column=amount old=INTEGER new=" in line for line in lines), second.stderr
    # The lossless changes of the other table loaded exactly, into the columns as they were.
    assert warehouse_rows(warehouse, tmp_path, "SELECT seats, code FROM shop.plans") == [(2147483647, "7")]
    # One notice for the changed table; a run that changes nothing sends none.
    assert [(m["event"], m["stream"], [c["column"] for c in m["schema_changes"]]) for m in received] == [
        ("schema_changed", "orders", ["amount", "due"])]
    assert "widened column 'amount' from INTEGER to " in received[0]["text"]
    assert floe_run(config).returncode == 0 and len(received) == 1


def test_with_freeze_floe_run_refuses_a_source_type_change_naming_column_and_types(postgres_db, warehouse, tmp_path):
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
    config = floe_yml(tmp_path, postgres_db.url, warehouse, schema_changes={"orders": "freeze"})
    assert all(r.ok for r in runner.run(load_config(config)))
    loaded = warehouse_rows(warehouse, tmp_path, "SELECT id, amount, due FROM shop.orders ORDER BY id")
    bookmark = warehouse_state(warehouse, tmp_path, "shop", "orders")
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(CHANGES)

    second = floe_run(config)
    assert second.returncode == 1
    error = second.stderr.replace("\n", " ")
    assert "loading shop.orders failed, nothing committed: column 'amount' is INTEGER in the warehouse and " \
           "the new values are decimal128(12, 2) and schema_changes is freeze" in error
    assert "column 'due' is DATE in the warehouse and the new values are timestamp[us, tz=UTC]" in error
    # Nothing was rounded or cut, and the bookmark did not move past the changed rows.
    assert warehouse_rows(warehouse, tmp_path, "SELECT id, amount, due FROM shop.orders ORDER BY id") == loaded
    assert warehouse_state(warehouse, tmp_path, "shop", "orders") == bookmark
    # `plans` (evolve, by default) loaded exactly.
    assert warehouse_rows(warehouse, tmp_path, "SELECT seats, code FROM shop.plans") == [(2147483647, "7")]


def floe_target(tmp_path: Path, settings: dict[str, Any], messages: list[dict[str, Any]]) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "target.json").write_text(json.dumps(settings))
    return subprocess.run([FLOE, "target", settings["type"], "--config", "target.json"], capture_output=True,
                          input=b"".join(orjson.dumps(m) + b"\n" for m in messages), cwd=tmp_path, timeout=120,
                          check=False)


def in_process_target(tmp_path: Path, settings: dict[str, Any], messages: list[dict[str, Any]]) -> list[bytes]:
    """What `floe target` does, in this process; returns the STATE lines it wrote."""
    dest, out = make_destination(settings, tmp_path), io.BytesIO()
    try:
        SingerTarget(dest, tmp_path / ".floe" / "stage", out).run(orjson.dumps(m) + b"\n" for m in messages)
    finally:
        dest.close()
    return out.getvalue().splitlines()


def singer_stream(properties: dict[str, Any], rows: list[dict[str, Any]], bookmark: int) -> list[dict[str, Any]]:
    return [{"type": "SCHEMA", "stream": "payments", "key_properties": ["id"],
             "schema": {"type": "object", "properties": {"id": {"type": "integer"}, **properties}}},
            *({"type": "RECORD", "stream": "payments", "record": r} for r in rows),
            {"type": "STATE", "value": {"bookmark": bookmark}}]


def test_floe_target_widens_a_property_type_change_and_keeps_every_value(warehouse, tmp_path):
    assert in_process_target(tmp_path, warehouse, singer_stream(
        {"amount": {"type": "integer"}, "day": {"type": "string", "format": "date"}, "code": {"type": "string"}},
        [{"id": 1, "amount": 10, "day": "2026-03-01", "code": "x"}], 1)) == [b'{"bookmark":1}']

    # integer -> number (BIGINT and double: no type holds both exactly): the numbers go to amount__v_double;
    # date -> date-time: the column becomes TIMESTAMPTZ and keeps the time.
    changed = floe_target(tmp_path, warehouse, singer_stream(
        {"amount": {"type": "number"}, "day": {"type": "string", "format": "date-time"}},
        [{"id": 2, "amount": 10.75, "day": "2026-03-01T17:45:00+00:00"}, {"id": 3, "amount": 0.4}], 2))
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout == b'{"bookmark":2}\n'
    assert warehouse_rows(warehouse, tmp_path, "SELECT id, amount, amount__v_double, day FROM singer.payments "
                                               "ORDER BY id") == [
        (1, 10, None, datetime(2026, 3, 1, tzinfo=UTC)), (2, None, 10.75, datetime(2026, 3, 1, 17, 45, tzinfo=UTC)),
        (3, None, 0.4, None)]
    assert warehouse_state(warehouse, tmp_path, "singer", "payments")["singer_state"] == {"bookmark": 2}

    assert in_process_target(tmp_path, warehouse, singer_stream(  # string -> integer: text holds integers exactly
        {"code": {"type": "integer"}}, [{"id": 4, "code": 2**62}], 3)) == [b'{"bookmark":3}']
    assert warehouse_rows(warehouse, tmp_path, "SELECT code FROM singer.payments WHERE id = 4") == [(str(2**62),)]


def test_floe_target_with_freeze_refuses_a_property_type_change(warehouse, tmp_path):
    settings = {**warehouse, "schema_changes": "freeze"}
    assert in_process_target(tmp_path, warehouse, singer_stream({"amount": {"type": "integer"}},
                                                                [{"id": 1, "amount": 10}], 1)) == [b'{"bookmark":1}']
    changed = floe_target(tmp_path, settings, singer_stream({"amount": {"type": "number"}},
                                                            [{"id": 2, "amount": 10.75}], 2))
    assert changed.returncode == 1 and changed.stdout == b""  # the STATE is not passed on
    assert "loading singer.payments failed, nothing committed: column 'amount' is BIGINT in the warehouse and " \
           "the new values are double and schema_changes is freeze" in changed.stderr.decode().replace("\n", " ")
    assert warehouse_rows(warehouse, tmp_path, "SELECT id, amount FROM singer.payments") == [(1, 10)]
    assert warehouse_state(warehouse, tmp_path, "singer", "payments")["singer_state"] == {"bookmark": 1}


class ChangingStream(Stream):
    """Three checkpoints whose `amount` is int32, then decimal(12, 2), then a list (a struct-like value)."""

    name = "payments"
    schema = pa.schema([pa.field("id", pa.int64())])

    async def read(self, state: dict[str, Any] | None) -> AsyncIterator[Batch]:
        for n, amount in enumerate([pa.array([10], pa.int32()), pa.array([Decimal("9910.25")], pa.decimal128(12, 2)),
                                    pa.array([[1, 2]], pa.list_(pa.int64()))]):
            yield Batch(pa.record_batch({"id": pa.array([n], pa.int64()), "amount": amount}), {"n": n})


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_a_type_change_in_the_middle_of_a_run_widens_then_moves_values_to_a_variant(kind, tmp_path, request):
    dest = make_destination(settings_for(kind, tmp_path, request), tmp_path)
    dest.commit_rows = 0  # every checkpoint commits
    try:
        stream = ChangingStream()
        result = asyncio.run(run_stream(OneStreamSource(stream), stream, dest, tmp_path / "stage"))
        assert result.ok, result.error
        assert [c["kind"] for c in result.schema_changes] == ["widen", "variant"]
        rows = dest.query('SELECT id, amount, amount__v_json FROM src.payments ORDER BY id')
        assert [(i, a, json.loads(v) if isinstance(v, str) else v) for i, a, v in rows] == [
            (0, Decimal("10"), None), (1, Decimal("9910.25"), None), (2, None, [1, 2])]
        assert dest.get_state("src", "payments") == {"n": 2}
        details = [json.loads(d) for (d,) in dest.query(
            f"SELECT details FROM {dest.qualified(dest.meta_schema, '_floe_loads')} WHERE details IS NOT NULL "
            "ORDER BY finished_at")]
        assert details == [{"schema_changes": [{"kind": "widen", "column": "amount", "old": "INTEGER",
                                                 "new": details[0]["schema_changes"][0]["new"]}]},
                           {"schema_changes": [{"kind": "variant", "column": "amount__v_json", "of": "amount",
                                                 "old": details[0]["schema_changes"][0]["new"],
                                                 "new": "JSON" if kind == "duckdb" else "JSONB"}]}]
    finally:
        dest.close()
