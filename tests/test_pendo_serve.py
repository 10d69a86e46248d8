"""`floe serve` runs the syncs after each cycle's loads: a real `floe serve` process loads a PostgreSQL
table into DuckDB and syncs it to the Pendo emulator (over real HTTP), cycle after cycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml

from tests import test_pendo_sync as base
from tests.test_pendo_sync import KEY, store_of

pendo = base.pendo  # the fixture: the Pendo emulator, accounts acct-0000 .. acct-0119


def wait_for(condition: Callable[[], bool], log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "floe serve did not get there in time:\n" + log.read_text()[-3000:]
        time.sleep(0.1)


def test_serve_syncs_after_each_cycle_of_loads(postgres_db: Any, pendo: Any, tmp_path: Path) -> None:
    def crm(*statements: str) -> None:
        with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    crm("CREATE SCHEMA app", "CREATE TABLE app.accounts (account_id TEXT PRIMARY KEY, plan TEXT, seats INTEGER)",
        "INSERT INTO app.accounts SELECT 'acct-' || lpad(i::text, 4, '0'), 'free', i FROM generate_series(0, 19) i")
    config = tmp_path / "floe.yml"
    config.write_text(yaml.safe_dump({
        "sources": {"crm": {"type": "sql", "url": postgres_db.url, "schema": "app", "tables": ["accounts"],
                            "schedule": "1s"}},
        "destinations": {"warehouse": {"type": "duckdb", "path": "w.duckdb"}},
        "stage": "stage",
        "syncs": {"accounts": {
            "from": "warehouse", "table": "crm.accounts", "deletes": "clear",
            "to": {"type": "pendo", "integration_key": KEY, "kind": "account", "base_url": pendo.url},
            "key": {"account_id": "accountId"}, "fields": {"plan": "plan", "seats": "seats"}}}}))
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from floe.cli import main; main()", "serve", "-c", str(config)],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        values = lambda: store_of(pendo).values("account")  # noqa: E731
        wait_for(lambda: sum(1 for v in values().values() if v.get("plan") == "free") == 20, log)
        assert values()["acct-0007"] == {"plan": "free", "seats": 7}

        # The next cycle reloads the table (full table: deleted rows leave it) and syncs the changes.
        crm("UPDATE app.accounts SET plan = 'pro' WHERE account_id IN ('acct-0001', 'acct-0002')",
            "DELETE FROM app.accounts WHERE account_id = 'acct-0003'")
        wait_for(lambda: values()["acct-0003"] == {"plan": None, "seats": None}, log)
        assert (values()["acct-0001"], values()["acct-0002"]) == ({"plan": "pro", "seats": 1}, {"plan": "pro", "seats": 2})
        assert values()["acct-0004"] == {"plan": "free", "seats": 4}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert text.count("event=sync_done sync=accounts") >= 2 and "serve_sync_failed" not in text
