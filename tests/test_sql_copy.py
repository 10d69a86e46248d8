"""The SQL source's binary COPY reader against the real PostgreSQL server: every type and edge
value gives exactly the batches the cursor reader gives (the reference: it is what Redshift
uses, and what PostgreSQL tables were read with before COPY), and failures end the read cleanly.
Where a test names READERS, Redshift's UNLOAD path (replayed on the same server and the local S3
server, tests/fixtures/redshift_unload.py) must give those batches too."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from floe.core.errors import ConfigError, SourceError
from floe.core.stream import Batch, State
from floe.infra import pgcopy
from floe.sources.sql import SqlSource, SqlSourceConfig, SqlStream
from floe.testing.postgres import PostgresDatabase
from tests.fixtures.redshift_unload import unload_source

READERS = ("copy", "cursor", "unload")

TYPES = r"""
CREATE SCHEMA app;
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE app.everything (
  id integer PRIMARY KEY,
  i2 smallint, i4 integer, i8 bigint, o oid,
  f4 real, f8 double precision,
  b boolean,
  t text, vc varchar(20), bc char(5), nm name, ch "char",
  n_fixed numeric(10, 2), n_wide numeric(38, 10), n_free numeric,
  tstz timestamptz, ts timestamp, d date, tm time, tmtz timetz, iv interval,
  by bytea, js json, jb jsonb, u uuid,
  ints integer[], texts text[], mood app.mood, addr inet, cash money, bits bit varying(8), x xml);
