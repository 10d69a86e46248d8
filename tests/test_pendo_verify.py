"""`floe sync --verify` / `--repair` against the Pendo emulator over real HTTP (DuckDB and PostgreSQL):
writes Pendo answered `updated` but dropped or altered, values edited in Pendo after floe sent them,
and records gone from Pendo are each found, and a repair makes a second verify clean."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import yaml
from typer.testing import CliRunner

from floe.apps.reverse.verify import verify_syncs
from floe.cli import app as cli_app
from tests import test_pendo_sync as base
from tests.test_pendo_sync import FIELDS, KEY, ROWS, config_for, store_of, sync

warehouse, pendo = base.warehouse, base.pendo  # the fixtures: rows in DuckDB and PostgreSQL, the emulator
DROPPED, ALTERED = ["acct-0001", "acct-0002", "acct-0004"], ["acct-0005", "acct-0007"]  # rows without NULLs


def test_verify_tells_lost_writes_from_edits_in_pendo_and_from_missing_ids(warehouse, pendo, tmp_path):
    store = store_of(pendo)
    store.drop.update(dict.fromkeys(DROPPED, 1))
    store.alter.update(dict.fromkeys(ALTERED, 1))
    cfg = config_for(warehouse, pendo, tmp_path)
    first = sync(cfg)
    assert first.ok and (first.updated, first.failed) == (ROWS, 0)  # Pendo said every write was applied
    assert (store.dropped, store.altered) == (3, 2)
    store.edit("account", "custom", "acct-0050", {"plan": "edited-in-ui"})
    del store.records["account"]["acct-0060"]

    (result,) = asyncio.run(verify_syncs(cfg))
    assert result.error is None and result.checked == ROWS and not result.ok
    kinds = Counter((d.key, d.kind) for d in result.differences)
    assert kinds == Counter({**{(k, "not_applied"): len(FIELDS) for k in DROPPED + ALTERED},
                             ("acct-0050", "changed_in_pendo"): 1, ("acct-0060", "missing_id"): len(FIELDS)})
    wanted = warehouse.accounts()
    edited = next(d for d in result.differences if d.kind == "changed_in_pendo")
    assert (edited.field, edited.sent, edited.pendo) == ("plan", wanted["acct-0050"]["plan"], "edited-in-ui")
    altered = next(d for d in result.differences if d.key == "acct-0007" and d.field == "seats")
    assert (altered.sent, altered.pendo) == (7, 8)
    assert {d.pendo for d in result.differences if d.key in DROPPED} == {None}
    assert result.by_field()["plan"] == Counter(not_applied=5, changed_in_pendo=1, missing_id=1)


def test_cli_verify_fails_on_dropped_writes_repair_resends_them_and_a_second_verify_is_clean(
        warehouse, pendo, tmp_path, monkeypatch):
    monkeypatch.setenv("PENDO_KEY", KEY)
    (tmp_path / "floe.yml").write_text(yaml.safe_dump({
        "destinations": {"warehouse": warehouse.settings},
        "syncs": {"accounts": {
            "from": "warehouse", "table": "analytics.accounts",
            "to": {"type": "pendo", "integration_key": "${PENDO_KEY}", "kind": "account", "base_url": pendo.url},
            "key": {"account_id": "accountId"}, "fields": FIELDS}}}))
    config = str(tmp_path / "floe.yml")
    runner = CliRunner()
    store = store_of(pendo)
    store.drop.update(dict.fromkeys(DROPPED, 1))
    assert runner.invoke(cli_app, ["sync", "-c", config]).exit_code == 0
    store.edit("account", "custom", "acct-0050", {"seats": -5})

    verify = runner.invoke(cli_app, ["sync", "-c", config, "--verify"])
    assert verify.exit_code == 1, verify.output
    assert "accounts: acct-0001 seats: floe sent 1, Pendo holds null (accepted but not applied)" in verify.output
    assert "accounts: acct-0050 seats: floe sent 50, Pendo holds -5 (changed in Pendo since)" in verify.output
    assert "16 values in Pendo differ from what floe sent" in verify.output and KEY not in verify.output

    received = store.records_received
    repair = runner.invoke(cli_app, ["sync", "-c", config, "--repair"])
    assert repair.exit_code == 0, repair.output
    assert store.records_received - received == 4  # only the keys that differed were resent
    assert "repaired: Pendo holds what floe sent" in repair.output
    again = runner.invoke(cli_app, ["sync", "-c", config, "--verify"])
    assert again.exit_code == 0, again.output
    held: dict[str, Any] = {k: v for k, v in store.values("account").items()}
    assert held == warehouse.accounts()
