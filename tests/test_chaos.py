"""`floe chaos` against the emulators: a sound destination survives kills and API faults; a broken one
(state and rows committed apart, installed as a plugin through an entry point) is caught."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.core.plugins import destination_registry

REPO = Path(__file__).resolve().parents[1]


def chaos_config(tmp_path: Path, destination: dict[str, object], singular: bool = True) -> Path:
    """A user's floe.yml: real-looking credentials and start dates that `floe chaos` replaces."""
    sources: dict[str, object] = {"twilio": {
        "type": "twilio", "account_sid": "AC" + "0" * 32, "auth_token": "not-used", "start_date": "2019-01-01",
        "streams": ["calls", "messages"], "window_days": 6, "lookback_days": 0}}
    if singular:
        sources["singular"] = {"type": "singular", "api_key": "not-used", "lookback_days": 3}
    sources["db"] = {"type": "sql", "url": "postgresql://prod.example/crm", "schema": "crm",
                     "tables": [{"name": "accounts", "replication_key": "updated_at"}, "plans"]}
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump({"sources": sources, "destinations": {"warehouse": destination}}))
    return path


def rows_of(output: str) -> dict[str, list[str]]:
    """The report's table rows: stream -> [trials, kills, faults, rows, duplicates, losses, changed, result]."""
    found = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if len(cells) == 10 and cells[0] == "warehouse":
            found[cells[1]] = cells[2:]
    return found


# Every kind of kill point: right after the first load commit (where the broken plugin below loses
# rows), inside the second (its statements ran, no COMMIT), and in the middle of staging.
EVERY_KIND = "after-commit:1,before-commit:2,batch:3"


@pytest.mark.slow
def test_a_sound_destination_survives_kills_and_faults(tmp_path: Path) -> None:
    config = chaos_config(tmp_path, {"type": "duckdb", "path": "w.duckdb", "commit_rows": 0})
    result = CliRunner().invoke(app, ["chaos", "-c", str(config), "--trials", "1", "--seed", "3",
                                      "--kill-at", EVERY_KIND])
    assert result.exit_code == 0, result.output
    assert f"trial 1/1: kills at {EVERY_KIND.replace(',', ', ')};" in result.output
    rows = rows_of(result.output)
    assert set(rows) == {"twilio.calls", "twilio.messages", "singular.campaign_stats"}
    for stream, (trials, kills, _faults, count, duplicates, losses, changed, verdict) in rows.items():
        assert (trials, kills, duplicates, losses, changed, verdict) == ("1", "3", "0", "0", "0", "ok"), stream
        assert int(count) > 0, stream
    assert int(rows["twilio.calls"][2]) > 0  # faults were injected into Twilio's requests
    assert "source db (sql): not tested" in result.output
    assert not (tmp_path / "w.duckdb").exists()  # the user's own warehouse is never touched


