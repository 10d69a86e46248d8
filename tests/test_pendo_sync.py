"""Reverse ETL to Pendo, end to end: warehouse rows (DuckDB and PostgreSQL) -> floe sync -> the Pendo
emulator over real HTTP. The emulator's store is the truth about what Pendo holds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from floe.apps.reverse.engine import SyncResult, run_syncs
from floe.cli import app as cli_app
from floe.config import parse_config
from floe.core.errors import ConfigError
from floe.core.plugins import destination_registry as registry
from floe.core.stream import Context
from floe.destinations.sql import SqlDestination
from floe.sandbox.pendo import PendoStore, create_app
from floe.sandbox.server import RunningServer, serve_in_thread

KEY = "pendo-test-integration-key"
ROWS = 120
FIELDS = {"plan": "plan", "seats": "seats", "mrr": "mrr", "active": "active", "renewal_date": "renewal_date"}


class Warehouse:
    """The row source: a floe SQL destination holding `analytics.accounts`."""

    def __init__(self, settings: dict[str, Any], folder: Path) -> None:
        self.settings = settings
        self.dest: SqlDestination = registry.load(settings["type"])("warehouse", registry.config_model(
            settings["type"]).model_validate(settings), Context(folder))

    def execute(self, *statements: str) -> None:
        with self.dest.transaction() as cur:
            for statement in statements:
                cur.execute(statement)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        try:
            return self.dest.query(sql)
        finally:
            self.dest.close()  # let the sync open the database on its own

    def accounts(self) -> dict[str, dict[str, Any]]:
        """What Pendo should hold: the warehouse's values as Pendo stores them (dates as epoch ms)."""
        out = {}
        for account_id, plan, seats, mrr, active, renewal in self.rows(
                "SELECT account_id, plan, seats, mrr, active, renewal_date FROM analytics.accounts"):
            out[account_id] = {"plan": plan, "seats": seats, "mrr": mrr, "active": active,
                               "renewal_date": None if renewal is None else int(
                                   datetime(renewal.year, renewal.month, renewal.day, tzinfo=UTC).timestamp() * 1000)}
        return out


def account_rows(n: int) -> str:
    values = []
    for i in range(n):
        plan = "NULL" if i % 17 == 0 else f"'{['free', 'pro', 'enterprise'][i % 3]}'"
        renewal = "NULL" if i % 11 == 0 else f"DATE '{date(2025, 1 + i % 12, 1 + i % 28).isoformat()}'"
        values.append(f"('acct-{i:04d}', {plan}, {i}, {i * 2.5}, {'TRUE' if i % 2 else 'FALSE'}, {renewal})")
    return ", ".join(values)


@pytest.fixture(params=["duckdb", "postgres"])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Warehouse]:
    if request.param == "duckdb":
        settings: dict[str, Any] = {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}
    else:
        settings = request.getfixturevalue("postgres_db").config()
    wh = Warehouse(settings, tmp_path)
    wh.execute(
        "CREATE SCHEMA IF NOT EXISTS analytics",
        "CREATE TABLE analytics.accounts (account_id TEXT, plan TEXT, seats INTEGER, mrr DOUBLE PRECISION, "
        "active BOOLEAN, renewal_date DATE)",
        f"INSERT INTO analytics.accounts VALUES {account_rows(ROWS)}",
    )
    wh.dest.close()
    yield wh
    wh.dest.close()


def start_pendo(**knobs: Any) -> RunningServer:
    knobs.setdefault("accounts", [f"acct-{i:04d}" for i in range(ROWS)])
    return serve_in_thread(create_app(integration_key=KEY, **knobs))


@pytest.fixture
def pendo() -> Iterator[RunningServer]:
    server = start_pendo()
    yield server
    server.stop()


def store_of(server: RunningServer) -> PendoStore:
    return server.app.state.pendo


