"""Every floe source runs as a Singer tap: `floe tap TYPE --config settings.json` against the sandbox.

The output passes the singer-check-tap checks (SCHEMA first, every RECORD valid against its SCHEMA
with RFC 3339 format checks); a second run from the final STATE is valid too. HTTP sources report
`http_request_duration` metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from floe.sandbox import emulators
from floe.sandbox.sailthru import ExportSpec, generate
from tests.singer_check import check_tap_output

FLOE = str(Path(sys.executable).parent / "floe")


def tap(source_type: str, cwd: Path, *extra: str) -> tuple[bytes, list[dict[str, Any]]]:
    done = subprocess.run([FLOE, "tap", source_type, "--config", "tap.json", *extra], capture_output=True, cwd=cwd,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    metrics = [orjson.loads(line.split(b"INFO METRIC: ", 1)[1]) for line in done.stderr.splitlines()
               if b"INFO METRIC: " in line]
    return done.stdout, metrics


@pytest.fixture(params=["twilio", "singular"])
def http_source(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    running = emulators.start(request.param)
    try:
        yield next(iter(running.info["sources"].values()))
    finally:
        running.server.stop()


def test_http_sources_run_as_singer_taps(http_source: dict[str, Any], tmp_path: Path) -> None:
    settings = {k: v for k, v in http_source.items() if k != "type"}
    (tmp_path / "tap.json").write_text(json.dumps(settings))
    stdout, metrics = tap(http_source["type"], tmp_path)
    out = check_tap_output(stdout)
    assert sum(len(r) for r in out.records.values()) > 0 and out.last_state is not None
    assert any(m["metric"] == "http_request_duration" and m["tags"]["requests"] > 0 for m in metrics)
    (tmp_path / "state.json").write_text(json.dumps(out.last_state))
    again = check_tap_output(tap(http_source["type"], tmp_path, "--state", "state.json")[0])
    assert set(again.last_state["bookmarks"]) >= set(out.last_state["bookmarks"])


def test_sailthru_export_runs_as_a_singer_tap_and_resumes_without_repeating(tmp_path: Path) -> None:
    generate(tmp_path, ExportSpec(profiles=20, days=2, zip_name="exports.zip"))
    (tmp_path / "tap.json").write_text(json.dumps({"path": "exports.zip", "salt": "test-salt-1234"}))
    stdout, metrics = tap("sailthru", tmp_path)
    out = check_tap_output(stdout)
    assert len(out.records) >= 2 and all(len(r) > 0 for r in out.records.values())
    counted = {m["tags"]["endpoint"]: m["value"] for m in metrics if m["metric"] == "record_count"}
    assert counted == {s: len(r) for s, r in out.records.items() if r} | {s: 0 for s in counted if s not in out.records}
    (tmp_path / "state.json").write_text(json.dumps(out.last_state))
    again = check_tap_output(tap("sailthru", tmp_path, "--state", "state.json")[0])
    assert sum(len(r) for r in again.records.values()) == 0  # every file was already read
