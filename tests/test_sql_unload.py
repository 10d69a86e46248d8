"""The SQL source's UNLOAD path (`read_with: unload`), on Redshift replayed by PostgreSQL and the
local S3 server (`tests/fixtures/redshift_unload.py`): the statement, the parts read back, cleanup,
failures and secrets. Its values against the other read paths are in tests/test_sql_copy.py."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
import sqlglot

from floe.core.errors import ConfigError, SourceError
from floe.core.stream import Batch, DayRange
from floe.destinations.duckdb import DuckDBDestination
from floe.engine.pipeline import run_stream
from floe.infra.redshift_s3 import literal
from floe.sources.sql import SqlSource, SqlSourceConfig, SqlStream
from floe.sources.sql_unload import Unloader
from floe.testing.postgres import PostgresDatabase
from tests.fixtures.objectstores import S3Server
from tests.fixtures.redshift_unload import SECRET, UnloadOnPostgres, parse_unload, staged_keys, unload_source

ORDERS = r"""
CREATE SCHEMA app;
CREATE TABLE app.orders (id integer PRIMARY KEY, n smallint, note text, at timestamptz NOT NULL, price double precision);
INSERT INTO app.orders
SELECT i, (i % 100)::smallint, CASE WHEN i % 7 = 0 THEN NULL ELSE 'it''s "#' || i || E'"\n\\ done' END,
       timestamptz '2026-01-01 00:00+00' + (i / 3) * interval '1 minute', i * 0.5
