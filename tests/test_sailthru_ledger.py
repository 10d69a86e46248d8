"""The Sailthru file ledger: state versions stay small on the SQL warehouses (the files loaded are rows
of `_floe_files`, written in each load's transaction), `floe state revert`/`reset` undo the ledger with
the rows, a state written before the ledger keeps working, and `state_history_days` prunes old versions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.sandbox.sailthru import ExportSpec, generate
from tests.fixtures.destinations import Place, place_of
from tests.fixtures.sailthru import SALT

DAYS = ["20160401", "20160402", "20160403"]
LEDGER_KINDS = {"duckdb", "postgres", "bigquery"}  # the ledger in `_floe_files` (Redshift shares the SQL code)
COMMIT_EACH_FILE = {"bigquery": {"commit_interval_seconds": 0}}


def setup(place: Place, tmp_path: Path, **destination: Any) -> tuple[Path, Path]:
    """A project loading the blast files of a three-day export; (floe.yml, the export folder)."""
    export = tmp_path / "export"
    generate(export, ExportSpec(days=3, profiles=10))
    config = tmp_path / "floe.yml"
    config.write_text(yaml.safe_dump({
        "sources": {"st": {"type": "sailthru", "path": str(export), "salt": SALT}},
        "destinations": {"w": {**place.settings, **COMMIT_EACH_FILE.get(place.kind, {}), **destination}}, "stage": str(tmp_path / "stage")}))
    return config, export


def floe(config: Path, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "-c", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


def versions(config: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in floe(config, "state", "log", "st.blast", "--json", "--limit", "0").splitlines()]


def blasts(place: Place) -> list[tuple[Any, ...]]:
    return place.rows("st", "blast", "id", "name")


def ledger(place: Place) -> list[tuple[Any, ...]]:
    table = "raw._floe_files" if place.kind == "bigquery" else "_floe_files"
    return sorted(tuple(r) for r in place._sql(f"SELECT entry, version FROM {table} WHERE stream = 'blast'"))


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "bigquery", "files"])
def test_revert_and_reset_undo_the_ledger_and_a_rerun_loads_each_file_once(kind: str, request: Any,
                                                                           tmp_path: Path) -> None:
    place = place_of(kind, request, tmp_path)
    config, _ = setup(place, tmp_path)
    floe(config, "run", "--stream", "st.blast")
    clean = blasts(place)
    assert clean and len(clean) == len({r[0] for r in clean})
    log = versions(config)
    assert [v["version"] for v in log] == [3, 2, 1]
    if kind in LEDGER_KINDS:  # each version holds the small state only; the files are ledger rows
        assert all("_floe_files" not in v["state"] and len(json.dumps(v["state"])) < 100 for v in log)
        assert ledger(place) == [(f"blast.{day}.json", n) for n, day in enumerate(DAYS, 1)]

    first_day = [r for r in clean if r in blasts(place)]  # (all of them now)
    assert "deleted" in floe(config, "state", "revert", "st.blast", "--to", "1", "--yes")
    after_revert = blasts(place)
    assert len(after_revert) < len(first_day)
    if kind in LEDGER_KINDS:
        assert ledger(place) == [(f"blast.{DAYS[0]}.json", 1)]
    floe(config, "run", "--stream", "st.blast")  # the two later files load again, once
    assert blasts(place) == clean
    assert [v["action"] for v in versions(config)][:3] == ["load", "load", "revert"]

    floe(config, "state", "reset", "st.blast", "--yes")
    assert blasts(place) == []
    if kind in LEDGER_KINDS:
        assert ledger(place) == []
    floe(config, "run", "--stream", "st.blast")
    assert blasts(place) == clean


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_a_state_from_before_the_ledger_is_read_once_and_moved_to_it(kind: str, request: Any, tmp_path: Path) -> None:
    place = place_of(kind, request, tmp_path)
    config, export = setup(place, tmp_path)
    later = export / f"blast.{DAYS[2]}.json"
    held = later.read_bytes()
    later.unlink()
    floe(config, "run", "--stream", "st.blast")
    before = blasts(place)
    # what an older floe wrote: every loaded file's checksum in the state itself, no ledger rows
    legacy = {f"blast.{day}.json": hashlib.sha256((export / f"blast.{day}.json").read_bytes()).hexdigest()
              for day in DAYS[:2]}
    dest = place.open()
    with dest.transaction() as cur:  # type: ignore[attr-defined]
        cur.execute("DELETE FROM _floe_files")
        cur.execute("UPDATE _floe_state SET state = %s WHERE version = 2" if kind != "duckdb" else
                    "UPDATE _floe_state SET state = ? WHERE version = 2", (json.dumps({"files": legacy}),))
    dest.close()

    later.write_bytes(held)
    floe(config, "run", "--stream", "st.blast")
    log = versions(config)
    assert [v["version"] for v in log] == [3, 2, 1]  # one new commit: the old files were not loaded again
    assert log[0]["state"] == {"files_loaded": 3, "last_file": f"blast.{DAYS[2]}.json"}
    assert ledger(place) == [(f"blast.{DAYS[0]}.json", 3), (f"blast.{DAYS[1]}.json", 3), (f"blast.{DAYS[2]}.json", 3)]
    assert set(before) <= set(blasts(place))
    floe(config, "run", "--stream", "st.blast")
    assert len(versions(config)) == 3  # and the ledger alone keeps them skipped


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "bigquery"])
def test_state_history_days_prunes_old_versions_but_keeps_the_latest(kind: str, request: Any, tmp_path: Path) -> None:
    place = place_of(kind, request, tmp_path)
    config, export = setup(place, tmp_path, state_history_days=2)
    later = export / f"blast.{DAYS[2]}.json"
    held = later.read_bytes()
    later.unlink()
    floe(config, "run", "--stream", "st.blast")
    older = "UPDATE {}_floe_state SET committed_at = committed_at - INTERVAL '3 days'"
    if place.bigquery is not None:
        place.bigquery.db.execute(older.format("raw."))
    else:
        dest = place.open()
        with dest.transaction() as cur:  # type: ignore[attr-defined]
            cur.execute(older.format(""))
        dest.close()
    assert [v["version"] for v in versions(config)] == [2, 1]  # pruning happens with a commit

    later.write_bytes(held)
    floe(config, "run", "--stream", "st.blast")
    assert [v["version"] for v in versions(config)] == [3]  # versions 1 and 2 were older than 2 days
    assert len(ledger(place)) == 3
    rows = blasts(place)
    floe(config, "run", "--stream", "st.blast")  # nothing to load: the ledger still has every file
    assert [v["version"] for v in versions(config)] == [3] and blasts(place) == rows