INSERT INTO app.everything VALUES
  (1, -32768, -2147483648, -9223372036854775808, 0,
   'NaN', 'NaN', true,
   '', '', '', '', 'a',
   -99999999.99, -9999999999999999999999999999.9999999999, 'NaN',
   '0001-01-01 00:00:00+00', '0001-01-01 00:00:00', '0001-01-01', '00:00:00', '00:00:00+00', '0 seconds',
   '\x', '{}', '{}', '00000000-0000-0000-0000-000000000000',
   '{}', '{}', 'sad', '0.0.0.0', 0, B'', '<a/>'),
  (2, 32767, 2147483647, 9223372036854775807, 4294967295,
   'Infinity', 'Infinity', false,
   'comma, "quote", new
line, tab	and \ backslash', 'ünïcødé 🎉', 'ab', 'some_name', 'Z',
   99999999.99, 9999999999999999999999999999.9999999999, '123456789012345678901234567890.123456789012345678901234567890',
   '9999-12-31 23:59:59.999999+00', '9999-12-31 23:59:59.999999', '9999-12-31', '23:59:59.999999', '23:59:59.999999-14:59', '-178000000 years',
   '\x00ff0a0d2c22', '{"b": [1, 2.50, null],   "a": "x"}', '{"b": [1, 2.50, null],   "a": "x"}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
   '{1,NULL,3}', '{"a,b","c\"d",NULL,""}', 'happy', '2001:db8::1/64', -12.34, B'10101', '<a b="1">text &amp; more</a>'),
  (3, 0, 0, 0, 42,
   '-Infinity', '-Infinity', NULL,
   'carriage' || chr(13) || chr(10) || 'return', repeat('é', 20), 'abcde', 'x', ' ',
   0, 0.0000000001, '-0.000000000000000000000000000000001',
   '1999-12-31 23:59:59.999999+00', '2000-01-01 00:00:00', '1999-12-31', '12:34:56.789', '12:00:00+05:30', '1 year 2 mons 3 days 04:05:06.789',
   decode(repeat('00ff', 50000), 'hex'), '"just a string"', '[1, "two", {"3": null}]', NULL,
   '{{1,2},{3,4}}', NULL, NULL, NULL, NULL, NULL, NULL),
  (4, 1, 1, 1, 1,
   '-0', '-0', true,
   repeat('long text ', 20000), NULL, NULL, NULL, NULL,
   0.01, NULL, '1e-20',
   '1969-07-20 20:17:40.5+00', '1969-07-20 20:17:40.5', '1970-01-01', '00:00:00.000001', NULL, NULL,
   NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (5, NULL, NULL, NULL, NULL, 1.1, 0.1, NULL,
   NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL,
   '2026-03-29 02:30:00+02', '2026-03-29 02:30:00', '2000-01-01', NULL, NULL, NULL,
   NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (6, NULL, NULL, NULL, NULL, 1.4e-45, 5e-324, NULL,
   NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (7, 7, 7, 7, 7, 3.4028235e38, 1.7976931348623157e308, false,
   'x', 'x', 'x', 'x', 'x',
   1.5, 1.5, 1.5,
   '2024-02-29 12:00:00-08', '2024-02-29 12:00:00', '2024-02-29', '23:00:00', '23:00:00+00', '1 day',
   'x', 'null', 'null', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12',
   '{7}', '{x}', 'ok', '10.0.0.1', 7, B'1', '<x/>');
"""


@pytest.fixture
def db(postgres_db: PostgresDatabase) -> PostgresDatabase:
    execute(postgres_db, TYPES)
    return postgres_db


def execute(db: PostgresDatabase, sql: str, params: Any = None) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(sql, params)


def source(db: PostgresDatabase, read_with: str, **extra: Any) -> SqlSource:
    return SqlSource("crm", SqlSourceConfig.model_validate(
        {"type": "sql", "url": db.url, "schema": "app", "read_with": read_with, **extra}))


@pytest.fixture
def reader(request: pytest.FixtureRequest, db: PostgresDatabase) -> Callable[..., SqlStream]:
    """`reader(read_with, table, **config)`: the table's stream read with COPY, a cursor or (Redshift
    replayed) UNLOAD; the S3 server starts only for an UNLOAD."""
    def make(read_with: str, table: str, **extra: Any) -> SqlStream:
        if read_with == "unload":
            return stream_of(unload_source(db, request.getfixturevalue("unload_settings"), schema="app", **extra), table)
        return stream(db, read_with, table, **extra)

    return make


def stream(db: PostgresDatabase, read_with: str, table: str, **extra: Any) -> SqlStream:
    return stream_of(source(db, read_with, **extra), table)


def stream_of(source: SqlSource, table: str = "everything") -> SqlStream:
    found = next(s for s in source.streams() if s.name == table)
    assert isinstance(found, SqlStream)
    return found


def read(s: SqlStream, state: State | None = None) -> list[Batch]:
    async def collect() -> list[Batch]:
        return [b async for b in s.read(state)]

    return asyncio.run(collect())


def table(batches: list[Batch]) -> pa.Table:
    return pa.Table.from_batches([b.records for b in batches if b.records is not None])


def assert_same(copied: pa.Table, cursor: pa.Table) -> None:
    """Equal schemas (metadata too) and values, floats compared by their bits (NaN, -0.0)."""
    assert copied.schema.equals(cursor.schema, check_metadata=True), (copied.schema, cursor.schema)
    assert copied.num_rows == cursor.num_rows
    for name in copied.column_names:
        a, b = copied.column(name).combine_chunks(), cursor.column(name).combine_chunks()
        if pa.types.is_floating(a.type):
            bits = pa.int32() if pa.types.is_float32(a.type) else pa.int64()
            a, b = a.view(bits), b.view(bits)
        assert a.equals(b), (name, a.to_pylist()[:8], b.to_pylist()[:8])


def test_every_type_reads_as_the_cursor_reads_it(db: PostgresDatabase) -> None:
    everything = {r: stream(db, r, "everything") for r in ("copy", "cursor")}
    assert everything["copy"].source.reads_with_copy and not everything["cursor"].source.reads_with_copy
    copied, cursor = (table(read(everything[r])) for r in ("copy", "cursor"))
    assert_same(copied, cursor)
    rows = {r["id"]: r for r in copied.to_pylist()}
    # spot checks against PostgreSQL's own meaning, not only against the cursor reader
    assert math.isnan(rows[1]["f4"]) and rows[2]["f8"] == math.inf and rows[3]["f4"] == -math.inf
    assert math.copysign(1, rows[4]["f8"]) == -1 and rows[6]["f8"] == 5e-324
    assert rows[1]["t"] == "" and rows[5]["t"] is None and rows[1]["bc"] == "     " and rows[2]["bc"] == "ab   "
    assert rows[2]["t"] == 'comma, "quote", new\nline, tab\tand \\ backslash' and rows[2]["vc"] == "ünïcødé 🎉"
    assert rows[3]["t"] == "carriage\r\nreturn" and rows[4]["t"] == "long text " * 20000
    assert rows[2]["n_fixed"] == Decimal("99999999.99") and rows[4]["n_fixed"] == Decimal("0.01")
    assert rows[2]["n_free"] == "123456789012345678901234567890.123456789012345678901234567890"
    assert rows[1]["n_free"] == "NaN" and rows[4]["n_free"] == "0.00000000000000000001"
    assert rows[1]["tstz"] == datetime(1, 1, 1, tzinfo=UTC) and rows[5]["tstz"] == datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    assert rows[3]["tstz"] == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert rows[4]["ts"] == datetime(1969, 7, 20, 20, 17, 40, 500000) and rows[2]["d"] == date(9999, 12, 31)
    assert rows[3]["tm"] == dtime(12, 34, 56, 789000) and rows[2]["tmtz"] == "23:59:59.999999-14:59"
    assert rows[3]["iv"] == "1 year 2 mons 3 days 04:05:06.789"
    assert rows[1]["by"] == b"" and rows[2]["by"] == b"\x00\xff\x0a\x0d\x2c\x22" and len(rows[3]["by"]) == 100_000
    assert rows[2]["js"] == '{"b": [1, 2.50, null],   "a": "x"}' and rows[2]["jb"] == '{"a": "x", "b": [1, 2.50, null]}'
    assert rows[7]["js"] == "null" and rows[3]["jb"] == '[1, "two", {"3": null}]'
    assert rows[2]["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" and rows[2]["texts"] == '{"a,b","c\\"d",NULL,""}'
    assert rows[2]["o"] == 4294967295 and rows[1]["i8"] == -9223372036854775808 and rows[2]["mood"] == "happy"
    assert copied.schema.field("js").metadata == {b"floe.json": b"1"}


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 50_000])
def test_batches_and_their_checkpoints_are_the_cursors(db: PostgresDatabase, batch_rows: int) -> None:
    tables = [{"name": "everything", "replication_key": "tstz"}]
    batches = {r: read(stream(db, r, "everything", tables=tables, batch_rows=batch_rows)) for r in ("copy", "cursor")}
    assert [b.records.num_rows for b in batches["copy"]] == [b.records.num_rows for b in batches["cursor"]]
    assert [b.checkpoint for b in batches["copy"]] == [b.checkpoint for b in batches["cursor"]]
    assert batches["copy"][-1].checkpoint == {"replication_key": "tstz",
                                              "replication_key_value": "9999-12-31T23:59:59.999999+00:00"}
    assert_same(table(batches["copy"]), table(batches["cursor"]))


REDSHIFT_TYPES = r"""
CREATE TABLE app.redshift_types (
  id integer PRIMARY KEY, big bigint, small smallint, note text, code varchar(20), flag char(3),
  price double precision, ratio real, paid boolean, at timestamptz, day date, amount numeric(12,2), tm time);
INSERT INTO app.redshift_types VALUES
  (1, -9223372036854775808, -32768, 'it''s "quoted", with a new
line, a tab	and a \ backslash', 'ünïcødé 🎉', 'ab', 'NaN', 'Infinity', true, '0001-01-01 00:00:00+00', '0001-01-01',
   -9999999999.99, '00:00:00'),
  (2, 9223372036854775807, 32767, '', '', '', '-Infinity', '-0', false, '9999-12-31 23:59:59.999999+00',
   '9999-12-31', 9999999999.99, '23:59:59.999999'),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (4, 0, 0, 'carriage' || chr(13) || chr(10) || 'return', 'x', 'xyz', 5e-324, 1.4e-45, true,
   '2026-03-29 02:30:00+02', '2024-02-29', 0.01, '12:34:56.789');
INSERT INTO app.redshift_types
SELECT i, i::bigint * 1000003, (i % 1000)::smallint, 'row ' || i, NULL, 'r', i / 7.0, i / 3.0, i % 2 = 0,
       timestamptz '2020-01-01 00:00+00' + i * interval '1 second', date '2000-01-01' + i, i * 1.25,
       time '00:00' + i * interval '1 second'
FROM generate_series(5, 2600) AS i;
"""


@pytest.mark.parametrize("batch_rows", [7, 50_000])
def test_the_types_redshift_has_read_alike_on_every_path(db: PostgresDatabase, reader: Callable[..., SqlStream],
                                                         batch_rows: int) -> None:
    execute(db, REDSHIFT_TYPES)
    tables = [{"name": "redshift_types", "replication_key": "at"}]
    got = {r: read(reader(r, "redshift_types", tables=tables, batch_rows=batch_rows)) for r in READERS}
    for r in READERS:  # in key order, as the cursor reads them, with the same final state
        assert_same(table(got[r]), table(got["cursor"]))
        marks = [b.checkpoint["replication_key_value"] for b in got[r]]
        assert marks == sorted(marks) and marks[-1] == "9999-12-31T23:59:59.999999+00:00"
        assert max(b.records.num_rows for b in got[r]) <= batch_rows
    rows = {row["id"]: row for row in table(got["unload"]).to_pylist()}
    assert rows[1]["note"] == 'it\'s "quoted", with a new\nline, a tab\tand a \\ backslash'
    assert rows[4]["note"] == "carriage\r\nreturn" and rows[1]["code"] == "ünïcødé 🎉" and rows[1]["flag"] == "ab "
    assert rows[1]["at"] == datetime(1, 1, 1, tzinfo=UTC) and rows[4]["at"] == datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    assert rows[2]["small"] == 32767 and rows[1]["big"] == -9223372036854775808 and rows[2]["amount"] == Decimal("9999999999.99")
    assert math.isnan(rows[1]["price"]) and math.copysign(1, rows[2]["ratio"]) == -1 and rows[4]["price"] == 5e-324
    assert rows[4]["tm"] == dtime(12, 34, 56, 789000) and rows[2]["tm"] == dtime(23, 59, 59, 999999)
    assert all(v is None for k, v in rows[3].items() if k != "id")
    full = {r: table(read(reader(r, "redshift_types", tables=["redshift_types"]))).sort_by("id") for r in READERS}
    for r in READERS:  # a full-table UNLOAD is parallel: its parts come in no order
        assert_same(full[r], full["cursor"])


def test_nulls_in_any_pattern_among_fixed_width_columns(db: PostgresDatabase) -> None:
    """Rows with a NULL inside a run of fixed-width columns are read field by field: every mix."""
    execute(db, """
        CREATE TABLE app.sparse (id integer PRIMARY KEY, a smallint, b bigint, c double precision, d boolean,
                                 e text, f timestamptz, g date, h real, k integer);
        INSERT INTO app.sparse
        SELECT i, CASE WHEN i & 1 = 0 THEN i END, CASE WHEN i & 2 = 0 THEN i * 1000003 END,
               CASE WHEN i & 4 = 0 THEN i / 7.0 END, CASE WHEN i & 8 = 0 THEN i % 3 = 0 END,
               CASE WHEN i & 16 = 0 THEN repeat('e', i % 5) END,
               CASE WHEN i & 32 = 0 THEN timestamptz '2020-01-01 00:00+00' + i * interval '1 minute' END,
               CASE WHEN i & 64 = 0 THEN date '2000-01-01' + i END, CASE WHEN i & 128 = 0 THEN i / 3.0 END,
               CASE WHEN i & 256 = 0 THEN -i END
        FROM generate_series(0, 1023) AS i;
    """)
    copied, cursor = (table(read(stream(db, r, "sparse", batch_rows=300))) for r in ("copy", "cursor"))
    assert copied.num_rows == 1024 and copied.column("b").null_count == 512
    assert_same(copied, cursor)


def test_an_incremental_read_binds_its_bookmark_as_a_literal(db: PostgresDatabase,
                                                              reader: Callable[..., SqlStream]) -> None:
    execute(db, r"""CREATE TABLE app.people (name text PRIMARY KEY, n integer);
                    INSERT INTO app.people VALUES ('O''Brien', 1), ('O''Connor', 2), ('a %s b', 3), ('Zoë', 4),
                                                  ('O''Br\ien', 5), ('O''Br\', 6);""")
    tables = [{"name": "people", "replication_key": "name"}]
    state = {"replication_key": "name", "replication_key_value": "O'Br\\"}  # a quote, and a backslash last
    got = {r: read(reader(r, "people", tables=tables), state) for r in READERS}
    assert table(got["copy"]).column("name").to_pylist() == ["O'Br\\", "O'Br\\ien", "O'Brien", "O'Connor", "Zoë", "a %s b"]
    for r in READERS:
        assert_same(table(got[r]), table(got["cursor"]))
        assert got[r][-1].checkpoint == {"replication_key": "name", "replication_key_value": "a %s b"}


def test_an_empty_table_gives_one_empty_batch_with_its_columns(db: PostgresDatabase,
                                                               reader: Callable[..., SqlStream]) -> None:
    execute(db, "DELETE FROM app.everything")
    got = {r: read(reader(r, "everything")) for r in READERS}
    for r in READERS:
        assert [b.records.num_rows for b in got[r] if b.records is not None] == [0]
        assert got[r][-1].checkpoint == {"full_table": True}
        assert_same(table(got[r]), table(got["cursor"]))


@pytest.mark.parametrize(("column", "value", "message"), [
    ("tstz", "infinity", "a timestamp is 'infinity' or out of range"),
    ("ts", "-infinity", "a timestamp is 'infinity' or out of range"),
    ("d", "infinity", "a date is 'infinity' or out of range"),
    ("d", "-infinity", "a date is 'infinity' or out of range"),
    ("tm", "24:00:00", "a time is 24:00:00"),
])
def test_values_arrow_cannot_hold_fail_the_read_naming_the_column(db: PostgresDatabase, column: str, value: str,
                                                                  message: str) -> None:
    execute(db, f"UPDATE app.everything SET {column} = '{value}' WHERE id = 3")
    with pytest.raises(SourceError, match=rf"sources.crm: reading table everything from postgresql://.* failed: column '{column}': "
                                          + message):
        read(stream(db, "copy", "everything"))
    with pytest.raises(SourceError):  # the cursor cannot read it either
        read(stream(db, "cursor", "everything"))


def test_a_server_error_in_the_middle_of_the_copy_ends_the_read_with_it(db: PostgresDatabase) -> None:
    execute(db, "CREATE VIEW app.failing AS SELECT i, 100 / (55000 - i) AS q FROM generate_series(1, 60000) AS i")
    failing = stream(db, "copy", "failing", tables=["failing"])
    batches = failing.source.batches(failing, *failing.query(None, copy=True))
    first = next(batches)
    assert first.num_rows == 50_000
    with pytest.raises(SourceError, match="failed: division by zero"):
        next(batches)


def test_stopping_early_ends_the_reader_thread_and_the_session(db: PostgresDatabase) -> None:
    execute(db, "CREATE TABLE app.big AS SELECT i, repeat('x', 100) AS pad FROM generate_series(1, 100000) AS i")
    big = stream(db, "copy", "big", batch_rows=1000)
    batches = big.source.batches(big, *big.query(None, copy=True))
    assert next(batches).num_rows == 1000
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "floe-copy-reader"]
    deadline = time.monotonic() + 10
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'floe-sql' AND datname = %s"
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        while conn.execute(sessions, (db.database,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the COPY session is still open"
            time.sleep(0.05)


def test_a_session_killed_mid_copy_ends_the_read_with_an_error(db: PostgresDatabase) -> None:
    execute(db, "CREATE TABLE app.big AS SELECT i, repeat('x', 100) AS pad FROM generate_series(1, 100000) AS i")
    big = stream(db, "copy", "big", batch_rows=1000)
    batches = big.source.batches(big, *big.query(None, copy=True))
    assert next(batches).num_rows == 1000
    execute(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'floe-sql' "
                "AND datname = %s", (db.database,))
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"(?s)sources.crm: reading table big from .* failed: .*"
                       r"(server closed the connection|terminating connection due to administrator command)"):
        for _ in batches:
            pass
    assert time.monotonic() - started < 10
    assert not [t for t in threading.enumerate() if t.name == "floe-copy-reader"]


def test_wide_rows_make_smaller_batches(db: PostgresDatabase) -> None:
    execute(db, "CREATE TABLE app.wide AS SELECT i, repeat('w', 100000) AS pad FROM generate_series(1, 30) AS i")
    with psycopg.connect(db.dsn) as conn:
        sizes = [b.num_rows for b in pgcopy.copy_batches(conn, "SELECT i, pad FROM app.wide ORDER BY i", (), 25,
                                                         batch_bytes=500_000)]
    assert sum(sizes) == 30 and len(sizes) >= 3 and max(sizes) < 25  # cut by bytes, not by rows


def test_text_that_is_not_utf8_is_an_error(postgres_db: PostgresDatabase) -> None:
    """A SQL_ASCII database holds any bytes; asked for UTF-8, the server refuses what is not."""
    execute(postgres_db, "CREATE DATABASE latin_bytes ENCODING 'SQL_ASCII' TEMPLATE template0")
    dsn = postgres_db.dsn.replace(f"dbname={postgres_db.database}", "dbname=latin_bytes")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id integer, s text)")
            conn.execute("INSERT INTO t VALUES (1, convert_from('\\x6361fe'::bytea, 'SQL_ASCII'))")
        with psycopg.connect(dsn) as conn:
            with pytest.raises(psycopg.errors.CharacterNotInRepertoire, match='invalid byte sequence for encoding "UTF8"'):
                list(pgcopy.copy_batches(conn, "SELECT id, s FROM t"))
            conn.rollback()
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)  # the connection goes on
    finally:
        execute(postgres_db, "DROP DATABASE latin_bytes")


def test_a_column_of_a_type_copy_does_not_decode_must_be_selected_as_text(db: PostgresDatabase) -> None:
    with psycopg.connect(db.dsn) as conn, pytest.raises(ValueError, match=r"cannot decode n_fixed \(type oid 1700\)"):
        list(pgcopy.copy_batches(conn, "SELECT id, n_fixed FROM app.everything"))


def test_redshift_reads_with_a_cursor(db: PostgresDatabase) -> None:
    url = db.url.replace("postgresql://", "redshift://")
    with pytest.raises(ConfigError, match="sources.crm.read_with: Redshift cannot COPY to the client"):
        SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", "url": url, "read_with": "copy"}))
    redshift = SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", "url": url, "schema": "app"}))
    default = SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", "url": db.url, "schema": "app"}))
    copied, cursor = (table(read(stream_of(s))) for s in (default, redshift))
    assert default.reads_with_copy and not redshift.reads_with_copy
    assert_same(copied, cursor)
    # Redshift's TEXT is a VARCHAR(256): a column read as text is cast to its longest VARCHAR instead
    select = stream_of(redshift).query(None)[0]
    assert 'CAST("x" AS VARCHAR(65535)) AS "x"' in select and " AS text)" not in select
    assert 'CAST("x" AS text) AS "x"' in stream_of(default).query(None)[0]


def test_a_numeric_nan_fails_the_read_naming_the_column(db: PostgresDatabase) -> None:
    execute(db, "UPDATE app.everything SET n_fixed = 'NaN' WHERE id = 3")
    with pytest.raises(SourceError, match="sources.crm: table everything, column 'n_fixed': .*NaN"):
        read(stream(db, "copy", "everything"))
    with pytest.raises(SourceError, match="NaN"):  # nor can the cursor read it
        read(stream(db, "cursor", "everything"))


def test_a_statement_timeout_ends_the_copy_with_a_hint(db: PostgresDatabase) -> None:
    """One COPY reads the whole table where the cursor runs a FETCH per batch, each a statement of its own."""
    execute(db, "CREATE VIEW app.slow AS SELECT i, pg_sleep(0.002) IS NULL AS slept FROM generate_series(1, 1000) AS i")
    execute(db, f'ALTER DATABASE "{db.database}" SET statement_timeout = 500')
    tables = [{"name": "slow", "primary_key": ["i"]}]  # no ORDER BY: the cursor fetches as the rows come
    with pytest.raises(SourceError, match=r"canceling statement due to statement timeout \(a table is read by one "
                                          r"COPY statement, .* or set sources.crm.read_with: cursor\)"):
        read(stream(db, "copy", "slow", tables=tables, batch_rows=20))
    batches = read(stream(db, "cursor", "slow", tables=tables, batch_rows=20))
    assert sum(b.records.num_rows for b in batches if b.records is not None) == 1000