FROM generate_series(1, 2500) AS i;
"""


@pytest.fixture
def db(postgres_db: PostgresDatabase) -> PostgresDatabase:
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
    return postgres_db


def orders(db: PostgresDatabase, unload: dict[str, Any], incremental: bool = True, **extra: Any) -> SqlStream:
    tables = [{"name": "orders", "replication_key": "at"}] if incremental else ["orders"]
    source = unload_source(db, unload, schema="app", tables=tables, **extra)
    stream = source.streams()[0]
    assert isinstance(stream, SqlStream)
    return stream


def read(stream: SqlStream, state: Any = None) -> list[Batch]:
    async def collect() -> list[Batch]:
        return [b async for b in stream.read(state)]

    return asyncio.run(collect())


def rows(batches: list[Batch]) -> pa.Table:
    return pa.Table.from_batches([b.records for b in batches if b.records is not None])


def test_the_statement_is_redshift_unload_with_its_options(db: PostgresDatabase, unload_settings: dict[str, Any]) -> None:
    stream = orders(db, {**unload_settings, "max_file_size_mb": 64})
    state = {"replication_key": "at", "replication_key_value": "2026-01-01T10:00:00+00:00"}
    got = rows(read(stream, state))
    assert got.num_rows == 2500 - 1800 + 1 and min(got.column("id").to_pylist()) == 1800
    (unload,) = stream.source.unloads  # type: ignore[attr-defined]
    assert unload.options == {"ACCESS_KEY_ID": "AKIDUNLOADTESTING", "SECRET_ACCESS_KEY": SECRET, "FORMAT": "PARQUET",
                              "MANIFEST": True, "PARALLEL": False, "MAXFILESIZE": 64, "REGION": "us-east-1"}
    assert unload.select == ('SELECT "id", "n", "note", "at", "price" FROM "app"."orders" WHERE "at" >= '
                             "CAST('2026-01-01T10:00:00+00:00' AS timestamptz) ORDER BY \"at\"")
    assert unload.target.startswith(f"{unload_settings['stage']}/crm/orders/") and unload.target.endswith("/")
    full = orders(db, {**unload_settings, "iam_role": "arn:aws:iam::123456789012:role/Unload", "aws_access_key_id": None,
                       "aws_secret_access_key": None}, incremental=False)
    statement = full.source.unloader.statement("SELECT 1", "s3://b/p/", ordered=False)  # type: ignore[union-attr]
    assert statement == ("UNLOAD ('SELECT 1') TO 's3://b/p/' IAM_ROLE 'arn:aws:iam::123456789012:role/Unload' "
                         "FORMAT AS PARQUET MANIFEST PARALLEL ON REGION 'us-east-1'")
    assert parse_unload(statement).options["PARALLEL"] is True


@pytest.mark.parametrize("text", ["O'Brien", "a\\b", "\\'", "''", "it's a \\' trap\\", "%s %%", "ünï\ncødé"])
def test_quotes_and_backslashes_survive_both_literals(text: str) -> None:
    """The SELECT is a literal inside the UNLOAD and the bookmark a literal inside the SELECT: each level's
    quotes and backslashes doubled, as Redshift's tokenizer (sqlglot's) reads them back."""
    select = f"SELECT * FROM t WHERE a = {literal(text)}"
    unload = parse_unload(f"UNLOAD ({literal(select)}) TO 's3://b/p/' IAM_ROLE default FORMAT AS PARQUET MANIFEST")
    assert unload.select == select
    assert sqlglot.parse_one(unload.select, read="redshift").find(sqlglot.exp.Literal).this == text  # type: ignore[union-attr]


def test_an_ordered_unload_reads_every_part_in_key_order(db: PostgresDatabase, unload_settings: dict[str, Any]) -> None:
    stream = orders(db, unload_settings, batch_rows=300)
    batches = read(stream)
    at = rows(batches).column("at").to_pylist()
    assert len(at) == 2500 and at == sorted(at)
    checkpoints = [b.checkpoint["replication_key_value"] for b in batches]
    assert checkpoints == sorted(checkpoints) and checkpoints[-1] == "2026-01-01T13:53:00+00:00"
    assert max(b.records.num_rows for b in batches) <= 300


def test_a_full_table_unload_is_parallel_and_reads_every_row_once(db: PostgresDatabase,
                                                                  unload_settings: dict[str, Any]) -> None:
    stream = orders(db, unload_settings, incremental=False)
    stream.source.rows_per_file = 300  # type: ignore[attr-defined]  # 9 parts dealt to 4 slices
    got = rows(read(stream))
    assert sorted(got.column("id").to_pylist()) == list(range(1, 2501))
    assert got.column("id").to_pylist() != sorted(got.column("id").to_pylist())  # parts per slice, in no order
    assert stream.source.unloads[0].options["PARALLEL"] is True  # type: ignore[attr-defined]


def test_staged_objects_are_deleted_after_a_read_and_when_it_stops_early(
        db: PostgresDatabase, unload_settings: dict[str, Any], s3_server: S3Server) -> None:
    stream = orders(db, unload_settings, batch_rows=100)
    read(stream)
    assert staged_keys(s3_server, unload_settings["stage"]) == []
    stopped = stream.source.batches(stream, *stream.query(None, unload=True))
    assert next(stopped).num_rows == 100
    assert staged_keys(s3_server, unload_settings["stage"])  # the parts, while they are read
    stopped.close()
    assert staged_keys(s3_server, unload_settings["stage"]) == []


def test_leftovers_of_a_dead_read_are_deleted_a_day_later(db: PostgresDatabase, unload_settings: dict[str, Any],
                                                          s3_server: S3Server) -> None:
    bucket, _, stage = unload_settings["stage"].removeprefix("s3://").partition("/")
    old = f"{stage}/crm/orders/2026/01/01/20260101T000000Z-dead/0000_part_00.parquet"
    recent = f"{stage}/crm/orders/2099/01/01/20990101T000000Z-live/0000_part_00.parquet"
    other = f"{stage}/crm/orders_archive/2026/01/01/20260101T000000Z-dead/0000_part_00.parquet"
    for key in (old, recent, other):
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"x")
    read(orders(db, unload_settings))
    assert sorted(staged_keys(s3_server, unload_settings["stage"])) == sorted([other, recent])


@pytest.mark.parametrize("manifest", [False, True], ids=["no-files", "empty-manifest"])
def test_an_empty_result_gives_one_empty_batch(db: PostgresDatabase, unload_settings: dict[str, Any],
                                               manifest: bool) -> None:
    stream = orders(db, unload_settings)
    stream.source.manifest_when_empty = manifest  # type: ignore[attr-defined]
    state = {"replication_key": "at", "replication_key_value": "2030-01-01T00:00:00+00:00"}
    batches = read(stream, state)
    assert [b.records.num_rows for b in batches] == [0]
    assert batches[0].records.schema == stream.schema
    assert batches[0].checkpoint == state


def test_a_failing_unload_is_a_clear_error_and_commits_nothing(
        db: PostgresDatabase, unload_settings: dict[str, Any], s3_server: S3Server,
        duckdb_destination: DuckDBDestination, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    source = unload_source(db, unload_settings, schema="app", tables=[{"name": "orders", "replication_key": "at"}])
    stream = source.streams()[0]
    asyncio.run(run_stream(source, stream, duckdb_destination, tmp_path / "stage"))
    before = duckdb_destination.get_state("crm", "orders")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO app.orders VALUES (9999, 1, 'late', '2027-01-01 00:00+00', 1)")
    source.fail_unload = f"S3 rejected {SECRET}"  # an error quoting the secret key (the replay writes a part first)
    result = asyncio.run(run_stream(source, stream, duckdb_destination, tmp_path / "stage"))
    assert not result.ok
    message = str(result.error)
    assert "sources.crm: reading table orders from postgresql://" in message and "S3 rejected ***" in message
    assert duckdb_destination.get_state("crm", "orders") == before
    assert duckdb_destination.query("SELECT count(*) FROM crm.orders") == [(2500,)]
    assert staged_keys(s3_server, unload_settings["stage"]) == []  # the part it wrote went too
    logged = caplog.text + json.dumps(before)
    assert SECRET not in logged and SECRET not in message


def test_a_part_missing_from_the_listing_or_rows_missing_fail_the_read(
        db: PostgresDatabase, unload_settings: dict[str, Any], s3_server: S3Server) -> None:
    class LosesAPart(UnloadOnPostgres):
        def run_unload(self, statement: str) -> int:
            count = super().run_unload(statement)
            unload = self.unloads[-1]
            bucket, _, prefix = unload.target.removeprefix("s3://").partition("/")
            self.s3().delete_object(Bucket=bucket, Key=prefix + "001.parquet")
            return count

    class CountsMore(UnloadOnPostgres):
        def run_unload(self, statement: str) -> int:
            return super().run_unload(statement) + 1

    for double, message in [(LosesAPart, r"UNLOAD part s3://.*/001.parquet of \d+ bytes is missing"),
                            (CountsMore, "UNLOAD wrote 2501 rows, its parts hold 2500")]:
        source = double("crm", SqlSourceConfig.model_validate(
            {"type": "sql", "url": db.url.replace("postgresql://", "redshift://"), "schema": "app",
             "unload": unload_settings, "tables": [{"name": "orders", "replication_key": "at"}]}))
        stream = source.streams()[0]
        assert isinstance(stream, SqlStream)
        with pytest.raises(SourceError, match=message):
            read(stream)
        assert staged_keys(s3_server, unload_settings["stage"]) == []


def test_parts_out_of_key_order_fail_rather_than_checkpoint_past_rows(
        db: PostgresDatabase, unload_settings: dict[str, Any]) -> None:
    class ParallelAnyway(UnloadOnPostgres):
        rows_per_file = 300  # 9 parts dealt to 4 slices

        def run_unload(self, statement: str) -> int:
            return super().run_unload(statement.replace("PARALLEL OFF", "PARALLEL ON"))

    source = ParallelAnyway("crm", SqlSourceConfig.model_validate(
        {"type": "sql", "url": db.url.replace("postgresql://", "redshift://"), "schema": "app",
         "unload": unload_settings, "tables": [{"name": "orders", "replication_key": "at"}]}))
    stream = source.streams()[0]
    assert isinstance(stream, SqlStream)
    with pytest.raises(SourceError, match="the UNLOAD parts are not in key order"):
        read(stream)


def test_unload_settings_are_checked(db: PostgresDatabase, unload_settings: dict[str, Any]) -> None:
    redshift = db.url.replace("postgresql://", "redshift://")

    def make(**config: Any) -> SqlSource:
        return SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", "url": redshift, **config}))

    with pytest.raises(ConfigError, match=r"sources.crm.unload: read_with: unload needs the S3 stage"):
        make(read_with="unload")
    with pytest.raises(ConfigError, match="UNLOAD is Redshift's"):
        SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", "url": db.url, "unload": unload_settings}))
    with pytest.raises(ValueError, match="UNLOAD needs credentials"):
        make(unload={"stage": "s3://b/p"})
    with pytest.raises(ValueError, match="must be an S3 URL"):
        make(unload={"stage": "/tmp/x", "iam_role": "default"})
    assert make(unload=unload_settings).read_with(None) == "unload"  # the settings choose UNLOAD
    assert make(unload=unload_settings, read_with="cursor").read_with(None) == "cursor"
    assert make().read_with(None) == "cursor" and make().unloader is None
    with pytest.raises(ConfigError, match=r"sources.crm.tables\[1\].read_with: Redshift cannot COPY"):
        make(tables=["orders", {"name": "items", "read_with": "copy"}])
    with pytest.raises(ConfigError, match=r"sources.crm.unload: read_with: unload needs the S3 stage"):
        make(tables=[{"name": "orders", "read_with": "unload"}])
    with pytest.raises(ConfigError, match=r"sources.crm.tables\[0\].read_with: UNLOAD is Redshift's"):
        SqlSource("crm", SqlSourceConfig.model_validate(
            {"type": "sql", "url": db.url, "tables": [{"name": "orders", "read_with": "unload"}]}))


def test_each_table_can_choose_how_it_is_read(db: PostgresDatabase, unload_settings: dict[str, Any]) -> None:
    """A source with `unload:` reads its large table by UNLOAD and, told so, a small one with a cursor
    (and the other way round with `read_with: cursor` on the source): the same rows either way."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE app.small AS SELECT id, note FROM app.orders WHERE id <= 10")
    source = unload_source(db, unload_settings, schema="app", read_with=None,
                           tables=[{"name": "orders", "replication_key": "at"}, {"name": "small", "read_with": "cursor"}])
    big, small = source.streams()
    assert isinstance(big, SqlStream) and isinstance(small, SqlStream)
    assert (big.read_with, small.read_with) == ("unload", "cursor")
    assert rows(read(small)).sort_by("id").column("id").to_pylist() == list(range(1, 11))
    assert source.unloads == []  # the small table never went through UNLOAD
    assert rows(read(big)).num_rows == 2500 and [u.select.split(" FROM ")[1][:14] for u in source.unloads] == [
        '"app"."orders"']
    flipped = unload_source(db, unload_settings, schema="app", read_with="cursor",
                            tables=["small", {"name": "orders", "read_with": "unload"}])
    assert [s.read_with for s in flipped.streams() if isinstance(s, SqlStream)] == ["cursor", "unload"]