def config_for(wh: Warehouse, server: RunningServer, tmp_path: Path, **overrides: Any) -> Any:
    to = {"type": "pendo", "integration_key": KEY, "kind": "account", "base_url": server.url,
          "batch_rows": 25, "concurrency": 3, "backoff_base": 0.01, **overrides.pop("to", {})}
    sync = {"from": "warehouse", "table": "analytics.accounts", "to": to, "key": {"account_id": "accountId"},
            "fields": FIELDS, **overrides}
    cfg = parse_config({"destinations": {"warehouse": wh.settings}, "syncs": {"accounts": sync}})
    cfg.stage = tmp_path / "stage"
    return cfg


def sync(cfg: Any, **options: Any) -> SyncResult:
    (result,) = asyncio.run(run_syncs(cfg, **options))
    return result


def held(server: RunningServer) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in store_of(server).values("account").items() if v}


def test_pendo_ends_up_holding_exactly_the_warehouse_values_and_a_second_run_sends_nothing(
        warehouse, pendo, tmp_path):
    cfg = config_for(warehouse, pendo, tmp_path, table=None, query=(  # '%' must reach psycopg untouched
        "SELECT account_id, plan, seats, mrr, active, renewal_date FROM analytics.accounts "
        "WHERE account_id LIKE 'acct-%';"))
    first = sync(cfg)
    assert first.ok, first.error
    assert (first.changed, first.sent, first.updated, first.failed) == (ROWS, ROWS, ROWS, 0)
    assert held(pendo) == warehouse.accounts()
    assert store_of(pendo).stats()["max_inflight"] <= 3

    calls = store_of(pendo).calls
    second = sync(cfg)
    assert second.ok and (second.changed, second.sent, second.requests) == (0, 0, 0)
    assert store_of(pendo).calls == calls
    loads = warehouse.rows("SELECT rows, status, details FROM _floe_loads WHERE source = '_floe_sync' "
                           "ORDER BY started_at")
    assert [(r[0], r[1], json.loads(r[2])["sent"]) for r in loads] == [(ROWS, "committed", ROWS),
                                                                         (0, "committed", 0)]


def test_changing_ten_rows_sends_exactly_those_ten(warehouse, pendo, tmp_path):
    cfg = config_for(warehouse, pendo, tmp_path)
    assert sync(cfg).sent == ROWS
    warehouse.execute("UPDATE analytics.accounts SET seats = seats + 1000 WHERE account_id IN ("
                      + ", ".join(f"'acct-{i:04d}'" for i in range(0, 100, 10)) + ")")
    warehouse.dest.close()
    received = store_of(pendo).records_received
    result = sync(cfg)
    assert (result.changed, result.sent, result.updated) == (10, 10, 10)
    assert store_of(pendo).records_received - received == 10
    assert held(pendo) == warehouse.accounts()


@pytest.mark.parametrize("fault", ["429", "503", "408"])
def test_injected_faults_reach_the_same_end_state(warehouse, tmp_path, fault):
    knobs: dict[str, Any] = {"time_limit": 1.0, "seconds_per_record": 0.1} if fault == "408" else {}
    server = start_pendo(**knobs)  # 408: a call of more than 10 records runs past the limit
    try:
        if fault != "408":
            store_of(server).inject(int(fault), count=4, retry_after=0.05)
        result = sync(config_for(warehouse, server, tmp_path))
        assert result.ok, result.error
        assert (result.sent, result.updated, result.failed) == (ROWS, ROWS, 0)
        assert held(server) == warehouse.accounts()
        statuses = store_of(server).statuses
        if fault == "408":
            assert result.splits >= ROWS // 25 and statuses[408] == result.splits
            assert store_of(server).largest_call <= 10
        else:
            assert statuses[int(fault)] == 4 and result.retries == 4
        assert sync(config_for(warehouse, server, tmp_path)).sent == 0
    finally:
        server.stop()


