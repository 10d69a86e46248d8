"""Log lines of a real `floe run` against the Twilio emulator: `log_format: json` gives one JSON object
per line with typed fields, logfmt quotes the values that need it and parses back; off a terminal,
progress lines come every `progress_interval` seconds for the streams still running only, with the
rate over the elapsed time, and each stream ends with one summary line."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from floe.infra.logs import _Formatter
from tests.test_twilio import source_config, start_twilio

LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """A logfmt line as its libraries read it: bare values, or double-quoted with \\" and \\\\ escapes."""
    pairs = LOGFMT_PAIR.findall(line)
    assert " ".join(f"{k}={v}" for k, v in pairs) == line, f"not logfmt: {line}"
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def floe_run(tmp_path: Path, server: Any, sandbox: Any, fmt: str) -> tuple[int, list[str]]:
    """`floe run` of a good Twilio account and one with a wrong token; its exit status and stderr lines."""
    good = {**source_config(server, sandbox), "streams": ["calls", "messages"]}
    (tmp_path / "floe.yml").write_text(yaml.safe_dump({
        "sources": {"twilio": good, "revoked": {**good, "auth_token": "wrong"}},
        "destinations": {"warehouse": {"type": "duckdb", "path": str(tmp_path / f"{fmt}.duckdb")}},
        "log_format": fmt, "progress_interval": 0.2, "stage": str(tmp_path / "stage")}))
    done = subprocess.run([sys.executable, "-m", "floe", "run", "-c", str(tmp_path / "floe.yml")],
                          capture_output=True, text=True, timeout=180)
    return done.returncode, [line for line in done.stderr.splitlines() if line.startswith(("{", "ts="))]


@pytest.fixture
def twilio(emulator: Any) -> tuple[Any, Any]:
    return start_twilio(emulator, size=60, days=2, latency=0.05)


def check_run(events: list[dict[str, Any]], typed: bool) -> None:
    number = (lambda v: v) if typed else float
    done = {(e["source"], e["stream"]): e for e in events if e.get("event") == "stream_done"}
    assert len(done) == len([e for e in events if e.get("event") == "stream_done"])  # one per stream
    assert set(done) == {(s, t) for s in ("twilio", "revoked") for t in ("calls", "messages")}
    for (source, _), e in done.items():
        assert e["destination"] == "warehouse" and e["status"] == ("ok" if source == "twilio" else "failed")
        rate, rows, seconds = number(e["rate"]), number(e["rows"]), number(e["seconds"])
        assert abs(rate - rows / seconds) <= max(1.0, rate * 0.02) if seconds else rate == 0
        if source == "revoked":
            assert "401" in e["error"] and e["level"] == "error"
    assert sum(number(e["rows"]) for e in done.values()) > 0
    progress = [(n, e) for n, e in enumerate(events) if e.get("event") == "progress"]
    assert progress, "no progress line in a run longer than progress_interval"
    ended = {(e["source"], e["stream"]): n for n, e in enumerate(events) if e.get("event") == "stream_done"}
    for n, e in progress:  # only streams still running
        assert n < ended[(e["source"], e["stream"])], e
        assert number(e["seconds"]) >= 0 and number(e["rate"]) <= number(e["rows"]) / 0.1 + 1


def test_json_lines_carry_typed_fields(twilio, tmp_path):
    code, lines = floe_run(tmp_path, *twilio, "json")
    assert code == 1
    events = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger"} <= e.keys() for e in events)
    assert not [e for e in events if "event" not in e and "=" in e.get("msg", "")], "text wrapped in msg"
    check_run(events, typed=True)
    done = next(e for e in events if e.get("event") == "stream_done" and e["status"] == "ok")
    assert isinstance(done["rows"], int) and isinstance(done["seconds"], float) and isinstance(done["commits"], int)
    assert not any(twilio[1].credentials()[0][1] in line for line in lines)


def test_logfmt_lines_quote_what_needs_it_and_parse_back(twilio, tmp_path):
    code, lines = floe_run(tmp_path, *twilio, "text")
    assert code == 1
    events = [parse_logfmt(line) for line in lines]
    check_run(events, typed=False)
    failed = next(line for line in lines if "event=stream_done" in line and "status=failed" in line)
    assert ' error="revoked: HTTP 401' in failed


@pytest.mark.parametrize(("template", "args", "expected"), [
    ("event=x stream=%s rows=%d rate=%.0f", ("a.b -> c", 3, 2.6), 'event=x stream="a.b -> c" rows=3 rate=3'),
    ("event=x error=%s", ('say "hi" a=b\\',), r'event=x error="say \"hi\" a=b\\"'),
    ("event=x empty=%s none=%s", ("", None), 'event=x empty="" none='),
    ("event=x retry_in=%.0fs", (2.0,), "event=x retry_in=2s"),
    ("no pairs here: %s", ("x y",), 'msg="no pairs here: x y"'),
])
def test_logfmt_values(template, args, expected):
    line = _Formatter(False).format(logging.LogRecord("floe.t", logging.INFO, "f", 1, template, args, None))
    assert line.split(" logger=floe.t ", 1)[1] == expected
