"""Failure and recovery notifications (top-level `notify:`): a JSON POST to `webhook`, and/or an
SNS message to `sns_topic_arn` (boto3; region from `region` or the AWS environment).

A message is sent for every (source, stream, destination) whose run failed, once when a
stream that failed before loads successfully again, and once for the changes a run's commits made
to a stream's table (columns added or widened, variant columns: `schema_changes`). "Failed before" is read from the
destination's load log (`Destination.last_load_status`: the last entry written before this run), so recovery is known
across separate `floe run` invocations. Messages carry the source, stream, destination, the
(redacted) error and the last committed sync point, never a credential. Sending never raises:
a notification problem is logged and the run's own result stands.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from floe.config import NotifyConfig
from floe.core.destination import Destination, LoadJob, TableSpec
from floe.core.secrets import redact
from floe.destinations.schema_changes import Change
from floe.engine.pipeline import StreamResult

log = logging.getLogger("floe.notify")


@dataclass
class Notice:
    event: str  # "failed" | "recovered" | "schema_changed"
    source: str
    stream: str
    destination: str
    error: str | None
    last_sync_point: Any
    at: str
    schema_changes: list[dict[str, Any]] | None = None  # "schema_changed": what the run changed in the table

    @property
    def text(self) -> str:
        where = f"{self.source}.{self.stream} -> {self.destination}"
        if self.event == "schema_changed":
            return f"floe: {where} table changed: " + "; ".join(Change(**c).describe() for c in self.schema_changes or [])
        if self.event == "failed":
            return f"floe: {where} FAILED: {self.error} (last good sync point: {json.dumps(self.last_sync_point)})"
        return f"floe: {where} recovered (sync point: {json.dumps(self.last_sync_point)})"

    def payload(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.text}


class Notifier:
    """Sends notices to the configured channels; does nothing without a `notify:` section.

    Sending is bounded: a channel gets `timeout` seconds per message, and one that did not answer
    is skipped (the notice logged instead) for `pause` seconds, so ten failed streams and a dead
    webhook cost one timeout, not ten."""

    def __init__(self, config: NotifyConfig | None, timeout: float = 10.0, pause: float = 300.0) -> None:
        self.config = config
        self.timeout = timeout
        self.pause = pause
        self.sent: list[Notice] = []
        self._unreachable: dict[str, float] = {}  # channel -> when it last failed to answer (monotonic)

    def _reachable(self, channel: str, notice: Notice) -> bool:
        failed = self._unreachable.get(channel)
        if failed is None or time.monotonic() - failed >= self.pause:
            return True
        log.warning("event=notify_skipped channel=%s reason=unreachable_%.0fs_ago kind=%s source=%s stream=%s",
                    channel, time.monotonic() - failed, notice.event, notice.source, notice.stream)
        return False

    @property
    def enabled(self) -> bool:
        return bool(self.config and (self.config.webhook or self.config.sns_topic_arn))

    def send(self, notice: Notice) -> None:
        if not self.enabled or self.config is None:
            return
        body = json.loads(redact(json.dumps(notice.payload(), default=str)))
        if self.config.webhook and self._reachable("webhook", notice):
            try:
                response = httpx.post(self.config.webhook, json=body, timeout=self.timeout)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                if isinstance(exc, httpx.TransportError):
                    self._unreachable["webhook"] = time.monotonic()
                log.warning("event=notify_failed channel=webhook error=%s", redact(str(exc) or type(exc).__name__))
        if self.config.sns_topic_arn and self._reachable("sns", notice):
            import boto3
            from botocore.config import Config
            from botocore.exceptions import ConnectionError as NoAnswer
            from botocore.exceptions import ReadTimeoutError

            try:
                client = boto3.client("sns", region_name=self.config.region, config=Config(
                    connect_timeout=self.timeout, read_timeout=self.timeout,
                    retries={"max_attempts": 2, "mode": "standard"}))
                client.publish(TopicArn=self.config.sns_topic_arn, Subject=body["text"][:99],
                               Message=json.dumps(body))
            except Exception as exc:  # noqa: BLE001 - a notification must never fail the run
                if isinstance(exc, NoAnswer | ReadTimeoutError):  # connect failures and timeouts
                    self._unreachable["sns"] = time.monotonic()
                log.warning("event=notify_failed channel=sns error=%s", redact(str(exc)))
        self.sent.append(notice)
        log.info("event=notified kind=%s source=%s stream=%s destination=%s", notice.event, notice.source,
                 notice.stream, notice.destination)


def mark_recovered(destination: Destination, result: StreamResult, started: datetime) -> None:
    """Write a `recovered` load-log entry so that the next run does not report the recovery again."""
    import pyarrow as pa

    job = LoadJob(load_id=f"recovered-{started:%Y%m%dT%H%M%S}", source=result.source, stream=result.stream,
                  table=TableSpec(result.source, result.stream, pa.schema([])), files=[], checkpoint={},
                  started_at=datetime.now(UTC))
    try:
        destination.record_recovery(job)
    except Exception:  # noqa: BLE001 - bookkeeping only
        log.debug("could not record recovery", exc_info=True)


def report(
    notifier: Notifier, results: list[StreamResult], destinations: dict[str, Destination], started: datetime
) -> list[Notice]:
    """Send the notices for one run's results; `started` is when the run began (UTC)."""
    notices: list[Notice] = []
    if not notifier.enabled:
        return notices
    now = datetime.now(UTC).isoformat()
    for result in results:
        dest = destinations.get(result.destination)
        if dest is None:
            continue
        if result.schema_changes:  # committed: each change once, from the run that made it
            notice = Notice("schema_changed", result.source, result.stream, result.destination, None, result.state,
                            now, result.schema_changes)
            notifier.send(notice)
            notices.append(notice)
        try:
            before = dest.last_load_status(result.source, result.stream, started)
        except Exception:  # noqa: BLE001 - an unreadable load log: report what we know
            before = None
        if result.ok and before != "failed":
            continue
        try:
            state = dest.get_state(result.source, result.stream)
        except Exception:  # noqa: BLE001 - report what we know
            state = None
        notice = Notice("recovered" if result.ok else "failed", result.source, result.stream, result.destination,
                        redact(result.error) if result.error else None, state, now)
        notifier.send(notice)
        notices.append(notice)
        if result.ok:
            mark_recovered(dest, result, started)
    return notices


def notify_run(config: Any, results: list[StreamResult], started: datetime) -> list[Notice]:
    """For `floe run`: open each destination named in `results`, report, close."""
    notifier = Notifier(config.notify)
    if not notifier.enabled or not results:
        return []
    from floe.engine.factory import context_for, make_destination

    destinations: dict[str, Destination] = {}
    try:
        for name in {r.destination for r in results}:
            destinations[name] = make_destination(config, name, context_for(config))
        return report(notifier, results, destinations, started)
    finally:
        for dest in destinations.values():
            dest.close()
