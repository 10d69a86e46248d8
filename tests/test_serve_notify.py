"""`floe serve` (with an injected clock) and failure/recovery notifications, against the FullStory emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from floe.apps.serve import Server, parse_schedule
from floe.config import load_config
from floe.core.errors import ConfigError
from floe.sandbox.fullstory import DEFAULT_API_KEY
from tests.fixtures.fullstory import emulator

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class FakeClock:
    """Time stands still until `sleep`, which advances it at once and runs the hooks due by then."""

    def __init__(self, now: datetime) -> None:
        self.t = now
        self.sleeps: list[float] = []
        self.hooks: list[Callable[[int], None]] = []

    def now(self) -> datetime:
        return self.t

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        self.sleeps.append(seconds)
        self.t += timedelta(seconds=seconds)
        for hook in self.hooks:
            hook(len(self.sleeps))
        await asyncio.sleep(0)


def rows(db: Path) -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM fs.events").fetchone()[0]  # type: ignore[index]
    finally:
        con.close()


def serve_config(fullstory_config: Any, **extra: Any) -> Any:
    return load_config(fullstory_config(end_time=None, export_delay="1h", **extra))


def test_serve_catches_up_then_sleeps_until_each_window_end_plus_delay(
    fullstory_config: Any, tmp_path: Path
) -> None:
    clock = FakeClock(T0 + timedelta(hours=3, minutes=30))
    server = Server(serve_config(fullstory_config), clock=clock)
    asyncio.run(server.run(max_cycles=4))
    # 03:30: windows ending by 02:30 are ready (00-01, 01-02). The next (02-03) is due at 03:00 + 1h.
    assert clock.sleeps == [1800, 3600, 3600]
    assert [sum(r.commits for r in c.results) for c in server.history] == [2, 1, 1, 1]
    assert rows(tmp_path / "w.duckdb") == 5 * 600
    assert [r.state for r in server.history[-1].results] == [{"sync_point": "2024-01-01T05:00:00Z"}]


def test_failures_back_off_exponentially_notify_and_recover_without_losing_progress(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    faults = emulator(fullstory_server).faults
    clock = FakeClock(T0 + timedelta(hours=3, minutes=30))
    # After the first sleep every export fails; after the third sleep FullStory is healthy again.
    clock.hooks.append(lambda n: setattr(faults, "fail_operations", 1000 if n < 3 else 0))
    config = serve_config(fullstory_config, export_attempts=1, notify={"webhook": url})
    server = Server(config, clock=clock, backoff_base=30)
    asyncio.run(server.run(max_cycles=4))
    assert clock.sleeps == [1800, 30, 60]  # window due, then backoff 30 s, 60 s
    assert [all(r.ok for r in c.results) for c in server.history] == [True, False, False, True]
    assert rows(tmp_path / "w.duckdb") == 3 * 600  # 00-02 before the failures, 02-03 on recovery
    assert [m["event"] for m in received] == ["failed", "failed", "recovered"]
    failed = received[0]
    assert (failed["source"], failed["stream"], failed["destination"]) == ("fs", "events", "w")
    assert "FAILED" in failed["error"] and "2024-01-01T02:00:00Z..2024-01-01T03:00:00Z" in failed["error"]
    assert failed["last_sync_point"] == {"sync_point": "2024-01-01T02:00:00Z"}
    assert received[2]["last_sync_point"] == {"sync_point": "2024-01-01T03:00:00Z"}
    assert all(DEFAULT_API_KEY not in str(m) for m in received)


def test_floe_run_notifies_failure_then_recovery_once(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    config = fullstory_config(export_attempts=1, notify={"webhook": url})
    cli = [sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(config)]
    emulator(fullstory_server).faults.fail_operations = 1000
    assert subprocess.run(cli, capture_output=True, cwd=tmp_path, timeout=60).returncode == 1
    assert [m["event"] for m in received] == ["failed"] and received[0]["last_sync_point"] is None
    emulator(fullstory_server).faults.fail_operations = 0
    assert subprocess.run(cli, capture_output=True, cwd=tmp_path, timeout=60).returncode == 0
    assert subprocess.run(cli, capture_output=True, cwd=tmp_path, timeout=60).returncode == 0
    assert [m["event"] for m in received] == ["failed", "recovered"]  # the third run had nothing to report
    assert received[1]["last_sync_point"] == {"sync_point": "2024-01-01T06:00:00Z"}


def test_sigterm_lets_the_current_load_commit_then_exits_zero(
    fullstory_server: Any, fullstory_config: Any, tmp_path: Path
) -> None:
    emu = emulator(fullstory_server)
    emu.processing_seconds = 0.3  # each export takes a moment, so SIGTERM lands mid-load
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    config = fullstory_config(start_time=start.isoformat(), end_time=None, export_delay="1h", prefetch=1)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", "from floe.cli import main; main()", "serve", "-c", str(config)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    created = len(emu.created)
    deadline = time.monotonic() + 30
    while len(emu.created) == created and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    # The window in progress was committed whole; serve stopped there instead of working through the backlog.
    loaded = rows(tmp_path / "w.duckdb")
    assert loaded >= 600 and loaded % 600 == 0
    log_text = (tmp_path / "serve.log").read_text()
    assert "event=fullstory_stopping" in log_text and "event=serve_stopped" in log_text
    # A later run picks up exactly where it stopped.
    assert subprocess.run([sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(config)],
                          cwd=tmp_path, capture_output=True, timeout=60).returncode == 0
    con = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    try:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT (IndvId, EventStart)) FROM fs.events").fetchone()  # type: ignore[misc]
    finally:
        con.close()
    assert total == distinct >= 4 * 600


@pytest.mark.parametrize(("text", "after", "expected"), [
    ("15m", T0, T0 + timedelta(minutes=15)),
    ("6h", T0, T0 + timedelta(hours=6)),
    ("0 2 * * *", T0 + timedelta(hours=5), T0 + timedelta(days=1, hours=2)),
])
def test_schedules_are_intervals_or_cron(text: str, after: datetime, expected: datetime) -> None:
    assert parse_schedule(text, "sources.x.schedule")(after) == expected


def test_a_bad_schedule_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="sources.x.schedule: 'every tuesday'"):
        parse_schedule("every tuesday", "sources.x.schedule")


def test_sns_topic_receives_the_failure_message(
    s3_server: Any, fullstory_server: Any, fullstory_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SNS through boto3 against moto's server (the same local AWS endpoint the S3 tests use)."""
    import json

    import boto3

    from floe.apps.notify import notify_run
    from floe.engine import runner

    for var, value in (("AWS_ENDPOINT_URL", s3_server.endpoint_url), ("AWS_ACCESS_KEY_ID", s3_server.access_key_id),
                       ("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)):
        monkeypatch.setenv(var, value)
    sns, sqs = boto3.client("sns", region_name="us-east-1"), boto3.client("sqs", region_name="us-east-1")
    topic = sns.create_topic(Name="floe-alerts")["TopicArn"]
    queue = sqs.create_queue(QueueName="floe-alerts")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)

    emulator(fullstory_server).faults.fail_operations = 1000
    config = load_config(fullstory_config(export_attempts=1, notify={"sns_topic_arn": topic, "region": "us-east-1"}))
    started = datetime.now(UTC)
    results = runner.run(config)
    assert [n.event for n in notify_run(config, results, started)] == ["failed"]
    messages = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2).get("Messages", [])
    payload = json.loads(json.loads(messages[0]["Body"])["Message"])
    assert (payload["event"], payload["source"], payload["stream"]) == ("failed", "fs", "events")
    assert "export FAILED" in payload["error"] and DEFAULT_API_KEY not in messages[0]["Body"]