def test_unknown_ids_are_reported_missing_never_updated_and_retried_next_run(warehouse, tmp_path):
    known = [f"acct-{i:04d}" for i in range(ROWS - 5)]
    server = start_pendo(accounts=known)
    try:
        cfg = config_for(warehouse, server, tmp_path)
        first = sync(cfg)
        assert first.ok
        assert (first.sent, first.updated, first.missing, first.errors) == (ROWS, ROWS - 5, 5, 0)
        unknown = {f"acct-{i:04d}" for i in range(ROWS - 5, ROWS)}
        assert unknown.isdisjoint(store_of(server).records["account"])  # update mode creates nothing
        failures = warehouse.rows("SELECT key, outcome FROM _floe_sync_failures WHERE sync = 'accounts'")
        assert {k for k, _ in failures} == unknown and {o for _, o in failures} == {"missing"}
        details = json.loads(warehouse.rows("SELECT details FROM _floe_loads WHERE source = '_floe_sync'")[0][0])
        assert (details["updated"], details["missing"], details["failed"]) == (ROWS - 5, 5, 5)

        again = sync(cfg)  # only the failed rows are retried
        assert (again.sent, again.updated, again.missing) == (5, 0, 5)

        store_of(server).add("account", sorted(unknown))  # the accounts now exist in Pendo
        last = sync(cfg)
        assert (last.sent, last.updated, last.missing) == (5, 5, 0)
        assert warehouse.rows("SELECT COUNT(*) FROM _floe_sync_failures")[0][0] == 0
        assert held(server) == warehouse.accounts()
    finally:
        server.stop()


@pytest.mark.parametrize("problem,fields,expected", [
    ("unknown field", {**FIELDS, "plan": "plan_name"}, "Pendo has no account custom field 'plan_name'"),
    ("type mismatch", {**FIELDS, "plan": "seats", "seats": "plan"}, "does not fit Pendo account custom field"),
    ("missing column", {**FIELDS, "tier": "region"}, "no column 'tier'"),
])
def test_a_mapping_that_does_not_match_the_schema_sends_nothing(warehouse, pendo, tmp_path, problem, fields,
                                                                 expected):
    result = sync(config_for(warehouse, pendo, tmp_path, fields=fields))
    assert not result.ok and expected in result.error and "nothing sent" in result.error
    assert store_of(pendo).calls == 0 and result.sent == 0
    assert not any(store_of(pendo).values("account").values())


def test_rows_pendo_rejects_are_recorded_with_its_message_and_not_snapshotted(tmp_path):
    wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    wh.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts (account_id TEXT, plan TEXT, "
               "seats INTEGER, mrr DOUBLE, active BOOLEAN, renewal_date DATE)",
               f"INSERT INTO analytics.accounts VALUES {account_rows(ROWS)}")
    wh.dest.close()
    server = start_pendo(reject={"acct-0003": "value too long"})
    try:
        cfg = config_for(wh, server, tmp_path)
        result = sync(cfg)
        assert (result.updated, result.errors, result.missing) == (ROWS - 1, 1, 0)
        assert wh.rows("SELECT key, outcome, message FROM _floe_sync_failures") == [
            ("acct-0003", "error", "value too long")]
        assert wh.rows("SELECT COUNT(*) FROM _floe_sync_snapshot WHERE key = 'acct-0003'") == [(0,)]
        store_of(server).reject.clear()
        assert (sync(cfg).updated, wh.rows("SELECT COUNT(*) FROM _floe_sync_failures")) == (1, [(0,)])
    finally:
        server.stop()


def test_requests_are_capped_by_rows_and_by_bytes_and_upsert_creates_records(tmp_path):
    wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    wh.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts AS SELECT 'acct-' || i AS account_id, "
               "repeat('x', 200) AS plan FROM range(300) t(i)")
    wh.dest.close()
    server = start_pendo(accounts=[])
    try:
        cfg = config_for(wh, server, tmp_path, fields={"plan": "plan"}, mode="upsert",
                         to={"batch_rows": 100, "batch_bytes": 6_000})
        result = sync(cfg)
        stats = store_of(server).stats()
        assert result.ok and result.updated == 300 and stats["counts"]["account"] == 300
        assert stats["largest_body"] <= 6_000 and stats["largest_call"] < 100 and result.requests >= 300 * 240 // 6000
    finally:
        server.stop()


