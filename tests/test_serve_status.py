"""`floe serve` observable: `/healthz` (200 while the loop is alive and the last cycle did not fail,
503 otherwise, JSON) and `/metrics` (Prometheus text) from a real `floe serve` process over the Twilio
emulator, a summary line per cycle, and a cycle that fails when the token is revoked."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.test_twilio import source_config, start_twilio


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := check()) is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def health(port: int) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert answer.headers["content-type"] == "application/json"
    return answer.status_code, answer.json()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def test_healthz_and_metrics_answer_during_floe_serve_and_a_failing_cycle_says_503(emulator, tmp_path):
    server, sandbox = start_twilio(emulator, size=60, days=2)
    (tmp_path / "floe.yml").write_text(yaml.safe_dump({
        "sources": {"twilio": {**source_config(server, sandbox), "schedule": "1s", "streams": ["calls"]}},
        "destinations": {"warehouse": {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}},
        "serve": {"health_port": 0, "health_host": "127.0.0.1"}, "log_format": "json"}))
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "floe", "serve", "-c", str(tmp_path / "floe.yml"),
                                 "--backoff", "1", "--backoff-max", "1"], stderr=err, stdout=subprocess.DEVNULL)
    try:
        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]

        port = wait_for(lambda: next((e["port"] for e in lines() if e.get("event") == "serve_http"), None),
                        "the endpoint's port")
        code, body = wait_for(lambda: (h if (h := health(port))[1]["cycles"] >= 1 else None), "a first cycle")
        assert code == 200 and body["status"] == "ok", body
        assert body["last_cycle"]["rows"] > 0 and body["last_cycle"]["errors"] == []
        assert body["sources"]["twilio"]["failures"] == 0

        metrics = samples(port)
        calls = ("floe_rows_total", (("destination", "warehouse"), ("source", "twilio"), ("stream", "calls")))
        assert metrics[calls] > 0
        assert metrics[("floe_commits_total", calls[1])] >= 1
        assert metrics[("floe_last_success_timestamp_seconds", calls[1])] > time.time() - 120
        assert 0 <= metrics[("floe_lag_seconds", calls[1])] < 120
        assert metrics[("floe_http_requests_total", (("source", "twilio"),))] > 0
        assert ("floe_http_retries_total", (("source", "twilio"),)) in metrics
        assert metrics[("floe_up", ())] == 1 and metrics[("floe_cycles_total", ())] >= 1

        account = sandbox.accounts[source_config(server, sandbox)["account_sid"]]
        token, account.token = account.token, "revoked"
        code, body = wait_for(lambda: (h if (h := health(port))[0] == 503 else None), "a failed cycle")
        assert body["status"] == "failing" and body["sources"]["twilio"]["failures"] >= 1
        assert "401" in body["last_cycle"]["errors"][0] or "Authenticate" in body["last_cycle"]["errors"][0]
        failed = samples(port)
        assert failed[("floe_up", ())] == 0 and failed[("floe_cycle_failures_total", ())] >= 1
        assert failed[("floe_stream_failures_total", calls[1])] >= 1

        account.token = token  # the next cycle succeeds again
        wait_for(lambda: True if health(port)[0] == 200 else None, "a cycle that recovers")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    summaries = [e for e in lines() if e.get("event") == "serve_cycle"]
    assert {e["status"] for e in summaries} == {"ok", "failed"}
    assert all(isinstance(e["rows"], int) and isinstance(e["streams"], int) for e in summaries)
    assert not re.search(re.escape(token), log.read_text())
