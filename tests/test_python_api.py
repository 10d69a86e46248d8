"""`floe.run` and `floe.sync` (docs/python.md): a path or a dict in, a result per stream or sync out,
a FloeError on failure; `import floe` alone loads none of the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import floe
from floe.apps.api import RunFailed, SyncFailed
from floe.core.errors import ConfigError, FloeError
from floe.sandbox.pendo import create_app
from floe.sandbox.server import serve_in_thread
from tests.fixtures.sailthru import SALT, Project
from tests.test_pendo_sync import KEY, ROWS, Warehouse, account_rows


def sailthru_config(project: Project) -> dict[str, Any]:
    return {"sources": {"sailthru": {"type": "sailthru", "path": str(project.export), "salt": SALT}},
            "destinations": {"warehouse": {"type": "duckdb", "path": str(project.db)}},
            "stage": str(project.stage)}


def test_run_from_a_dict_returns_rows_and_commits_per_stream_as_loaded(sailthru_project: Any) -> None:
    project = sailthru_project(days=2, profiles=40)
    result = floe.run(sailthru_config(project))
    assert result.ok and result.errors == {}
    counts = {s.stream: s.rows for s in result.streams}
    for table in ("blast", "message_transactional", "exports"):
        assert counts[table] == project.query(f"SELECT count(*) FROM sailthru.{table}")[0][0] > 0, table
    assert result.rows == sum(counts.values()) and result.commits >= len(result.streams)
    assert result.stream("sailthru.blast").destination == "warehouse"
    assert {s.destination for s in result.streams} == {"warehouse"}
    again = floe.run(sailthru_config(project), streams="sailthru.blast")  # nothing new
    assert [(s.stream, s.rows) for s in again.streams] == [("blast", 0)]


def test_run_from_a_path_reads_the_file_and_its_env(sailthru_project: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    project = sailthru_project(days=1, profiles=20)
    config = sailthru_config(project)
    config["sources"]["sailthru"]["salt"] = "${API_TEST_SALT}"
    path = project.root / "pipeline.yml"
    path.write_text(yaml.safe_dump(config))
    (project.root / ".env").write_text(f"API_TEST_SALT={SALT}\n")
    monkeypatch.delenv("API_TEST_SALT", raising=False)
    result = floe.run(str(path), streams=["blast"], destination="warehouse")
    assert [(s.source, s.stream, s.ok) for s in result.streams] == [("sailthru", "blast", True)]


def test_a_failed_stream_raises_a_floe_error_carrying_every_result(sailthru_project: Any, tmp_path: Path) -> None:
    project = sailthru_project(days=1, profiles=20)
    config = sailthru_config(project)
    config["sources"]["missing"] = {"type": "sailthru", "path": str(tmp_path / "nowhere"), "salt": SALT}
    with pytest.raises(RunFailed) as caught:
        floe.run(config)
    assert isinstance(caught.value, FloeError)
    result = caught.value.result
    assert {s.source for s in result.streams if s.ok} == {"sailthru"}  # the other source committed
    assert result.errors and all(k.startswith("missing.") and "nowhere" in v for k, v in result.errors.items())
    assert "streams failed: missing." in str(caught.value)
    quiet = floe.run(config, raise_on_failure=False, sources="missing")
    assert not quiet.ok and set(quiet.errors) == set(result.errors)


def test_a_wrong_config_or_selection_raises_a_config_error_before_anything_runs(sailthru_project: Any) -> None:
    project = sailthru_project(days=1, profiles=20)
    with pytest.raises(ConfigError, match="--stream nope"):
        floe.run(sailthru_config(project), streams="nope")
    with pytest.raises(ConfigError, match=r"sources\.s\.type"):
        floe.run({"sources": {"s": {"type": "twilo"}}})
    with pytest.raises(ConfigError, match="config file not found"):
        floe.run(project.root / "absent.yml")
    assert not project.db.exists()


def test_sync_returns_each_sync_and_raises_when_one_fails(tmp_path: Path) -> None:
    settings = {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}
    warehouse = Warehouse(settings, tmp_path)
    warehouse.execute("CREATE SCHEMA analytics", "CREATE TABLE analytics.accounts (account_id TEXT, plan TEXT, "
                      "seats INTEGER, mrr DOUBLE, active BOOLEAN, renewal_date DATE)",
                      f"INSERT INTO analytics.accounts VALUES {account_rows(ROWS)}")
    warehouse.dest.close()
    server = serve_in_thread(create_app(integration_key=KEY, accounts=[f"acct-{i:04d}" for i in range(ROWS)]))
    try:
        def config(key: str) -> dict[str, Any]:
            to = {"type": "pendo", "integration_key": key, "kind": "account", "base_url": server.url}
            return {"destinations": {"warehouse": settings}, "stage": str(tmp_path / "stage"),
                    "syncs": {"accounts": {"from": "warehouse", "table": "analytics.accounts", "to": to,
                                           "key": {"account_id": "accountId"}, "fields": {"plan": "plan"}}}}

        result = floe.sync(config(KEY))
        assert result.ok and [(s.name, s.changed, s.sent, s.failed) for s in result.syncs] == [
            ("accounts", ROWS, ROWS, 0)]
        with pytest.raises(SyncFailed, match="1 of 1 syncs failed: accounts: .*401") as caught:
            floe.sync(config("wrong-key-123456"), "accounts", full=True)
        assert "wrong-key-123456" not in str(caught.value) and not caught.value.result.ok
    finally:
        server.stop()


def test_import_floe_loads_no_engine() -> None:
    code = ("import sys, floe; print(callable(floe.run), callable(floe.sync), "
            "any(m in sys.modules for m in ('floe.engine.runner', 'floe.config', 'pyarrow', 'duckdb')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["True", "True", "False"]