def test_duplicate_keys_are_an_error_and_nothing_is_sent(tmp_path, pendo):
    wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    wh.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts AS SELECT 'acct-000' || (i % 3) "
               "AS account_id, 'pro' AS plan FROM range(5) t(i)")
    wh.dest.close()
    result = sync(config_for(wh, pendo, tmp_path, fields={"plan": "plan"}))
    assert "account_id is not unique (2 duplicate rows), nothing sent" in result.error
    assert store_of(pendo).calls == 0


def test_a_wrong_integration_key_fails_with_the_status_and_never_shows_the_key(warehouse, pendo, tmp_path):
    result = sync(config_for(warehouse, pendo, tmp_path, to={"integration_key": "wrong-key-123456"}))
    assert "HTTP 401" in result.error and "wrong-key-123456" not in result.error


def test_cli_dry_run_shows_what_would_be_sent_then_full_resends_everything(tmp_path, pendo, monkeypatch):
    wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    wh.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts (account_id TEXT, plan TEXT, "
               "seats INTEGER, mrr DOUBLE, active BOOLEAN, renewal_date DATE)",
               f"INSERT INTO analytics.accounts VALUES {account_rows(ROWS)}")
    wh.dest.close()
    monkeypatch.setenv("PENDO_KEY", KEY)
    (tmp_path / "floe.yml").write_text(yaml.safe_dump({
        "destinations": {"warehouse": wh.settings},
        "syncs": {"pendo_accounts": {
            "from": "warehouse", "query": "select account_id, plan, seats from analytics.accounts",
            "to": {"type": "pendo", "integration_key": "${PENDO_KEY}", "kind": "account", "base_url": pendo.url},
            "key": {"account_id": "accountId"}, "fields": {"plan": "plan", "seats": "seats"}}}}))
    runner = CliRunner()
    config = str(tmp_path / "floe.yml")
    dry = runner.invoke(cli_app, ["sync", "-c", config, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing sent" in dry.output and '"accountId": "acct-0000"' in dry.output
    assert store_of(pendo).calls == 0 and KEY not in dry.output

    assert runner.invoke(cli_app, ["sync", "pendo_accounts", "-c", config]).exit_code == 0
    assert store_of(pendo).records_received == ROWS
    full = runner.invoke(cli_app, ["sync", "-c", config, "--full"])
    assert full.exit_code == 0 and store_of(pendo).records_received == 2 * ROWS
    missing = runner.invoke(cli_app, ["sync", "nope", "-c", config])
    assert missing.exit_code == 1 and "syncs.nope: no such sync" in missing.output


@pytest.mark.parametrize("change,expected", [
    ({"key": {"account_id": "visitorId"}}, "syncs.s: key: a account sync maps its key column to accountId"),
    ({"table": "analytics.accounts"}, "syncs.s: give exactly one of query: or table:"),
    ({"to": {"type": "hubspot"}}, "syncs.s.to.type: must be one of pendo"),
    ({"fields": {"plan": "plan-name"}}, "syncs.s.fields: a Pendo field name holds letters, digits and _ and starts with a letter or _: plan-name"),
    ({"mode": "mirror"}, "syncs.s.mode: must be one of update, upsert"),
    ({"to": {"region": "jp"}}, "syncs.s.to.region: must be one of us, eu"),
    ({"from": None}, "syncs.s.from: "),
])
def test_config_errors_name_the_key_path(change, expected):
    sync_entry: dict[str, Any] = {"from": "warehouse", "query": "select 1", "key": {"account_id": "accountId"},
                                  "fields": {"plan": "plan"}, "to": {"type": "pendo", "integration_key": "k" * 8,
                                                                     "kind": "account"}}
    for k, v in change.items():
        if isinstance(v, dict) and k == "to":
            sync_entry["to"] = {**sync_entry["to"], **v}
        else:
            sync_entry[k] = v
    with pytest.raises(ConfigError) as err:
        parse_config({"destinations": {"warehouse": {"type": "duckdb"}}, "syncs": {"s": sync_entry}})
    assert expected in str(err.value) and "k" * 8 not in str(err.value)


def test_region_picks_the_pendo_host_and_base_url_overrides_it():
    base = {"type": "pendo", "integration_key": "abcd1234", "kind": "visitor"}
    entry = {"from": "w", "table": "t", "key": {"id": "visitorId"}, "fields": {"email": "email"}}
    cfg = parse_config({"syncs": {"a": {**entry, "to": base}, "b": {**entry, "to": {**base, "region": "eu"}},
                                  "c": {**entry, "to": {**base, "base_url": "http://127.0.0.1:9/"}}}})
    assert [cfg.syncs[n].to.url for n in "abc"] == [
        "https://app.pendo.io", "https://app.eu.pendo.io", "http://127.0.0.1:9"]


def test_floe_run_loads_then_syncs_what_it_loaded(tmp_path, monkeypatch):
    """`floe run` runs the syncs after its loads: Sailthru exports -> DuckDB -> Pendo visitor metadata."""
    from floe.sandbox.sailthru import write_message_blast

    write_message_blast(tmp_path / "export", 200, files=1)
    server = start_pendo(accounts=[])
    try:
        (tmp_path / "floe.yml").write_text(yaml.safe_dump({
            "sources": {"sailthru": {"type": "sailthru", "path": "export", "pii": "hash", "salt": "test-salt-1"}},
            "destinations": {"warehouse": {"type": "duckdb", "path": "w.duckdb"}},
            "stage": "stage",
            "syncs": {"visitor_logins": {
                "from": "warehouse", "mode": "upsert",
                "query": "SELECT profile_id, CAST(COUNT(*) AS INTEGER) AS sends, MAX(send_time) AS last_send "
                         "FROM sailthru.message_blast GROUP BY profile_id",
                "to": {"type": "pendo", "integration_key": KEY, "kind": "visitor", "base_url": server.url},
                "key": {"profile_id": "visitorId"}, "fields": {"sends": "logins", "last_send": "signed_up"}}}}))
        result = CliRunner().invoke(cli_app, ["run", "-c", str(tmp_path / "floe.yml")])
        assert result.exit_code == 0, result.output
        assert "floe sync" in result.output and "visitor_logins" in result.output
        wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
        expected = {pid: {"logins": n, "signed_up": int(ts.timestamp() * 1000)} for pid, n, ts in wh.rows(
            "SELECT profile_id, COUNT(*), MAX(send_time) FROM sailthru.message_blast GROUP BY profile_id")}
        assert len(expected) > 100 and store_of(server).values("visitor") == expected
    finally:
        server.stop()


def test_a_refused_request_stops_the_sync_keeps_what_pendo_accepted_and_the_next_run_finishes(tmp_path, pendo):
    wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    wh.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts (account_id TEXT, plan TEXT, "
               "seats INTEGER, mrr DOUBLE, active BOOLEAN, renewal_date DATE)",
               f"INSERT INTO analytics.accounts VALUES {account_rows(ROWS)}")
    wh.dest.close()
    store_of(pendo).inject(400)  # e.g. a field deleted from Data Mappings after the check
    cfg = config_for(wh, pendo, tmp_path, to={"batch_rows": 10})
    failed = sync(cfg)
    assert not failed.ok and "HTTP 400" in failed.error and "Bad Request" in failed.error
    assert 0 < failed.updated < ROWS  # requests already in flight finished; no new ones started
    assert wh.rows("SELECT COUNT(*) FROM _floe_sync_snapshot") == [(failed.updated,)]
    assert wh.rows("SELECT status, rows FROM _floe_loads") == [("failed", failed.updated)]
    rest = sync(cfg)
    assert rest.ok and rest.sent == ROWS - failed.updated
    assert held(pendo) == wh.accounts()


def test_failed_syncs_and_rejected_rows_are_reported_through_notify(tmp_path):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    notices: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        notices.append(await request.json())
        return Response(status_code=204)

    wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    wh.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts AS SELECT 'acct-' || lpad(CAST(i AS "
               "VARCHAR), 4, '0') AS account_id, 'pro' AS plan FROM range(10) t(i)")
    wh.dest.close()
    server = start_pendo(accounts=[f"acct-{i:04d}" for i in range(8)])
    webhook = serve_in_thread(Starlette(routes=[Route("/hook", hook, methods=["POST"])]))
    try:
        def entry(key: str) -> dict[str, Any]:
            return {"from": "warehouse", "table": "analytics.accounts", "key": {"account_id": "accountId"},
                    "fields": {"plan": "plan"},
                    "to": {"type": "pendo", "integration_key": key, "kind": "account", "base_url": server.url}}
        (tmp_path / "floe.yml").write_text(yaml.safe_dump({
            "destinations": {"warehouse": wh.settings}, "stage": "stage", "notify": {"webhook": webhook.url + "/hook"},
            "syncs": {"rejected_rows": entry(KEY), "bad_key": entry("not-the-key-98765")}}))
        result = CliRunner().invoke(cli_app, ["sync", "-c", str(tmp_path / "floe.yml")])
        assert result.exit_code == 1 and "1 of 2 syncs failed" in result.output
        by_sync = {n["stream"]: n for n in notices}
        assert set(by_sync) == {"rejected_rows", "bad_key"} and all(n["event"] == "failed" for n in notices)
        assert "2 rows rejected by Pendo (2 missing, 0 errors)" in by_sync["rejected_rows"]["error"]
        assert "HTTP 401" in by_sync["bad_key"]["error"] and "not-the-key-98765" not in json.dumps(notices)
    finally:
        webhook.stop()
        server.stop()


# --- the metadata schema as Pendo spells it ----------------------------------------------------

def duckdb_accounts(tmp_path: Path) -> Warehouse:
    wh = Warehouse({"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    wh.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts (account_id TEXT, plan TEXT, "
               "seats INTEGER, mrr DOUBLE, active BOOLEAN, renewal_date DATE)",
               f"INSERT INTO analytics.accounts VALUES {account_rows(ROWS)}")
    wh.dest.close()
    return wh


@pytest.mark.parametrize("casing", ["camel", "pascal", "mixed"])
def test_field_types_are_checked_whatever_the_casing_of_the_schema(tmp_path, casing):
    wh = duckdb_accounts(tmp_path)
    server = start_pendo(schema_casing=casing)
    try:
        for column in FIELDS:  # each field in turn gets a column of the wrong type
            wrong = "active" if column != "active" else "plan"
            result = sync(config_for(wh, server, tmp_path, fields={wrong: FIELDS[column]}))
            assert not result.ok and f"does not fit Pendo account custom field '{column}'" in result.error, column
        assert store_of(server).calls == 0
        assert sync(config_for(wh, server, tmp_path)).updated == ROWS  # the right mapping goes through
    finally:
        server.stop()


def write_cli_config(tmp_path: Path, wh: Warehouse, server: RunningServer, **sync_entry: Any) -> str:
    entry = {"from": "warehouse", "table": "analytics.accounts", "key": {"account_id": "accountId"},
             "fields": {"plan": "plan", "seats": "seats"},
             "to": {"type": "pendo", "integration_key": KEY, "kind": "account", "base_url": server.url,
                    "backoff_base": 0.01}, **sync_entry}
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump({"destinations": {"warehouse": wh.settings}, "stage": str(tmp_path / "stage"),
                                    "syncs": {"accounts": entry}}))
    return str(path)


def test_a_field_whose_type_pendo_does_not_give_is_a_warning_naming_it(tmp_path):
    wh = duckdb_accounts(tmp_path)
    schema = {"account": {"custom": {"plan": "string", "seats": None, "tier": "list"}}}
    server = start_pendo(schema=schema)
    try:
        config = write_cli_config(tmp_path, wh, server, fields={"plan": "plan", "seats": "seats", "mrr": "tier"})
        result = CliRunner().invoke(cli_app, ["sync", "-c", config])
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: syncs.accounts.fields.")]
        assert len(warnings) == 2 and all("sent without a type check" in w for w in warnings)
        assert any("seats: Pendo's metadata schema gives no type for account custom field 'seats'" in w
                   for w in warnings)
        assert any("mrr: Pendo's metadata schema gives the type 'list', which floe does not know, for "
                   "account custom field 'tier'" in w for w in warnings)
        held = store_of(server).values("account")
        assert held["acct-0007"] == {"plan": "pro", "seats": 7, "tier": 17.5}
    finally:
        server.stop()


# --- a sync in which Pendo accepts nothing ---------------------------------------------------------

def error_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_sync_whose_every_row_is_rejected_fails_with_a_one_line_reason_and_partial_rejections_warn(tmp_path):
    wh = duckdb_accounts(tmp_path)
    server = start_pendo(accounts=[])  # mode update: none of the warehouse's accounts exists in Pendo
    runner = CliRunner()
    try:
        config = write_cli_config(tmp_path, wh, server)
        for _ in range(2):  # nothing was ever accepted: every run fails
            result = runner.invoke(cli_app, ["sync", "-c", config])
            assert result.exit_code == 1, result.output
            reason, total = error_lines(result)
            assert reason.startswith(f"error: syncs.accounts: Pendo accepted none of the {ROWS} rows "
                                     f"sent ({ROWS} missing, 0 errors); none of these accounts exists in Pendo "
                                     "(mode: update creates none, mode: upsert does)")
            assert reason.endswith("see _floe_sync_failures") and total == "error: 1 of 1 syncs failed"
        assert wh.rows("SELECT status, rows FROM _floe_loads ORDER BY started_at") == [("failed", 0)] * 2
        assert wh.rows("SELECT COUNT(*) FROM _floe_sync_failures WHERE outcome = 'missing'") == [(ROWS,)]

        store_of(server).add("account", [f"acct-{i:04d}" for i in range(ROWS - 5)])
        partial = runner.invoke(cli_app, ["sync", "-c", config])
        assert partial.exit_code == 0 and not error_lines(partial), partial.output
        assert "warning: 5 rows were rejected by Pendo" in partial.stderr
        # Next run: only the 5 still-missing rows are retried and rejected again. The sync has
        # had rows accepted and these were failing already: a warning, not a failure, run after run.
        retried = runner.invoke(cli_app, ["sync", "-c", config])
        assert retried.exit_code == 0 and "warning: 5 rows were rejected by Pendo" in retried.stderr
        details = json.loads(wh.rows("SELECT details FROM _floe_loads ORDER BY started_at DESC LIMIT 1")[0][0])
        assert (details["sent"], details["missing"]) == (5, 5)

        # A new row rejected with nothing accepted is a failure again (say a wrong id column).
        wh.execute("INSERT INTO analytics.accounts VALUES ('acct-new', 'pro', 1, 1.0, TRUE, NULL)")
        wh.dest.close()
        fresh = runner.invoke(cli_app, ["sync", "-c", config])
        assert fresh.exit_code == 1 and "Pendo accepted none of the 6 rows sent (6 missing" in fresh.stderr
    finally:
        server.stop()


def test_rows_rejected_with_errors_only_fail_the_sync_too(tmp_path):
    wh = duckdb_accounts(tmp_path)
    server = start_pendo(reject={f"acct-{i:04d}": "value too long" for i in range(ROWS)})
    try:
        result = CliRunner().invoke(cli_app, ["sync", "-c", write_cli_config(tmp_path, wh, server)])
        assert result.exit_code == 1
        (reason, _) = error_lines(result)
        assert f"Pendo accepted none of the {ROWS} rows sent (0 missing, {ROWS} errors); see _floe_sync_failures" \
            in reason
    finally:
        server.stop()
