"""`floe run --stream SOURCE.STREAM` / `--stream STREAM` / `--destination NAME` with several sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.sandbox.emulators import sandbox_config, stop_all


@pytest.fixture(scope="module")
def sandbox_sources() -> Iterator[dict[str, Any]]:
    config, running = sandbox_config(["twilio", "singular"], options={"twilio": {"size": 20}})
    yield config["sources"]
    stop_all(running)


def project(tmp_path: Path, sources: dict[str, Any]) -> Path:
    config = {"sources": sources, "stage": str(tmp_path / "stage"), "destinations": {
        name: {"type": "duckdb", "path": str(tmp_path / f"{name}.duckdb")} for name in ("one", "two")}}
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def floe(config: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["run", *args, "-c", str(config)], catch_exceptions=False)


def loaded(tmp_path: Path, destination: str) -> set[tuple[str, str]]:
    path = tmp_path / f"{destination}.duckdb"
    if not path.exists():
        return set()
    with duckdb.connect(str(path), read_only=True) as conn:
        return set(conn.execute("SELECT DISTINCT source, stream FROM _floe_state").fetchall())


@pytest.mark.parametrize(("args", "expected"), [
    (["--stream", "calls"], {("twilio", "calls")}),  # only one source has it
    (["--stream", "twilio.calls", "--stream", "singular.campaign_stats"],
     {("twilio", "calls"), ("singular", "campaign_stats")}),
])
def test_streams_by_plain_or_qualified_name(tmp_path: Path, sandbox_sources: dict[str, Any], args: list[str],
                                            expected: set[tuple[str, str]]) -> None:
    result = floe(project(tmp_path, sandbox_sources), *args, "--destination", "two")
    assert result.exit_code == 0, result.output
    assert loaded(tmp_path, "two") == expected
    assert loaded(tmp_path, "one") == set()  # --destination two: nothing went into one


@pytest.mark.parametrize(("args", "message"), [
    (["--stream", "calls"], "error: --stream calls: several sources have it; name one: twilio.calls or twilio_eu.calls"),
    (["--stream", "twilio.cals"], "error: --stream twilio.cals: source twilio has streams "),
    (["--stream", "cals"], "error: --stream cals: no selected source has it (streams: singular.campaign_stats, twilio.calls, "),
    (["--destination", "three"], "error: destinations.three: no such destination (configured: one, two)"),
])
def test_ambiguous_or_unknown_selection_fails_before_loading(tmp_path: Path, sandbox_sources: dict[str, Any],
                                                             args: list[str], message: str) -> None:
    sources = {**sandbox_sources, "twilio_eu": sandbox_sources["twilio"]}
    result = floe(project(tmp_path, sources), *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(message), result.stderr
    assert loaded(tmp_path, "one") == set() and loaded(tmp_path, "two") == set()