def test_check_proves_the_stage_is_writable(db: PostgresDatabase, unload_settings: dict[str, Any]) -> None:
    source = unload_source(db, unload_settings, schema="app")
    lines = asyncio.run(source.check())
    assert "bucket reachable, write and delete allowed" in lines[-1]
    assert isinstance(source.unloader, Unloader)
    with pytest.raises(Exception, match="does not exist"):
        asyncio.run(unload_source(db, {**unload_settings, "stage": "s3://no-such-bucket-floe/x"}, schema="app").check())


def test_a_backfill_range_reads_the_rows_the_cursor_reads(db: PostgresDatabase, unload_settings: dict[str, Any]) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:  # a second day of rows
        conn.execute("UPDATE app.orders SET at = at + interval '1 day' WHERE id > 2000")
    unloaded = orders(db, unload_settings)
    cursor = SqlSource("crm", SqlSourceConfig.model_validate(
        {"type": "sql", "url": db.url.replace("postgresql://", "redshift://"), "schema": "app",
         "tables": [{"name": "orders", "replication_key": "at"}]})).streams()[0]
    assert isinstance(cursor, SqlStream)

    async def collect(stream: SqlStream) -> pa.Table:
        scope = stream.backfill_scope(DayRange(date(2026, 1, 2), date(2026, 1, 2)), None)
        return rows([b async for b in stream.read_range(scope)])

    got, want = asyncio.run(collect(unloaded)), asyncio.run(collect(cursor))
    assert got.num_rows == 500 and got.equals(want)
    assert "WHERE \"at\" >= CAST('2026-01-02T00:00:00+00:00' AS timestamptz) AND \"at\" < " \
           "CAST('2026-01-03T00:00:00+00:00' AS timestamptz) ORDER BY \"at\"" in unloaded.source.unloads[0].select  # type: ignore[attr-defined]
