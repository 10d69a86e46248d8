"""Run history: every run gets a run id, on each `_floe_loads` row it writes and on its one row in each
destination's `_floe_runs` (started, finished, status, counts), also when it loaded nothing or failed;
`floe runs` lists the last runs. Over every destination kind."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from floe.apps.serve import Server
from floe.cli import app
from floe.config import load_config
from floe.core.plugins import destination_registry, source_registry
from floe.core.runs import RunRecord, new_run_id, who
from floe.core.settings import SourceConfig
from floe.core.stream import Source, Stream
from floe.destinations.files import STATE_DIR, FilesDestination
from floe.destinations.sql import SqlDestination
from floe.engine.runner import run
from tests.fixtures.core import VersionedRows
from tests.fixtures.destinations import Place


class RowsConfig(SourceConfig):
    type: str = "rows"
    ids: int = 4
    fail_at: int | None = None


class RowsSource(Source):
    """One stream, `items`: rows 0..ids-1 in checkpoints of two, raising at row `fail_at`."""

    Config = RowsConfig

    def streams(self) -> list[Stream]:
        return [VersionedRows(range(self.config.ids), "v1", fail_at=self.config.fail_at)]


@pytest.fixture(autouse=True)
def rows_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(source_registry._entries, "rows", f"{__name__}:RowsSource")
    # `type: redshift` is replayed on PostgreSQL (tests/fixtures/redshift.py)
    monkeypatch.setitem(destination_registry._entries, "redshift", "tests.fixtures.redshift:RedshiftOnPostgres")


def project(place: Place, tmp_path: Path, **source: Any) -> Path:
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump({"stage": str(tmp_path / "stage"),
                                    "sources": {"src": {"type": "rows", **source}},
                                    "destinations": {"w": place.settings}}))
    return path


def load_log(place: Place) -> list[tuple[str, str | None]]:
    """(status, run_id) of every `_floe_loads` row (files: of every state version and load-log object)."""
    if place.kind.startswith("files"):
        dest = place.open()
        assert isinstance(dest, FilesDestination)
        records = [json.loads(dest.store.get_bytes(key) or b"{}") for key, _ in dest.store.list(dest.key("src", "items"))
                   if (f"/{STATE_DIR}/v" in f"/{key}" or "/_floe_loads/" in f"/{key}")]
        return sorted((r.get("status", "committed"), r["run_id"]) for r in records)
    table = "raw._floe_loads" if place.bigquery is not None else "_floe_loads"
    return sorted((str(s), r) for s, r in place._sql(f"SELECT status, run_id FROM {table}"))


def test_every_run_has_a_run_row_and_its_id_on_its_loads(place, tmp_path):
    config = project(place, tmp_path)
    first = run(load_config(config))  # rows 0..3, two commits
    second = run(load_config(config))  # nothing new
    failing = run(load_config(project(place, tmp_path, ids=8, fail_at=6)))  # rows 4, 5 commit, then it breaks
    assert [r.rows for r in (*first, *second, *failing)] == [4, 0, 2] and not failing[0].ok

    dest = place.open()
    try:
        newest, middle, oldest = dest.runs()
        assert len(dest.runs(limit=2)) == 2
    finally:
        dest.close()
    assert len({newest.run_id, middle.run_id, oldest.run_id}) == 3
    commits = first[0].commits, failing[0].commits  # 2 and 1, unless the destination folds checkpoints
    assert (oldest.status, oldest.streams, oldest.failed, oldest.rows, oldest.commits) == ("succeeded", 1, 0, 4,
                                                                                          commits[0])
    assert (middle.status, middle.rows, middle.commits, middle.error) == ("succeeded", 0, 0, None)
    assert (newest.status, newest.failed, newest.rows, newest.commits) == ("failed", 1, 2, commits[1])
    assert "the source broke" in (newest.error or "") and newest.details["failed_streams"] == ["src.items"]
    for record in (oldest, middle, newest):
        assert record.destination == "w" and record.details["command"] == "run"
        assert record.finished_at is not None and record.started_at <= record.finished_at
    assert oldest.started_at <= middle.started_at <= newest.started_at
    assert load_log(place) == sorted([("committed", oldest.run_id)] * commits[0] + [("committed", newest.run_id)]
                                     * commits[1] + [("failed", newest.run_id)])


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "redshift", "bigquery"])
def test_a_load_log_made_before_run_ids_gets_the_column(kind, request, tmp_path):
    from tests.fixtures.destinations import place_of

    place = place_of(kind, request, tmp_path)
    table = "raw._floe_loads" if place.bigquery is not None else "_floe_loads"
    text = "STRING" if place.bigquery is not None else "VARCHAR"
    old = (f"CREATE TABLE {table} (load_id {text}, source {text}, stream {text}, destination {text}, rows BIGINT, "
           f"started_at TIMESTAMP, finished_at TIMESTAMP, status {text}, error {text}, details {text})")
    if place.bigquery is not None:
        place.bigquery.db.execute(old)
    else:
        dest = place.open()
        assert isinstance(dest, SqlDestination)
        with dest.transaction() as cur:
            cur.execute(old)
        dest.close()
    run(load_config(project(place, tmp_path)))
    dest = place.open()
    try:
        [record] = dest.runs()
    finally:
        dest.close()
    assert load_log(place) == [("committed", record.run_id)] * record.commits and record.rows == 4


KILLED_RUN = textwrap.dedent("""
    import asyncio, json, os, signal, sys
    from pathlib import Path
    from floe.core.runs import new_run_id
    from floe.engine.runs import RunLog
    from tests.fixtures.destinations import open_destination

    dest = open_destination(json.loads(sys.argv[1]), Path(sys.argv[2]))
    run_log = RunLog(new_run_id(), "run", ["src"])
    asyncio.run(run_log.started(dest))  # the run's `running` row, then the process dies mid-run
    print(run_log.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_run_killed_mid_way_is_shown_failed_and_the_next_run_rewrites_its_row(place, tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(place.settings), str(tmp_path)],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    dead_id = killed.stdout.strip()
    dest = place.open()
    try:  # a run of this process that is still going: not mistaken for a dead one
        dest.record_run(RunRecord(new_run_id(), "w", datetime.now(UTC), details=who()))
        stored = {r.run_id: r.status for r in dest.runs()}
    finally:
        dest.close()
    assert sorted(stored.values()) == ["running", "running"] and stored[dead_id] == "running"

    config = project(place, tmp_path)
    listed = CliRunner().invoke(app, ["runs", "-c", str(config), "--json"])
    assert listed.exit_code == 0, listed.output
    shown = {r["run_id"]: r for r in json.loads(listed.stdout)}
    assert shown[dead_id]["status"] == "failed" and "ended without finishing" in shown[dead_id]["error"]
    assert f"pid {shown[dead_id]['details']['pid']}" in shown[dead_id]["error"]
    assert [r["status"] for i, r in shown.items() if i != dead_id] == ["running"]

    [result] = run(load_config(config))
    assert result.ok
    dest = place.open()
    try:
        after = {r.run_id: r for r in dest.runs()}
    finally:
        dest.close()
    assert after[dead_id].status == "failed" and "ended without finishing" in (after[dead_id].error or "")
    assert sorted(r.status for r in after.values()) == ["failed", "running", "succeeded"]


def test_floe_runs_lists_the_last_runs_newest_first(tmp_path):
    duck = Place("duckdb", {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    config = project(duck, tmp_path)
    cli = CliRunner()
    empty = cli.invoke(app, ["runs", "-c", str(config), "--json"])
    assert (empty.exit_code, json.loads(empty.output)) == (0, []) and not (tmp_path / "w.duckdb").exists()
    for _ in range(3):
        assert cli.invoke(app, ["run", "-c", str(config)]).exit_code == 0
    listed = cli.invoke(app, ["runs", "-c", str(config), "--json", "--limit", "2"])
    assert listed.exit_code == 0, listed.output
    runs = json.loads(listed.output)
    assert [(r["status"], r["rows"], r["destination"]) for r in runs] == [("succeeded", 0, "w")] * 2
    assert runs[0]["started_at"] >= runs[1]["started_at"] and runs[0]["run_id"] != runs[1]["run_id"]
    table = cli.invoke(app, ["runs", "-c", str(config), "--destination", "w"])
    assert table.exit_code == 0 and table.output.count("succeeded") == 3 and runs[0]["run_id"] in table.output
    unknown = cli.invoke(app, ["runs", "-c", str(config), "--destination", "nope"])
    assert unknown.exit_code == 1 and "nope" in unknown.output


def test_each_source_turn_of_floe_serve_is_a_run(tmp_path):
    duck = Place("duckdb", {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}, tmp_path)
    asyncio.run(Server(load_config(project(duck, tmp_path))).run(max_cycles=1))
    dest = duck.open()
    try:
        [record] = dest.runs()
    finally:
        dest.close()
    assert (record.status, record.rows, record.details["command"], record.details["sources"]) == (
        "succeeded", 4, "serve", ["src"])


def test_run_ids_sort_by_time_and_are_unique():
    ids = [new_run_id(now_ms=ms) for ms in (1, 2, 2, 1_800_000_000_000)]
    assert all(len(i) == 26 for i in ids) and len(set(ids)) == 4
    assert ids[0] < ids[1] and ids[2] < ids[3]
