"""`floe state log | revert | reset | show` end to end: `floe run` on the FullStory emulator (six hourly
windows of 600 events, one commit each) into each kind of destination, then the state commands.

Revert then re-run loads every reverted event again exactly once; reset then re-run equals a clean
run; a command refuses (exit 1, one line naming the holder, nothing changed) while a run holds the
stream's lease.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.sandbox.fullstory import DEFAULT_API_KEY
from tests.fixtures.destinations import Place, place_of

EVENTS = 6 * 600
KINDS = ["duckdb", "postgres", "bigquery", "files"]
COMMIT_EACH_WINDOW = {"duckdb": {"commit_rows": 0}, "bigquery": {"commit_interval_seconds": 0}}


def project(place: Place, server_url: str, hours: int = 6) -> Path:
    config = place.base / "floe.yml"
    config.write_text(yaml.safe_dump({
        "sources": {"fs": {"type": "fullstory", "api_key": DEFAULT_API_KEY, "base_url": server_url,
                           "start_time": "2024-01-01T00:00:00Z", "end_time": f"2024-01-01T{hours:02d}:00:00Z",
                           "poll_interval": 0.05}},
        "destinations": {"w": {**place.settings, **COMMIT_EACH_WINDOW.get(place.kind, {})}},
        "stage": str(place.base / "stage"),
    }))
    return config


def floe(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [*args, "-c", str(config)], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def floe_process(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`floe` in a process of its own (a lease held by this process is another run's to it)."""
    return subprocess.run([sys.executable, "-c", "from floe.cli import main; main()", *args, "-c", str(config)],
                          cwd=config.parent, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def loaded(place: Place) -> list[Any]:
    """Every loaded event's EventStart, sorted (a multiset: an event loaded twice shows twice)."""
    return place.column("fs", "events", "EventStart")


def log(config: Path) -> list[dict[str, Any]]:
    code, out, err = floe(config, "state", "log", "fs.events", "--json", "--limit", "0")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("kind", KINDS)
def test_revert_then_rerun_loads_each_event_once_and_reset_then_rerun_equals_a_clean_run(
        kind, fullstory_server, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    config = project(place, fullstory_server.url)
    assert floe(config, "run")[0] == 0
    clean = loaded(place)
    assert len(clean) == EVENTS

    versions = log(config)
    assert [v["version"] for v in versions] == [6, 5, 4, 3, 2, 1]
    assert {(v["destination"], v["source"], v["stream"], v["action"], v["rows"]) for v in versions} == {
        ("w", "fs", "events", "load", 600)}
    code, table, _ = floe(config, "state", "log", "fs.events")
    assert code == 0 and "fs.events -> w" in table and versions[0]["load_id"] in table

    code, out, err = floe(config, "state", "revert", "fs.events", "--to", "2")
    assert code == 0, err
    assert "reverted to version 2 as version 7; deleted 2,400 rows" in out
    assert len(loaded(place)) == 2 * 600
    [revert] = log(config)[:1]
    assert (revert["version"], revert["action"], revert["details"]["to_version"], revert["state"]) == (
        7, "revert", 2, versions[4]["state"])
    assert floe(config, "run")[0] == 0
    assert loaded(place) == clean  # the four windows again, each event once

    code, out, err = floe(config, "state", "reset", "fs.events")  # deleting rows needs a yes
    assert code == 1 and "pass --yes" in err and len(loaded(place)) == EVENTS
    code, out, err = floe(config, "state", "reset", "fs.events", "--yes")
    assert code == 0, err
    assert f"deleted {EVENTS:,} rows" in out and loaded(place) == []
    code, out, _ = floe(config, "state", "show", "--json")
    assert code == 0 and [(r["stream"], r["state"]) for r in json.loads(out)["w"]] == [("events", None)]
    assert floe(config, "run")[0] == 0
    assert loaded(place) == clean
    assert [v["action"] for v in log(config)][:8] == ["load"] * 6 + ["reset", "load"]


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "files"])
def test_every_state_command_refuses_while_a_run_holds_the_stream(kind, fullstory_server, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    config = project(place, fullstory_server.url, hours=2)
    assert floe(config, "run")[0] == 0
    holder = place.open()
    lease = holder.acquire_lease("fs", "events")  # DuckDB: this process now has the file open
    try:
        for command in (["revert", "fs.events", "--to", "1"], ["reset", "fs.events", "--yes"]):
            done = floe_process(config, "state", *command)
            assert done.returncode == 1, done.stderr
            [line] = done.stderr.splitlines()
            assert line.startswith("error: fs.events -> w: another run is loading this stream ("), line
            assert f"pid {os.getpid()}" in line and "nothing changed" in line
    finally:
        lease.release()
        holder.close()
    assert len(loaded(place)) == 2 * 600 and [v["version"] for v in log(config)] == [2, 1]


def test_state_show_is_a_table_by_default_and_honours_source(fullstory_server, request, tmp_path):
    place = place_of("duckdb", request, tmp_path)
    config = project(place, fullstory_server.url)
    assert floe(config, "run")[0] == 0
    code, out, _ = floe(config, "state", "show")
    assert code == 0 and "floe state" in out and "events" in out and '"sync_point"' in out
    code, out, _ = floe(config, "state", "show", "--json", "--source", "fs")
    assert code == 0 and [r["version"] for r in json.loads(out)["w"]] == [6]
    code, _, err = floe(config, "state", "show", "--source", "nope")
    assert code == 1 and "sources.nope: no such source" in err


def test_revert_of_a_merge_stream_names_what_it_cannot_restore_and_needs_a_yes(postgres_db, tmp_path):
    """The SQL source's table with a primary key and a replication key is a merge stream: a row that a later
    load overwrote is gone after the revert until the next run reads it again, with its current value."""
    import psycopg

    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id INT PRIMARY KEY, name TEXT, updated_at TIMESTAMP)")
        conn.execute("INSERT INTO users VALUES (1, 'a', '2024-01-01'), (2, 'b', '2024-01-02')")
    config = tmp_path / "floe.yml"
    config.write_text(yaml.safe_dump({
        "sources": {"app": {"type": "sql", "url": postgres_db.url,
                            "tables": [{"name": "users", "replication_key": "updated_at"}]}},
        "destinations": {"w": {"type": "duckdb", "path": "w.duckdb"}}, "stage": "stage"}))
    place = Place("duckdb", {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    assert floe(config, "run")[0] == 0
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("UPDATE users SET name = 'b2', updated_at = '2024-01-03' WHERE id = 2")
    assert floe(config, "run")[0] == 0
    assert place.column("app", "users", "name") == ["a", "b2"]

    code, out, err = floe(config, "state", "revert", "app.users", "--to", "1")
    assert code == 1 and "A merge stream: rows that loads after version 1 overwrote" in err and "pass --yes" in err
    code, out, err = floe(config, "state", "revert", "app.users", "--to", "1", "--dry-run")
    assert code == 0 and "dry run: nothing changed" in out
    assert place.column("app", "users", "name") == ["a", "b2"]  # nothing changed yet
    code, out, err = floe(config, "state", "revert", "app.users", "--to", "1", "--yes")
    assert code == 0, err
    assert place.column("app", "users", "name") == ["a"]  # b's first row was overwritten: not restored
    assert floe(config, "run")[0] == 0
    assert place.column("app", "users", "name") == ["a", "b2"]  # read again, once
