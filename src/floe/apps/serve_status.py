"""What `floe serve` shows while it runs: `/healthz`, `/metrics` (Prometheus) and a summary line per cycle.

`ServeStatus` is told by the server what each source run and each cycle did; `StatusEndpoint` answers
HTTP on `serve.health_port` from its own thread, so it answers (503) even when the serve loop is stuck.

`/healthz`: 200 while the loop is alive (it ticks at least every `STALE_AFTER` seconds, and has not
ended) and the last cycle did not fail; otherwise 503. The body is JSON either way: status, cycles,
the last cycle's counts and errors, and each source's next run and failures.

`/metrics` (prometheus-client's text format), labels `source`, `stream`, `destination`:
`floe_rows_total`, `floe_commits_total`, `floe_stream_failures_total`, `floe_last_success_timestamp_seconds`,
`floe_lag_seconds` (seconds since the stream last loaded successfully), per source
`floe_http_requests_total` and `floe_http_retries_total`, and `floe_cycles_total`,
`floe_cycle_failures_total`, `floe_up`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from floe.core.secrets import redact
from floe.core.stream import RequestMetrics
from floe.engine.pipeline import StreamResult

log = logging.getLogger("floe.serve")
STALE_AFTER = 120.0  # seconds without a tick of the serve loop before /healthz says it is stuck
STREAM = ("source", "stream", "destination")


@dataclass
class CycleReport:
    """What one cycle did, for its summary line and /healthz."""

    number: int
    started_at: datetime
    finished_at: datetime | None = None
    sources: list[str] = field(default_factory=list)
    streams: int = 0
    failed: int = 0
    rows: int = 0
    commits: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {"cycle": self.number, "started_at": self.started_at.isoformat(),
                "finished_at": self.finished_at.isoformat() if self.finished_at else None, "sources": self.sources,
                "streams": self.streams, "failed": self.failed, "rows": self.rows, "commits": self.commits,
                "errors": self.errors}


class _Lag(Collector):
    """`floe_lag_seconds`, worked out when scraped: now minus each stream's last success."""

    def __init__(self, status: ServeStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily("floe_lag_seconds", "Seconds since the stream last loaded successfully.",
                                labels=list(STREAM))
        now = time.time()
        for labels, at in self.status.last_success.items():
            lag.add_metric(list(labels), max(0.0, now - at))
        yield lag


class ServeStatus:
    """The counters, gauges and health of one `floe serve`, fed by the server (thread-safe reads)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rows = Counter("floe_rows", "Rows committed.", STREAM, registry=r)
        self.commits = Counter("floe_commits", "Commits (each with its state).", STREAM, registry=r)
        self.failures = Counter("floe_stream_failures", "Stream runs that failed.", STREAM, registry=r)
        self.success = Gauge("floe_last_success_timestamp_seconds", "When the stream last loaded successfully "
                             "(Unix time).", STREAM, registry=r)
        self.requests = Counter("floe_http_requests", "HTTP requests sent, retries included.", ["source"], registry=r)
        self.retries = Counter("floe_http_retries", "HTTP requests retried.", ["source"], registry=r)
        self.cycles = Counter("floe_cycles", "Cycles of the serve loop.", registry=r)
        self.cycle_failures = Counter("floe_cycle_failures", "Cycles in which something failed.", registry=r)
        self.up = Gauge("floe_up", "1 while the serve loop is alive and its last cycle did not fail.", registry=r)
        self.last_success: dict[tuple[str, str, str], float] = {}
        r.register(_Lag(self))
        self.lock = threading.Lock()
        self.alive = False
        self.tick = time.monotonic()
        self.cycle_count = 0
        self.cycle: CycleReport | None = None  # the one under way
        self.last: CycleReport | None = None  # the last one finished
        self.schedules: dict[str, dict[str, Any]] = {}

    # --- fed by the server ------------------------------------------------------------------------
    def started(self) -> None:
        with self.lock:
            self.alive, self.tick = True, time.monotonic()

    def stopped(self) -> None:
        with self.lock:
            self.alive = False

    def beat(self) -> None:
        self.tick = time.monotonic()

    def cycle_started(self, number: int) -> None:
        with self.lock:
            self.cycle = CycleReport(number, datetime.now(UTC))
        self.beat()

    def source_ran(self, source: str, results: Sequence[StreamResult], metrics: Sequence[RequestMetrics],
                   error: str | None = None) -> None:
        """One source's run in the cycle: its streams' results (or the `error` that stopped it)."""
        now = time.time()
        for r in results:
            labels = (r.source, r.stream, r.destination)
            self.rows.labels(*labels).inc(r.rows)
            self.commits.labels(*labels).inc(r.commits)
            if r.ok:
                self.success.labels(*labels).set(now)
                self.last_success[labels] = now
            else:
                self.failures.labels(*labels).inc()
        self.requests.labels(source).inc(sum(m.requests for m in metrics))
        self.retries.labels(source).inc(sum(m.retries for m in metrics))
        with self.lock:
            if (cycle := self.cycle) is not None:
                cycle.sources.append(source)
                cycle.streams += len(results)
                cycle.failed += sum(not r.ok for r in results)
                cycle.rows += sum(r.rows for r in results)
                cycle.commits += sum(r.commits for r in results)
                cycle.errors += [f"{source}: {redact(error)}"] if error else [
                    f"{r.source}.{r.stream} -> {r.destination}: {r.error}" for r in results if not r.ok]
        self.beat()

    def cycle_finished(self, schedules: dict[str, dict[str, Any]]) -> CycleReport | None:
        """Close the cycle; log its summary line; `schedules`: each source's next run and failures."""
        with self.lock:
            cycle, self.cycle = self.cycle, None
            self.schedules = schedules
            if cycle is None:
                return None
            cycle.finished_at = datetime.now(UTC)
            self.last = cycle
        self.cycles.inc()
        self.cycle_count += 1
        if not cycle.ok:
            self.cycle_failures.inc()
        seconds = (cycle.finished_at - cycle.started_at).total_seconds()
        log.log(logging.INFO if cycle.ok else logging.ERROR,
                "event=serve_cycle cycle=%d status=%s sources=%d streams=%d failed=%d rows=%d commits=%d "
                "seconds=%.1f%s", cycle.number, "ok" if cycle.ok else "failed", len(cycle.sources), cycle.streams,
                cycle.failed, cycle.rows, cycle.commits, seconds,
                f" error={json.dumps(cycle.errors[0])}" if cycle.errors else "")
        self.beat()
        return cycle

    # --- read by the endpoint ------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the /healthz body)."""
        with self.lock:
            stale = time.monotonic() - self.tick > STALE_AFTER
            failed = self.last is not None and not self.last.ok
            healthy = self.alive and not stale and not failed
            status = ("ok" if healthy else "stopped" if not self.alive else "stuck" if stale else "failing")
            body = {"status": status, "cycles": self.cycle_count,
                    "last_cycle": self.last.as_json() if self.last else None,
                    "cycle_running": self.cycle.as_json() if self.cycle else None, "sources": self.schedules}
        self.up.set(1 if healthy else 0)
        return healthy, body

    def metrics(self) -> bytes:
        self.health()  # floe_up as of now
        return generate_latest(self.registry)


class StatusEndpoint:
    """`/healthz` and `/metrics` over HTTP, from a daemon thread, until `close()`."""

    def __init__(self, status: ServeStatus, host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    healthy, body = status.health()
                    self.answer(200 if healthy else 503, "application/json", json.dumps(body).encode())
                elif path == "/metrics":
                    self.answer(200, CONTENT_TYPE_LATEST, status.metrics())
                else:
                    self.answer(404, "text/plain", b"not found: try /healthz or /metrics\n")

            def answer(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: probes every few seconds
                pass

        self.http = ThreadingHTTPServer((host, port), Handler)
        self.http.daemon_threads = True
        self.port = int(self.http.server_address[1])
        self.thread = threading.Thread(target=self.http.serve_forever, name="floe-status", daemon=True)
        self.thread.start()
        log.info("event=serve_http host=%s port=%d paths=/healthz,/metrics", host, self.port)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(timeout=5)
