"""`floe check`: one line per source, destination and the stage, ok or FAILED with the reason; exit
non-zero on any failure; nothing created. Credentials are checked against the emulators over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.sandbox.emulators import sandbox_config, stop_all
from floe.sandbox.sailthru import ExportSpec, generate

CHECKED = ["singular", "fullstory", "twilio"]  # API sources whose emulators judge credentials
SECRET = {"singular": "api_key", "fullstory": "api_key", "twilio": "auth_token"}


@pytest.fixture(scope="module")
def emulated() -> Iterator[dict[str, Any]]:
    config, running = sandbox_config(CHECKED, options={"fullstory": {"events_per_hour": 1}, "twilio": {"size": 5}})
    yield config["sources"]
    stop_all(running)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "sailthru"
    generate(folder, ExportSpec(days=1, profiles=3))
    return folder


def check(tmp_path: Path, sources: dict[str, Any], env: dict[str, str | None] | None = None) -> Any:
    config = {"sources": sources, "stage": "stage",
              "destinations": {"warehouse": {"type": "duckdb", "path": "sub/w.duckdb"}}}
    (tmp_path / "floe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["check", "-c", str(tmp_path / "floe.yml")], env=env, catch_exceptions=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["floe.yml"]  # neither the database nor the stage
    return result


def sailthru(export: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "sailthru", "path": str(export), "pii": "hash", "salt": "salt-for-check-tests", **extra}


def test_every_source_destination_and_the_stage_is_ok(tmp_path: Path, emulated: dict[str, Any],
                                                      export: Path) -> None:
    result = check(tmp_path, {**emulated, "sailthru": sailthru(export)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "config ok: 4 sources, 1 destinations"
    ok = {line.split(": ok: ")[0].strip(): line.split(": ok: ")[1] for line in lines[1:]}
    assert set(ok) == {"source singular", "source fullstory", "source twilio", "source sailthru",
                       "destination warehouse", "stage"}
    assert ok["source singular"].startswith("API key accepted by http://127.0.0.1:")
    assert ok["source fullstory"].startswith("API key accepted by http://127.0.0.1:")
    assert ok["source twilio"].startswith(f"account {emulated['twilio']['account_sid']}: credentials accepted by ")
    assert "export files (blast, " in ok["source sailthru"] and "pii hash (salt set)" in ok["source sailthru"]
    assert ok["destination warehouse"].endswith("sub/w.duckdb will be created by the first run")
    assert ok["stage"].endswith("stage will be created by the first run")


@pytest.mark.parametrize("name", CHECKED)
def test_a_wrong_credential_fails_its_source_only(tmp_path: Path, emulated: dict[str, Any], name: str,
                                                  export: Path) -> None:
    wrong = "wrong-key-for-check-0000"
    sources = {**emulated, name: {**emulated[name], SECRET[name]: wrong}, "sailthru": sailthru(export)}
    result = check(tmp_path, sources)
    assert result.exit_code == 1
    failed = [line.strip() for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith(f"source {name}: FAILED: {name}: HTTP 401: "), result.stderr
    assert result.stderr.splitlines()[-1] == "error: 1 of 6 checks failed"
    assert wrong not in result.output
    assert sum(": ok: " in line for line in result.stdout.splitlines()) == 5


@pytest.mark.parametrize(("change", "reason"), [
    ({"path": "/nonexistent/sailthru-export"}, "/nonexistent/sailthru-export: no such file or folder"),
    ({"salt": None}, "sources.sailthru.salt: is required when pii is hash (or set FLOE_PII_SALT)"),
])
def test_a_missing_export_folder_or_salt_fails(tmp_path: Path, export: Path, change: dict[str, Any],
                                               reason: str) -> None:
    source = {k: v for k, v in {**sailthru(export), **change}.items() if v is not None}
    result = check(tmp_path, {"sailthru": source}, env={"FLOE_PII_SALT": None})
    assert result.exit_code == 1
    assert f"source sailthru: FAILED: {reason}" in result.stderr


def test_an_unwritable_stage_or_database_folder_fails(tmp_path: Path, export: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    config = {"sources": {"sailthru": sailthru(export)}, "stage": "blocker/stage",
              "destinations": {"warehouse": {"type": "duckdb", "path": "blocker/w.duckdb"}}}
    (tmp_path / "floe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["check", "-c", str(tmp_path / "floe.yml")], catch_exceptions=False)
    assert result.exit_code == 1
    assert "destination warehouse: FAILED: " in result.stderr and "blocker is not a writable folder" in result.stderr
    assert "stage: FAILED: stage: " in result.stderr
    assert result.stderr.splitlines()[-1] == "error: 2 of 3 checks failed"


def test_sql_source_and_postgres_destination_by_url(tmp_path: Path, postgres_db: Any, export: Path) -> None:
    """`url:` works for the PostgreSQL destination as for the SQL source; a wrong password fails both checks."""
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.people (id int PRIMARY KEY, name text)")
    sources = {"crm": {"type": "sql", "url": postgres_db.url, "schema": "app"}, "sailthru": sailthru(export)}
    config = {"sources": sources, "stage": str(tmp_path / "stage"),
              "destinations": {"pg": {"type": "postgres", "url": postgres_db.url + "?sslmode=disable"}}}
    (tmp_path / "floe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["check", "-c", str(tmp_path / "floe.yml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "source crm: ok: postgresql://" in result.stdout and "1 tables to read in schema app" in result.stdout
    assert "destination pg: ok: connected to postgresql://" in result.stdout

    run = CliRunner().invoke(app, ["run", "--stream", "blast", "-c", str(tmp_path / "floe.yml")],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM sailthru.blast").fetchone()[0] > 0

    wrong = postgres_db.url.replace(f":{postgres_db.password}@", ":Wr0ngPassw0rd@")
    sources["crm"]["url"] = wrong
    config["destinations"]["pg"]["url"] = wrong
    (tmp_path / "floe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["check", "-c", str(tmp_path / "floe.yml")], catch_exceptions=False)
    assert result.exit_code == 1
    assert "source crm: FAILED: sources.crm: cannot connect to postgresql://" in result.stderr
    assert "destination pg: FAILED: destinations.pg: cannot connect to postgresql://" in result.stderr
    assert result.stderr.count("authentication failed") == 2 and "Wr0ngPassw0rd" not in result.output