@pytest.fixture
def broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install tests/plugins/broken_duckdb.py as the destination type `broken_duckdb` (an entry point)."""
    site = tmp_path / "site"
    info = site / "floe_broken_duckdb-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: floe-broken-duckdb\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[floe.destinations]\nbroken_duckdb = tests.plugins.broken_duckdb:BrokenDuckDB\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("PYTHONPATH", f"{site}:{REPO}")  # for the `floe run` children
    monkeypatch.setattr(destination_registry, "_installed", None)


@pytest.mark.slow
@pytest.mark.usefixtures("broken_plugin")
def test_a_destination_committing_state_before_rows_is_caught(tmp_path: Path) -> None:
    config = chaos_config(tmp_path, {"type": "broken_duckdb", "path": "w.duckdb", "commit_rows": 0},
                          singular=False)
    result = CliRunner().invoke(app, ["chaos", "-c", str(config), "--trials", "1", "--faults", "none",
                                      "--kill-at", EVERY_KIND])
    assert result.exit_code == 1, result.output
    rows = rows_of(result.output)
    assert all(r[1] == "3" for r in rows.values()), result.output  # every point was reached
    assert sum(int(r[5]) for r in rows.values()) > 0, result.output  # rows lost
    assert any(r[7].startswith("DIFFERENT") for r in rows.values())
    assert "the chaos runs differ from the clean run" in result.output


def test_a_kill_point_is_checked_before_anything_runs(tmp_path: Path) -> None:
    config = chaos_config(tmp_path, {"type": "duckdb", "path": "w.duckdb"})
    result = CliRunner().invoke(app, ["chaos", "-c", str(config), "--kill-at", "after-commit:0"])
    assert result.exit_code == 1
    assert "--kill-at 'after-commit:0': a kill point is POINT:N" in result.output
    assert "clean run" not in result.output


def test_the_plugin_is_found_by_its_entry_point(broken_plugin: None) -> None:
    assert destination_registry.has("broken_duckdb") and "broken_duckdb" in destination_registry.names()
    assert destination_registry.load("broken_duckdb").__name__ == "BrokenDuckDB"
    assert sys.modules.get("tests.plugins.broken_duckdb") is not None


@pytest.mark.slow
def test_a_postgres_destination_gets_scratch_schemas_that_are_dropped_afterwards(tmp_path: Path,
                                                                                postgres_db: Any) -> None:
    import psycopg

    production = postgres_db.config(schema_prefix="prod_")  # never written: chaos uses scratch schemas
    config = chaos_config(tmp_path, production, singular=False)
    url = f"{postgres_db.url}?sslmode=disable"
    result = CliRunner().invoke(app, ["chaos", "-c", str(config), "--trials", "1", "--postgres-url", url,
                                      "--faults", "none", "--seed", "5"])
    assert result.exit_code == 0, result.output
    rows = rows_of(result.output)
    # the sql source reads scratch tables floe chaos filled on the same server
    assert set(rows) == {"twilio.calls", "twilio.messages", "db.accounts", "db.plans"}
    assert all(r[7] == "ok" and int(r[1]) >= 1 for r in rows.values()), result.output
    assert rows["db.accounts"][3] == rows["db.plans"][3] == "1200"
    with psycopg.connect(postgres_db.dsn) as conn:  # scratch schemas and tables are all dropped
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'floe_chaos%' "
                            "OR nspname LIKE 'prod%'").fetchall()
    assert left == []


@pytest.mark.slow
def test_a_fullstory_source_runs_against_its_emulator(tmp_path: Path) -> None:
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump({"sources": {"fs": {
        "type": "fullstory", "api_key": "not-used", "start_time": "2019-01-01T00:00:00Z",
        "export_duration": "2h", "export_delay": "48h"}}, "destinations": {
        "warehouse": {"type": "duckdb", "path": "w.duckdb", "commit_rows": 0}}}))
    result = CliRunner().invoke(app, ["chaos", "-c", str(path), "--trials", "1", "--faults", "429,5xx",
                                      "--kill-at", "after-commit:2,batch:4"])
    assert result.exit_code == 0, result.output
    rows = rows_of(result.output)
    assert set(rows) == {"fs.events"}, result.output
    trials, kills, faults, count, duplicates, losses, changed, verdict = rows["fs.events"]
    assert (trials, kills, duplicates, losses, changed, verdict) == ("1", "2", "0", "0", "0", "ok")
    assert int(count) == 12 * 120  # 12 hours of events at 120 an hour
    assert int(faults) > 0  # faults were injected into FullStory's requests


def test_a_config_without_a_testable_source_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump({"sources": {"db": {"type": "sql", "url": "postgresql://nowhere/db"}},
                                    "destinations": {"warehouse": {"type": "duckdb", "path": "w.duckdb"}}}))
    result = CliRunner().invoke(app, ["chaos", "-c", str(path)])
    assert result.exit_code == 1
    assert "note: source db (sql): not tested; pass --postgres-url" in result.output
    assert "error: floe chaos: no source of the config can be tested" in result.output
    assert "Traceback" not in result.output
