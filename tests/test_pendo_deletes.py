"""`deletes: clear` on a Pendo sync, end to end (DuckDB and PostgreSQL -> the Pendo emulator over real
HTTP): keys floe synced before that left the rows get floe's fields cleared, nothing else is touched,
`max_deletes` stops a run that would clear too much, and the snapshot follows Pendo's answers."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app as cli_app
from tests import test_pendo_sync as base
from tests.test_pendo_sync import FIELDS, KEY, ROWS, config_for, start_pendo, store_of, sync

warehouse, pendo = base.warehouse, base.pendo  # the fixtures: rows in DuckDB and PostgreSQL, the emulator

GONE = [f"acct-{i:04d}" for i in (3, 40, 41, 77, 119)]
CLEARED = dict.fromkeys(FIELDS.values())  # every field floe sets, as null


def drop_rows(wh: Any, ids: list[str]) -> None:
    wh.execute("DELETE FROM analytics.accounts WHERE account_id IN (" + ", ".join(f"'{i}'" for i in ids) + ")")
    wh.dest.close()


def snapshot_keys(wh: Any) -> set[str]:
    return {k for (k,) in wh.rows("SELECT key FROM _floe_sync_snapshot WHERE sync = 'accounts'")}


def test_clear_empties_only_floes_fields_of_the_keys_gone_and_leaves_the_snapshot_in_step(warehouse, pendo, tmp_path):
    for account in GONE:  # a field floe does not map, set by someone else: never touched
        store_of(pendo).records["account"][account]["custom"]["region"] = "emea"
    assert sync(config_for(warehouse, pendo, tmp_path)).sent == ROWS
    before = store_of(pendo).values("account")
    drop_rows(warehouse, GONE)

    ignored = sync(config_for(warehouse, pendo, tmp_path))  # the default: deletes: ignore
    assert ignored.ok and (ignored.gone, ignored.cleared, ignored.sent) == (0, 0, 0)
    assert store_of(pendo).values("account") == before and len(snapshot_keys(warehouse)) == ROWS

    cfg = config_for(warehouse, pendo, tmp_path, deletes="clear")
    received = store_of(pendo).records_received
    result = sync(cfg)
    assert result.ok, result.error
    assert (result.changed, result.sent, result.gone, result.cleared, result.failed) == (0, 0, 5, 5, 0)
    assert store_of(pendo).records_received - received == 5
    after = store_of(pendo).values("account")
    assert {a: after[a] for a in GONE} == {a: {**CLEARED, "region": "emea"} for a in GONE}
    assert {a: v for a, v in after.items() if a not in GONE} == {a: v for a, v in before.items() if a not in GONE}
    assert snapshot_keys(warehouse) == {f"acct-{i:04d}" for i in range(ROWS)} - set(GONE)

    again = sync(cfg)  # nothing left to clear: no request at all
    assert (again.gone, again.cleared, again.requests) == (0, 0, 0)
    assert store_of(pendo).records_received - received == 5


@pytest.mark.parametrize("limit,stops", [("3%", True), (4, True), ("5%", False)])
def test_max_deletes_stops_the_run_before_anything_is_sent(warehouse, pendo, tmp_path, limit, stops):
    cfg = config_for(warehouse, pendo, tmp_path, deletes="clear", max_deletes=limit)
    assert sync(cfg).sent == ROWS
    warehouse.execute("UPDATE analytics.accounts SET seats = -1 WHERE account_id = 'acct-0000'")
    drop_rows(warehouse, GONE)  # 5 of 120 keys: 4.2%
    calls, before = store_of(pendo).calls, store_of(pendo).values("account")
    result = sync(cfg)
    if stops:
        assert not result.ok and "5 of the 120 keys synced before are gone from the rows, more than max_deletes" \
            in result.error and "--force" in result.error and "nothing sent" in result.error
        assert store_of(pendo).calls == calls and store_of(pendo).values("account") == before
        assert len(snapshot_keys(warehouse)) == ROWS
        forced = sync(cfg, force=True)
        assert forced.ok and (forced.sent, forced.cleared) == (1, 5)
    else:
        assert result.ok and (result.sent, result.cleared) == (1, 5)
    assert all(store_of(pendo).values("account")[a] == CLEARED for a in GONE)


def test_a_rejected_clear_stays_in_the_snapshot_and_is_retried_and_an_id_gone_from_pendo_leaves_it(
        warehouse, tmp_path):
    server = start_pendo()
    try:
        cfg = config_for(warehouse, server, tmp_path, deletes="clear")
        assert sync(cfg).sent == ROWS
        drop_rows(warehouse, GONE)
        store_of(server).reject["acct-0040"] = "locked"
        del store_of(server).records["account"]["acct-0041"]  # deleted in Pendo meanwhile: nothing to clear
        result = sync(cfg)
        assert result.ok and (result.gone, result.cleared, result.clear_errors) == (5, 4, 1)
        assert warehouse.rows("SELECT key, outcome, message FROM _floe_sync_failures") == [
            ("acct-0040", "error", "clearing its fields: locked")]
        assert set(GONE) & snapshot_keys(warehouse) == {"acct-0040"}
        store_of(server).reject.clear()
        retry = sync(cfg)
        assert (retry.gone, retry.cleared, retry.clear_errors) == (1, 1, 0)
        assert store_of(server).values("account")["acct-0040"] == CLEARED
        assert not set(GONE) & snapshot_keys(warehouse)
        assert warehouse.rows("SELECT COUNT(*) FROM _floe_sync_failures") == [(0,)]
    finally:
        server.stop()


def test_cli_dry_run_lists_the_keys_it_would_clear_and_force_clears_them(warehouse, pendo, tmp_path, monkeypatch):
    monkeypatch.setenv("PENDO_KEY", KEY)
    (tmp_path / "floe.yml").write_text(yaml.safe_dump({
        "destinations": {"warehouse": warehouse.settings},
        "syncs": {"accounts": {
            "from": "warehouse", "table": "analytics.accounts", "deletes": "clear", "max_deletes": 2,
            "to": {"type": "pendo", "integration_key": "${PENDO_KEY}", "kind": "account", "base_url": pendo.url},
            "key": {"account_id": "accountId"}, "fields": FIELDS}}}))
    config = str(tmp_path / "floe.yml")
    runner = CliRunner()
    assert runner.invoke(cli_app, ["sync", "-c", config]).exit_code == 0
    drop_rows(warehouse, GONE)
    calls = store_of(pendo).calls

    dry = runner.invoke(cli_app, ["sync", "-c", config, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "5 keys gone from the rows whose fields would be cleared" in dry.output
    assert all(f"  {a}\n" in dry.output for a in GONE) and "a run would stop here unless --force" in dry.output
    stopped = runner.invoke(cli_app, ["sync", "-c", config])
    assert stopped.exit_code == 1 and "more than max_deletes (2: 2)" in stopped.output
    assert store_of(pendo).calls == calls
    forced = runner.invoke(cli_app, ["sync", "-c", config, "--force"])
    assert forced.exit_code == 0, forced.output
    assert all(store_of(pendo).values("account")[a] == CLEARED for a in GONE)


@pytest.mark.parametrize("value", [-1, "10", "150%", "many"])
def test_max_deletes_is_a_count_or_a_share(value):
    from floe.config import parse_config
    from floe.core.errors import ConfigError

    entry = {"from": "w", "table": "t", "key": {"id": "accountId"}, "fields": {"plan": "plan"},
             "deletes": "clear", "max_deletes": value,
             "to": {"type": "pendo", "integration_key": "abcd1234", "kind": "account"}}
    with pytest.raises(ConfigError, match=r"syncs\.s\.max_deletes: a count \(0 or more\) or a share"):
        parse_config({"syncs": {"s": entry}})