def test_a_source_with_nothing_due_of_its_own_runs_on_its_schedule(fullstory_config: Any, tmp_path: Path) -> None:
    # With end_time reached, FullStory has no next window: the `schedule:` key decides.
    config = load_config(fullstory_config(end_time="2024-01-01T02:00:00Z", schedule="15m"))
    clock = FakeClock(T0 + timedelta(days=2))
    server = Server(config, clock=clock)
    asyncio.run(server.run(max_cycles=3))
    assert clock.sleeps == [900, 900]
    assert [sum(r.commits for r in c.results) for c in server.history] == [2, 0, 0]
    assert rows(tmp_path / "w.duckdb") == 2 * 600


def test_a_source_failing_before_any_stream_starts_backs_off_and_keeps_serving(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    # A SQL source lists its tables when asked for streams: with its database down that fails
    # before any stream runs. serve reports it, backs off, and keeps going.
    url, received = webhook
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump({
        "sources": {"db": {"type": "sql", "url": "postgresql://reader:hunter2-secret@127.0.0.1:1/app",
                           "schedule": "15m"}},
        "destinations": {"w": {"type": "duckdb", "path": "w.duckdb"}},
        "stage": "stage",
        "notify": {"webhook": url},
    }))
    clock = FakeClock(T0)
    server = Server(load_config(path), clock=clock, backoff_base=30)
    asyncio.run(server.run(max_cycles=3))
    assert clock.sleeps == [30, 60]
    assert server.schedules["db"].failures == 3 and server.history[-1].results == []
    assert [(m["event"], m["source"], m["stream"]) for m in received] == [("failed", "db", "*")] * 3
    assert "127.0.0.1" in received[0]["error"]
    assert all("hunter2-secret" not in str(m) for m in received)
    assert "hunter2-secret" not in (server.schedules["db"].last_error or "")


def sigterm_caught(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Linux: the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.parametrize(("command", "code"), [("serve", 0), ("run", -signal.SIGTERM)])
def test_sigterm_while_floe_starts_stops_serve_cleanly_and_kills_other_commands(
    fullstory_config: Any, tmp_path: Path, command: str, code: int
) -> None:
    config = fullstory_config()
    proc = subprocess.Popen([sys.executable, "-m", "floe", command, "-c", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not sigterm_caught(proc.pid) and time.monotonic() < deadline:  # the very first line of floe
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGTERM)  # floe is still importing its command line
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    if command == "serve":
        assert "floe serve: stopped" in stderr and "event=serve_stopped cycles=0" in stderr
    assert not (tmp_path / "w.duckdb").exists()  # nothing was loaded
