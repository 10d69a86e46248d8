"""floe.yml errors are one line naming the key; secrets never show; `floe check` and `floe state show`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from floe.cli import app
from floe.config import parse_config
from floe.core.errors import ConfigError
from tests.fixtures.sailthru import Project

Factory = Callable[..., Project]


def floe(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [*args, "-c", str(config)], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, source_lines: str, destination: str = "    type: duckdb\n    path: w.duckdb\n") -> Path:
    path = tmp_path / "floe.yml"
    path.write_text(f"sources:\n  sailthru:\n    type: sailthru\n{source_lines}destinations:\n  warehouse:\n{destination}")
    return path


@pytest.mark.parametrize(("source_lines", "message"), [
    ("    path: x\n    pii: scramble\n", "sources.sailthru.pii: must be one of hash, drop, keep"),
    ("    pii: hash\n", "sources.sailthru.path: is required"),
    ("    path: x\n    colour: red\n", "sources.sailthru.colour: unknown key"),
    ("    path: x\n    timezone: Mars/Olympus\n", "sources.sailthru.timezone: value error, unknown time zone 'Mars/Olympus'"),
    ("    path: x\n    salt: ${FLOE_TEST_UNSET_VARIABLE}\n",
     "sources.sailthru.salt: environment variable FLOE_TEST_UNSET_VARIABLE is not set"),
])
@pytest.mark.parametrize("command", [["run"], ["check"], ["state", "show"]])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, source_lines: str, message: str,
                                                command: list[str]) -> None:
    code, stdout, stderr = floe(write(tmp_path, source_lines), *command, env={"FLOE_TEST_UNSET_VARIABLE": None})  # type: ignore[dict-item]
    assert code != 0
    assert stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "w.duckdb").exists()


def test_unknown_destination_type_lists_the_known_ones(tmp_path: Path) -> None:
    code, _, stderr = floe(write(tmp_path, "    path: x\n", "    type: excel\n"), "check")
    assert code != 0
    assert stderr.startswith("error: destinations.warehouse.type: must be one of ") and "duckdb" in stderr


PG = {"type": "postgres", "host": "db.example", "database": "analytics", "user": "floe"}


@pytest.mark.parametrize(("first", "second", "place"), [
    ({"type": "duckdb", "path": "w.duckdb"}, {"type": "duckdb", "path": "./sub/../w.duckdb"}, "the DuckDB file {dir}/w.duckdb"),
    ({"type": "duckdb", "path": "w.duckdb"}, {"type": "duckdb", "path": "{dir}/w.duckdb"}, "the DuckDB file {dir}/w.duckdb"),
    (PG, {**PG, "schema_prefix": "copy_"}, "schema public of db.example:5432/analytics (the state)"),
    (PG, {**PG, "state_schema": "floe_meta"}, "schemas <source> of db.example:5432/analytics (the tables)"),
    ({"type": "files", "path": "out"}, {"type": "files", "path": "{dir}/out/", "format": "csv"}, "files under {dir}/out"),
    ({"type": "files", "path": "s3://bucket/x"}, {"type": "files", "path": "s3://bucket/x/"}, "files under s3://bucket/x"),
    ({"type": "bigquery", "project": "p", "dataset": "d", "stage": "gs://b/s"},
     {"type": "bigquery", "project": "p", "dataset": "d", "stage": "gs://b/other"}, "the BigQuery dataset p.d"),
])
def test_a_source_cannot_load_into_two_destinations_that_share_a_place(tmp_path: Path, first: dict, second: dict,
                                                                        place: str) -> None:
    # Each would read the other's state as its own and skip (or repeat) what the other loaded.
    def spell(settings: dict) -> dict:
        return {k: v.format(dir=tmp_path) if isinstance(v, str) else v for k, v in settings.items()}

    data = {"sources": {"s": {"type": "sailthru", "path": "x"}}, "destinations": {"a": spell(first), "b": spell(second)}}
    with pytest.raises(ConfigError) as raised:
        parse_config(data, tmp_path / "floe.yml")
    assert str(raised.value) == (f"destinations.b: keeps data in {place.format(dir=tmp_path.resolve())}, as destinations.a "
                                 "does, and source 's' loads into both: their states would mix (point one "
                                 "elsewhere, or list one in sources.s.destinations)")
    data["sources"]["s"]["destinations"] = ["a"]  # each source loading into one of them is fine
    data["sources"]["t"] = {"type": "sailthru", "path": "y", "destinations": ["b"]}
    assert set(parse_config(data, tmp_path / "floe.yml").destinations) == {"a", "b"}


@pytest.mark.parametrize("second", [
    {"type": "duckdb", "path": "other.duckdb"},
    {**PG, "schema_prefix": "copy_", "state_schema": "copy_meta"},
    {**PG, "database": "staging"},
    {"type": "files", "path": "w.duckdb.d"},
])
def test_destinations_in_separate_places_take_the_same_source(tmp_path: Path, second: dict) -> None:
    first = PG if second["type"] == "postgres" else {"type": "duckdb", "path": "w.duckdb"}
    data = {"sources": {"s": {"type": "sailthru", "path": "x"}}, "destinations": {"a": first, "b": second}}
    assert parse_config(data, tmp_path / "floe.yml").destinations_for("s") == ["a", "b"]


def test_two_destinations_on_one_file_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "    path: x\n", "    type: duckdb\n    path: w.duckdb\n  copy:\n    type: duckdb\n"
                 f"    path: {tmp_path}/w.duckdb\n")
    code, _, stderr = floe(path, "run")
    assert code != 0
    assert stderr.strip().splitlines() == [
        f"error: destinations.copy: keeps data in the DuckDB file {tmp_path.resolve()}/w.duckdb, as "
        "destinations.warehouse does, and source 'sailthru' loads into both: their states would mix (point one "
        "elsewhere, or list one in sources.sailthru.destinations)"]
    assert not (tmp_path / "w.duckdb").exists()


def test_hashing_without_a_salt_names_the_key(tmp_path: Path) -> None:
    code, _, stderr = floe(write(tmp_path, "    path: x\n"), "run", env={"FLOE_PII_SALT": None})  # type: ignore[dict-item]
    assert code != 0
    assert stderr.strip() == "error: sources.sailthru.salt: is required when pii is hash (or set FLOE_PII_SALT)"


def test_salt_from_the_environment_hashes_like_the_config_salt(sailthru_project: Factory) -> None:
    project = sailthru_project(days=1, profiles=5)
    project.write_config(salt=None)
    code, _, stderr = floe(project.root / "floe.yml", "run", env={"FLOE_PII_SALT": "env-salt-1234"})
    assert code == 0, stderr
    from_env = project.query("SELECT id, email_hash FROM sailthru.profile ORDER BY id")
    project.db.unlink()
    project.write_config(salt="env-salt-1234")
    assert floe(project.root / "floe.yml", "run")[0] == 0
    assert project.query("SELECT id, email_hash FROM sailthru.profile ORDER BY id") == from_env


def test_secrets_never_appear_in_output_state_or_errors(sailthru_project: Factory) -> None:
    secret = "s3cret-salt-value-0042"
    project = sailthru_project(days=2, profiles=10)
    config = project.write_config(salt="${FLOE_TEST_SALT}")
    env = {"FLOE_TEST_SALT": secret}
    outputs = []
    for command in (["check"], ["run"], ["state", "show"], ["state", "show", "--singer"]):
        code, stdout, stderr = floe(config, *command, env=env)
        assert code == 0, stderr
        outputs.append(stdout + stderr)
    # An error message that happens to contain the secret value prints *** instead.
    missing = project.root / f"exports-{secret}"
    config.write_text(config.read_text().replace(str(project.export), str(missing)))
    code, stdout, stderr = floe(config, "run", env=env)
    assert code != 0 and "exports-***" in stdout + stderr
    outputs.append(stdout + stderr)
    with duckdb.connect(str(project.db), read_only=True) as conn:
        outputs.append(repr(conn.execute("SELECT * FROM _floe_state").fetchall()))
        outputs.append(repr(conn.execute("SELECT * FROM _floe_loads").fetchall()))
        outputs.append(repr(conn.execute("SELECT * FROM _floe_runs").fetchall()))
    assert not [text for text in outputs if secret in text]


def test_check_validates_and_reaches_the_destination(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()  # the (empty) export folder
    code, stdout, stderr = floe(write(tmp_path, "    path: x\n    pii: drop\n"), "check")
    assert code == 0, stderr
    assert "config ok: 1 sources, 1 destinations" in stdout
    assert "destination warehouse: ok: DuckDB database " in stdout and "w.duckdb will be created" in stdout
    assert not (tmp_path / "w.duckdb").exists()  # a check creates nothing

    (tmp_path / "folder.duckdb").mkdir()  # a path DuckDB cannot open
    code, stdout, stderr = floe(write(tmp_path, "    path: x\n    pii: drop\n",
                                      "    type: duckdb\n    path: folder.duckdb\n"), "check")
    assert code != 0
    assert "warehouse: FAILED" in stderr and "folder.duckdb" in stderr


def test_state_show_lists_every_stream_with_its_files(sailthru_project: Factory) -> None:
    project = sailthru_project(days=2)
    config = project.root / "floe.yml"
    assert floe(config, "run")[0] == 0
    code, stdout, _ = floe(config, "state", "show", "--json")
    assert code == 0
    rows = json.loads(stdout)["warehouse"]
    states = {r["stream"]: r["state"] for r in rows if r["source"] == "sailthru"}
    assert set(states) == {"blast", "message_blast", "message_transactional", "profile", "profile_geo",
                           "profile_browser", "profile_lists_signup", "profile_vars", "exports"}
    # each stream's ledger of loaded files (kept in `_floe_files`) is shown with its state
    assert set(states["blast"]["_floe_files"]) == {"blast.20160401.json", "blast.20160402.json"}
    assert set(states["message_blast"]["_floe_files"]) == {
        "message_blast.20160401.json", "message_blast.20160402.json", "message_blast_update.20160402.json"}
    assert all(len(digest) == 64 for digest in states["exports"]["_floe_files"].values())

    code, stdout, _ = floe(config, "state", "show", "--singer")
    assert code == 0
    assert json.loads(stdout)["bookmarks"] == states  # Singer's form of the one source's state


def test_every_unset_variable_is_reported_at_once(tmp_path: Path) -> None:
    config = write(tmp_path, "    path: ${FLOE_TEST_PATH}\n    salt: ${FLOE_TEST_SALT}\n",
                   "    type: duckdb\n    path: ${FLOE_TEST_DB}\n")
    code, _, stderr = floe(config, "check", env={"FLOE_TEST_PATH": None, "FLOE_TEST_SALT": None,  # type: ignore[dict-item]
                                                  "FLOE_TEST_DB": None})
    assert code != 0
    assert stderr.strip() == (
        "error: sources.sailthru.path: environment variable FLOE_TEST_PATH is not set; "
        "sources.sailthru.salt: environment variable FLOE_TEST_SALT is not set; "
        "destinations.warehouse.path: environment variable FLOE_TEST_DB is not set")


@pytest.mark.parametrize(("source_lines", "message"), [
    ("    path: x\n    pii: drop\n    tiemzone: UTC\n", "sources.sailthru.tiemzone: unknown key (did you mean timezone?)"),
    ("    path: x\n    pii: drop\n    colour: red\n", "sources.sailthru.colour: unknown key"),
    ("    path: x\n    pii: drop\ndestination:\n  x: {}\n", "destination: unknown key (did you mean destinations?)"),
])
def test_unknown_keys_suggest_the_closest_known_one(tmp_path: Path, source_lines: str, message: str) -> None:
    code, _, stderr = floe(write(tmp_path, source_lines), "check")
    assert code != 0
    assert stderr.strip() == f"error: {message}"


def test_a_dotenv_file_next_to_the_config_fills_unset_variables(sailthru_project: Factory) -> None:
    project = sailthru_project(days=1, profiles=5)
    config = project.write_config(salt="${FLOE_TEST_DOTENV_SALT}")
    (project.root / ".env").write_text("# secrets\nFLOE_TEST_DOTENV_SALT=from-dotenv-1234\nexport FLOE_TEST_OTHER='x y'\n")
    code, stdout, stderr = floe(config, "run", env={"FLOE_TEST_DOTENV_SALT": None})  # type: ignore[dict-item]
    assert code == 0, stderr
    from_dotenv = project.query("SELECT id, email_hash FROM sailthru.profile ORDER BY id")
    assert "from-dotenv-1234" not in stdout + stderr

    project.db.unlink()
    code, _, stderr = floe(config, "run", env={"FLOE_TEST_DOTENV_SALT": "from-the-environment"})
    assert code == 0, stderr
    from_environment = project.query("SELECT id, email_hash FROM sailthru.profile ORDER BY id")
    assert from_environment != from_dotenv  # the environment wins over .env
    project.db.unlink()
    project.write_config(salt="from-dotenv-1234")
    assert floe(config, "run")[0] == 0
    assert project.query("SELECT id, email_hash FROM sailthru.profile ORDER BY id") == from_dotenv
