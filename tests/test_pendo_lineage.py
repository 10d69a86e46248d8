"""Lineage of a Pendo value, end to end: a PostgreSQL table loaded by `floe run` into DuckDB or
PostgreSQL, synced to the Pendo emulator (over real HTTP), then `floe explain` traces a value back to
the sync run and the load (and the source bookmarks it read between)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app as cli_app
from tests import test_pendo_sync as base
from tests.test_pendo_sync import KEY, Warehouse, store_of

pendo = base.pendo  # the fixture: the Pendo emulator, accounts acct-0000 .. acct-0119


@pytest.fixture(params=["duckdb", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "duckdb":
        return {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}
    return request.getfixturevalue("postgres_db").config()


def test_explain_traces_a_pendo_value_to_its_sync_run_rows_load_and_source_position(
        postgres_db: Any, target: dict[str, Any], pendo: Any, tmp_path: Path) -> None:
    def crm(*statements: str) -> None:
        with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    crm("CREATE SCHEMA app", "CREATE TABLE app.accounts (account_id TEXT PRIMARY KEY, plan TEXT, seats INTEGER, "
        "updated_at INTEGER)", "INSERT INTO app.accounts SELECT 'acct-' || lpad(i::text, 4, '0'), 'free', i, 100 "
        "FROM generate_series(0, 19) i")
    config = tmp_path / "floe.yml"
    config.write_text(yaml.safe_dump({
        "sources": {"crm": {"type": "sql", "url": postgres_db.url, "schema": "app",
                            "tables": [{"name": "accounts", "replication_key": "updated_at"}]}},
        "destinations": {"warehouse": target},
        "stage": str(tmp_path / "stage"),
        "syncs": {"accounts": {
            "from": "warehouse", "table": "crm.accounts",
            "to": {"type": "pendo", "integration_key": KEY, "kind": "account", "base_url": pendo.url},
            "key": {"account_id": "accountId"}, "fields": {"plan": "plan", "seats": "seats"}},
            "by_query": {  # an aggregating query names its rows' loads itself
                "from": "warehouse", "query": "SELECT account_id, max(seats) AS seats, "
                "string_agg(DISTINCT _floe_load_id, ',') AS _floe_load_id FROM crm.accounts GROUP BY account_id",
                "to": {"type": "pendo", "integration_key": KEY, "kind": "account", "base_url": pendo.url},
                "key": {"account_id": "accountId"}, "fields": {"seats": "seats"}}}}))
    runner = CliRunner()
    first = runner.invoke(cli_app, ["run", "-c", str(config)])  # loads, then syncs
    assert first.exit_code == 0, first.output
    crm("UPDATE app.accounts SET plan = 'pro', updated_at = 200 WHERE account_id = 'acct-0007'")
    second = runner.invoke(cli_app, ["run", "-c", str(config)])
    assert second.exit_code == 0, second.output
    assert store_of(pendo).values("account")["acct-0007"] == {"plan": "pro", "seats": 7}

    wh = Warehouse(target, tmp_path)
    loads = wh.rows("SELECT load_id, source FROM _floe_loads WHERE status = 'committed' ORDER BY finished_at")
    load_ids = [i for i, source in loads if source == "crm"]
    syncs = [i for i, source in loads if source == "_floe_sync"]
    assert len(load_ids) == 2 and len(syncs) == 4

    changed = runner.invoke(cli_app, ["explain", "accounts", "acct-0007", "-c", str(config), "--json"])
    assert changed.exit_code == 0, changed.output
    found = json.loads(changed.output)
    assert found["pendo"]["plan"] == "pro" and found["sent"] == {"plan": "pro", "seats": 7}
    assert found["sync_run"]["load_id"] == syncs[2] and found["sync_run"]["status"] == "committed"
    assert found["sent_load_ids"] == [load_ids[1]]
    assert [r["plan"] for r in found["rows"]] == ["pro"] and found["rows"][0]["_floe_load_id"] == load_ids[1]
    (link,) = found["loads"]
    assert link["load_id"] == load_ids[1] and (link["load"]["source"], link["load"]["stream"]) == ("crm", "accounts")
    assert "100" in json.dumps(link["read_from"]) and "200" in json.dumps(link["read_to"])  # the bookmarks

    unchanged = runner.invoke(cli_app, ["explain", "accounts", "acct-0003", "-c", str(config)])
    assert unchanged.exit_code == 0, unchanged.output
    text = unchanged.output
    assert f"sent by sync run {syncs[0]}" in text and f"load {load_ids[0]} (the rows floe sent): crm.accounts into warehouse" in text
    assert f"load {load_ids[1]} (the rows now): crm.accounts" in text  # re-read at bookmark 100, same values
    assert "read from: (the start)" in text and "  = sent" in text and "DIFFERS" not in text

    aggregated = json.loads(runner.invoke(cli_app, ["explain", "by_query", "acct-0003", "-c", str(config),
                                                    "--json"]).output)
    assert aggregated["sent"] == {"seats": 3} and aggregated["sent_load_ids"] == [load_ids[0]]
    assert [link["load"]["source"] for link in aggregated["loads"]] == ["crm", "crm"]

    store_of(pendo).edit("account", "custom", "acct-0003", {"seats": 99})
    edited = runner.invoke(cli_app, ["explain", "accounts", "acct-0003", "-c", str(config)])
    assert "DIFFERS from what floe sent" in edited.output
    missing = runner.invoke(cli_app, ["explain", "nope", "acct-0003", "-c", str(config)])
    assert missing.exit_code == 1 and "syncs.nope: no such sync" in missing.output
