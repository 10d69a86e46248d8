"""The SQL source against the real PostgreSQL server: discovery, full and incremental reads, types."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from floe.apps.singer.tap import read_state
from floe.core.errors import ConfigError, SourceError
from floe.destinations.duckdb import DuckDBDestination
from floe.engine.pipeline import run_stream
from floe.sources.sql import SqlSource, SqlSourceConfig
from floe.testing.postgres import PostgresDatabase
from tests.fixtures.redshift_unload import unload_source
from tests.singer_check import check_tap_output

FLOE = str(Path(sys.executable).parent / "floe")

SETUP = """
CREATE SCHEMA app;
CREATE TABLE app.accounts (
  id integer PRIMARY KEY, name text, updated_at timestamptz NOT NULL, opened date,
  mrr numeric(10,2), meta jsonb, tags text[], note varchar(20));
CREATE TABLE app.plans (code text PRIMARY KEY, price integer);
INSERT INTO app.accounts
SELECT i, 'acct ' || i, timestamptz '2026-01-01 10:00:00+02' + i * interval '1 hour', date '2025-01-01' + i,
       i * 1.5, jsonb_build_object('i', i), ARRAY['t' || i], NULL
FROM generate_series(1, 10) AS i;
INSERT INTO app.plans VALUES ('free', 0), ('pro', 20), ('team', 50);
"""


@pytest.fixture
def db(postgres_db: PostgresDatabase) -> PostgresDatabase:
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(SETUP)
    return postgres_db


def execute(db: PostgresDatabase, sql: str) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(sql)


def settings(db: PostgresDatabase, **extra: Any) -> dict[str, Any]:
    return {"url": db.url, "schema": "app",
            "tables": [{"name": "accounts", "replication_key": "updated_at"}, "plans"], "batch_rows": 4, **extra}


def make_source(db: PostgresDatabase, **extra: Any) -> SqlSource:
    return SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", **settings(db, **extra)}))


def reading_with(request: pytest.FixtureRequest, db: PostgresDatabase, read_with: str, **extra: Any) -> SqlSource:
    """The source reading with `read_with`; `unload`: Redshift replayed (tests/fixtures/redshift_unload.py)."""
    if read_with != "unload":
        return make_source(db, read_with=read_with, **extra)
    config = {k: v for k, v in settings(db, **extra).items() if k != "url"}
    return unload_source(db, request.getfixturevalue("unload_settings"), **config)


def load(source: SqlSource, dest: DuckDBDestination, tmp_path: Path) -> None:
    async def main() -> None:
        for stream in source.streams():
            result = await run_stream(source, stream, dest, tmp_path / "stage")
            assert result.ok, result.error

    asyncio.run(main())


def test_discovery_reads_columns_types_and_primary_keys(db: PostgresDatabase) -> None:
    streams = {s.name: s for s in make_source(db).streams()}
    accounts = streams["accounts"]
    assert accounts.primary_key == ("id",) and accounts.cursor_field == "updated_at"
    assert accounts.disposition == "merge" and streams["plans"].disposition == "replace"
    types = {f.name: str(f.type) for f in accounts.schema}
    assert types == {"id": "int32", "name": "string", "updated_at": "timestamp[us, tz=UTC]", "opened": "date32[day]",
                     "mrr": "decimal128(10, 2)", "meta": "string", "tags": "string", "note": "string"}
    assert accounts.schema.field("meta").metadata == {b"floe.json": b"1"}
    everything = SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", "url": db.url, "schema": "app"}))
    assert sorted(s.name for s in everything.streams()) == ["accounts", "plans"]


def test_unknown_tables_and_columns_are_config_errors(db: PostgresDatabase) -> None:
    with pytest.raises(ConfigError, match=r"sources.crm.tables\[0\]: no table 'nope' in schema 'app'"):
        make_source(db, tables=["nope"]).streams()
    with pytest.raises(ConfigError, match=r"tables\[0\].replication_key: table accounts has no column 'nope'"):
        make_source(db, tables=[{"name": "accounts", "replication_key": "nope"}]).streams()


def test_a_wrong_password_never_appears_in_the_error(db: PostgresDatabase) -> None:
    url = db.url.replace(f":{db.password}@", ":Sup3rSecretPw@")
    source = SqlSource("crm", SqlSourceConfig.model_validate({"type": "sql", "url": url, "schema": "app"}))
    with pytest.raises(SourceError) as error:
        source.streams()
    assert "authentication failed" in str(error.value) and "Sup3rSecretPw" not in str(error.value)
    assert f"postgresql://{db.user}@{db.host}:{db.port}/{db.database}" in str(error.value)


@pytest.mark.parametrize("read_with", ["copy", "unload"])
def test_full_then_incremental_after_inserts_and_updates_misses_and_repeats_nothing(
    db: PostgresDatabase, duckdb_destination: DuckDBDestination, tmp_path: Path, read_with: str,
    request: pytest.FixtureRequest,
) -> None:
    source = reading_with(request, db, read_with)
    load(source, duckdb_destination, tmp_path)
    assert duckdb_destination.query("SELECT count(*), count(DISTINCT id) FROM crm.accounts") == [(10, 10)]
    first = duckdb_destination.get_state("crm", "accounts")
    assert first == {"replication_key": "updated_at", "replication_key_value": "2026-01-01T18:00:00+00:00"}
    row = duckdb_destination.query("SELECT updated_at, opened, mrr, meta FROM crm.accounts WHERE id = 1")[0]
    assert row[0] == datetime(2026, 1, 1, 9, tzinfo=UTC) and row[1] == date(2025, 1, 2)
    assert Decimal(str(row[2])) == Decimal("1.5") and json.loads(row[3]) == {"i": 1}
    execute(db, """
        INSERT INTO app.accounts (id, name, updated_at) VALUES
          (11, 'new', '2026-02-01 00:00+00'), (12, 'same stamp as bookmark', '2026-01-01 18:00+00');
        UPDATE app.accounts SET name = 'renamed', updated_at = '2026-03-01 00:00+00' WHERE id = 3;
        DELETE FROM app.plans WHERE code = 'free';
        UPDATE app.plans SET price = 25 WHERE code = 'pro';
    """)
    load(reading_with(request, db, read_with), duckdb_destination, tmp_path)
    assert duckdb_destination.query("SELECT count(*), count(DISTINCT id) FROM crm.accounts") == [(12, 12)]
    assert duckdb_destination.query("SELECT id, name FROM crm.accounts WHERE id IN (3, 11, 12) ORDER BY id") == [
        (3, "renamed"), (11, "new"), (12, "same stamp as bookmark")]
    assert duckdb_destination.query("SELECT code, price FROM crm.plans ORDER BY code") == [("pro", 25), ("team", 50)]
    assert duckdb_destination.get_state("crm", "accounts")["replication_key_value"] == "2026-03-01T00:00:00+00:00"


@pytest.mark.parametrize("read_with", ["copy", "cursor", "unload"])
def test_an_append_table_without_a_key_gets_each_row_once_though_rows_tie_at_the_bookmark(
    db: PostgresDatabase, duckdb_destination: DuckDBDestination, tmp_path: Path, read_with: str,
    request: pytest.FixtureRequest,
) -> None:
    # no primary key: appended. Six rows share the last stamp (more than a batch of 4), two of them identical.
    execute(db, """
        CREATE TABLE app.events (at timestamptz, kind text, amount numeric(6,2));
        INSERT INTO app.events VALUES ('2026-01-01 09:00+00', 'a', 1), ('2026-01-01 10:00+00', 'b', 2),
          ('2026-01-01 11:00+00', 'c', 3), ('2026-01-01 11:00+00', 'c', 3), ('2026-01-01 11:00+00', 'd', 4),
          ('2026-01-01 11:00+00', 'e', 5), ('2026-01-01 11:00+00', 'f', 6), ('2026-01-01 11:00+00', 'g', 7),
          (NULL, 'no stamp', 0);
    """)
    events = {"tables": [{"name": "events", "replication_key": "at"}]}

    def landed() -> list[tuple[Any, ...]]:
        return duckdb_destination.query("SELECT kind, count(*) FROM crm.events GROUP BY kind ORDER BY kind")

    load(reading_with(request, db, read_with, **events), duckdb_destination, tmp_path)
    first = [("a", 1), ("b", 1), ("c", 2), ("d", 1), ("e", 1), ("f", 1), ("g", 1), ("no stamp", 1)]
    assert landed() == first
    load(reading_with(request, db, read_with, **events), duckdb_destination, tmp_path)  # nothing new: the six tied rows are not again
    assert landed() == first
    execute(db, """INSERT INTO app.events VALUES ('2026-01-01 11:00+00', 'c', 3), ('2026-01-01 11:00+00', 'h', 8),
                   ('2026-01-01 12:00+00', 'i', 9)""")  # a third identical 'c' and a new row, both at the bookmark
    load(reading_with(request, db, read_with, **events), duckdb_destination, tmp_path)
    second = sorted([*first[:2], ("c", 3), *first[3:7], ("h", 1), ("i", 1), ("no stamp", 1)])
    assert landed() == second
    state = duckdb_destination.get_state("crm", "events")
    assert state["replication_key_value"] == "2026-01-01T12:00:00+00:00" and len(state["boundary_rows"]) == 1
    load(reading_with(request, db, read_with, **events), duckdb_destination, tmp_path)
    assert landed() == second


def test_rows_stream_in_batches_each_with_its_checkpoint(db: PostgresDatabase) -> None:
    stream = next(s for s in make_source(db).streams() if s.name == "accounts")

    async def collect() -> list[Any]:
        return [b async for b in stream.read(None)]

    batches = asyncio.run(collect())
    assert [b.records.num_rows for b in batches] == [4, 4, 2]
    assert [b.checkpoint["replication_key_value"] for b in batches] == [
        "2026-01-01T12:00:00+00:00", "2026-01-01T16:00:00+00:00", "2026-01-01T18:00:00+00:00"]


def tap(args: list[str], cwd: Path) -> bytes:
    done = subprocess.run([FLOE, "tap", *args], capture_output=True, cwd=cwd, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"INFO METRIC: " in done.stderr
    return done.stdout


def test_floe_tap_on_the_sql_source_resumes_from_its_final_state(db: PostgresDatabase, tmp_path: Path) -> None:
    (tmp_path / "tap.json").write_text(json.dumps(settings(db)))
    first = check_tap_output(tap(["sql", "--config", "tap.json"], tmp_path))
    assert [m["record"]["id"] for m in first.records["accounts"]] == list(range(1, 11))
    assert first.records["accounts"][0]["record"]["updated_at"] == "2026-01-01T09:00:00Z"
    assert first.records["accounts"][0]["record"]["opened"] == "2025-01-02"
    assert {m["record"]["code"] for m in first.records["plans"]} == {"free", "pro", "team"}
    assert len(first.activations["plans"]) == 1 and "version" in first.records["plans"][0]
    (tmp_path / "state.json").write_text(json.dumps(first.last_state))
    execute(db, "INSERT INTO app.accounts (id, name, updated_at) VALUES (11, 'later', '2026-05-01 00:00+00')")
    second = check_tap_output(tap(["sql", "--config", "tap.json", "--state", "state.json"], tmp_path))
    # >= the bookmark: the boundary row again (merged away by key downstream), then only what is new
    assert [m["record"]["id"] for m in second.records["accounts"]] == [10, 11]
    assert read_state(second.last_state)["accounts"]["replication_key_value"] == "2026-05-01T00:00:00+00:00"


def test_floe_discover_prints_the_catalog(db: PostgresDatabase, tmp_path: Path) -> None:
    (tmp_path / "tap.json").write_text(json.dumps(settings(db)))
    done = subprocess.run([FLOE, "discover", "sql", "--config", "tap.json"], capture_output=True, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()
    catalog = json.loads(done.stdout)
    accounts = next(s for s in catalog["streams"] if s["tap_stream_id"] == "accounts")
    assert accounts["metadata"][0]["metadata"]["valid-replication-keys"] == ["updated_at"]
    assert accounts["schema"]["properties"]["updated_at"] == {"type": ["string", "null"], "format": "date-time"}


def test_floe_run_state_continues_as_a_singer_tap(db: PostgresDatabase, tmp_path: Path) -> None:
    """`floe state show --singer` prints Singer state that `floe tap` resumes from."""
    (tmp_path / "floe.yml").write_text(
        "sources:\n  crm:\n    type: sql\n    url: ${PG_URL}\n    schema: app\n"
        "    tables: [{name: accounts, replication_key: updated_at}]\n"
        "destinations:\n  warehouse:\n    type: duckdb\n    path: w.duckdb\n"
    )
    env = {**os.environ, "PG_URL": db.url}
    run = subprocess.run([FLOE, "run", "-c", "floe.yml"], capture_output=True, cwd=tmp_path, env=env, check=False)
    assert run.returncode == 0, run.stderr.decode() + run.stdout.decode()
    shown = subprocess.run([FLOE, "state", "show", "-c", "floe.yml", "--singer"], capture_output=True,
                           cwd=tmp_path, env=env, check=False)
    assert shown.returncode == 0, shown.stderr.decode()
    state = json.loads(shown.stdout)
    assert state == {"bookmarks": {"accounts": {"replication_key": "updated_at",
                                                "replication_key_value": "2026-01-01T18:00:00+00:00"}}}
    (tmp_path / "state.json").write_text(shown.stdout.decode())
    done = subprocess.run([FLOE, "tap", "crm", "-c", "floe.yml", "--state", "state.json"], capture_output=True,
                          cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert [m["record"]["id"] for m in check_tap_output(done.stdout).records["accounts"]] == [10]


@pytest.mark.parametrize(("content", "message"), [
    ('{"schema": "app"}', "CRITICAL tap.json.url: is required"),
    ('{"url": "postgresql://u:pw@h/db", "tabels": []}', "CRITICAL tap.json.tabels: unknown key"),
    ('{"url": ', "CRITICAL tap.json:1: the settings file is not valid JSON"),
])
def test_bad_tap_settings_fail_naming_the_file_and_key(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "tap.json").write_text(content)
    done = subprocess.run([FLOE, "tap", "sql", "--config", "tap.json"], capture_output=True, cwd=tmp_path,
                          check=False)
    assert done.returncode == 1 and message in done.stderr.decode(), done.stderr.decode()
    assert done.stdout == b""
