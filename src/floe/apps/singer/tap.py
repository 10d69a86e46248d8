"""floe as a Singer tap: any floe `Source` written as SCHEMA / RECORD / STATE / ACTIVATE_VERSION.

Streams run one after another. Per stream: SCHEMA first (again whenever a batch brings new or
retyped columns), RECORDs per batch, and STATE after the records each checkpoint covers, so a
consumer that saves the last STATE it saw never skips or repeats data. `replace` streams are
Singer full-table streams: their RECORDs carry a `version`, and ACTIVATE_VERSION follows the last
record, then their STATE. State is `{"bookmarks": {stream: floe state}}`; the bookmarks of streams
not run are passed through untouched. Metrics go to stderr as `INFO METRIC: {...}` lines.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

import orjson
import pyarrow as pa

from floe.apps.singer import messages
from floe.apps.singer.catalog import Selection
from floe.apps.singer.schema import arrow_to_json_schema
from floe.core.destination import is_json
from floe.core.errors import ConfigError
from floe.core.stream import Source, Stream, merge_ledger

log = logging.getLogger("floe.singer.tap")


def read_state(value: Any, where: str = "state") -> dict[str, Any]:
    """Singer state (`{"bookmarks": {...}}`) as a dict of stream -> floe state."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: Singer state is an object like {{\"bookmarks\": {{...}}}}")
    if "value" in value and "bookmarks" not in value and isinstance(value["value"], dict):
        value = value["value"]  # a STATE message saved whole
    bookmarks = value.get("bookmarks", {})
    if not isinstance(bookmarks, dict):
        raise ConfigError(f"{where}: bookmarks must be an object of stream names to states")
    return dict(bookmarks)


class MetricWriter:
    """Singer metric lines on stderr: `INFO METRIC: {"type": ..., "metric": ..., ...}`."""

    def __init__(self, err: IO[str] | None = None) -> None:
        self.err = err or sys.stderr

    def emit(self, kind: str, metric: str, value: float, tags: dict[str, Any]) -> None:
        line = orjson.dumps({"type": kind, "metric": metric, "value": value, "tags": tags}).decode()
        self.err.write(f"INFO METRIC: {line}\n")
        self.err.flush()


class SingerTap:
    def __init__(self, source: Source, out: IO[bytes], metrics: MetricWriter | None = None,
                 log_interval: float = 60.0) -> None:
        self.source = source
        self.out = out
        self.metrics = metrics or MetricWriter()
        self.log_interval = log_interval

    async def run(self, streams: list[Stream], state: dict[str, Any],
                  selection: dict[str, Selection] | None = None) -> dict[str, Any]:
        """Emit every stream of `streams` (those selected, if `selection` is given). Returns the final bookmarks."""
        bookmarks = dict(state)
        for stream in streams:
            chosen = selection.get(stream.name) if selection is not None else Selection(None)
            if chosen is None:
                continue
            start = None if chosen.replication_method == "FULL_TABLE" else bookmarks.get(stream.name)
            await self._run_stream(stream, start, chosen.fields, bookmarks)
        self.out.flush()
        return bookmarks

    async def _run_stream(self, stream: Stream, start: Any, fields: frozenset[str] | None,
                          bookmarks: dict[str, Any]) -> None:
        name = stream.name
        full_table = stream.disposition == "replace"
        version = int(time.time() * 1000) if full_table else None
        emitted: dict[str, pa.Field] = {f.name: f for f in stream.landed_schema if fields is None or f.name in fields}
        self._schema(stream, emitted)
        counted, last_log = 0, time.monotonic()
        started, status = time.monotonic(), "failed"
        http_before = sum(m.seconds for m in self.source.request_metrics())
        requests_before = sum(m.requests for m in self.source.request_metrics())
        pending_state: Any = None
        try:
            async for batch in stream.read(start):
                records = batch.records
                if records is not None and records.num_rows:
                    records = stream.protected(records)
                    if fields is not None:
                        records = records.select([n for n in records.schema.names if n in fields])
                    if self._widen(emitted, records.schema):
                        self._schema(stream, emitted)
                    messages.write_records(self.out, name, records, datetime.now(UTC), version)
                    counted += records.num_rows
                if batch.checkpoint is not None:
                    if full_table:
                        pending_state = merge_ledger(pending_state, batch.checkpoint)
                    else:
                        bookmarks[name] = merge_ledger(bookmarks.get(name), batch.checkpoint)  # entries add up
                        self.out.write(messages.state_message({"bookmarks": bookmarks}))
                        self.out.flush()
                if time.monotonic() - last_log >= self.log_interval:
                    self.metrics.emit("counter", "record_count", counted, {"endpoint": name})
                    counted, last_log = 0, time.monotonic()
            if full_table:
                assert version is not None
                self.out.write(messages.activate_version_message(name, version))
                if pending_state is not None:
                    bookmarks[name] = pending_state
                self.out.write(messages.state_message({"bookmarks": bookmarks}))
            self.out.flush()
            status = "succeeded"
        finally:
            self.metrics.emit("counter", "record_count", counted, {"endpoint": name})
            http = self.source.request_metrics()
            if http:
                self.metrics.emit(
                    "timer", "http_request_duration",
                    round(sum(m.seconds for m in http) - http_before, 6),
                    {"endpoint": name, "requests": sum(m.requests for m in http) - requests_before,
                     "status": status},
                )
            self.metrics.emit("timer", "job_duration", round(time.monotonic() - started, 6),
                              {"job_type": "sync", "endpoint": name, "status": status})

    def _schema(self, stream: Stream, fields: dict[str, pa.Field]) -> None:
        schema = arrow_to_json_schema(pa.schema(list(fields.values())))
        bookmark = [stream.cursor_field] if stream.cursor_field else None
        decimals = {f.name: (f.type.precision, f.type.scale) for f in fields.values() if pa.types.is_decimal(f.type)}
        extension = messages.Extension(stream.parent_key, stream.parent_markers, decimals)
        self.out.write(messages.schema_message(stream.name, schema, list(stream.primary_key), bookmark, extension))

    @staticmethod
    def _widen(emitted: dict[str, pa.Field], schema: pa.Schema) -> bool:
        """Fold a batch's columns into the emitted schema; True if the SCHEMA message must be resent."""
        changed = False
        for f in schema:
            known = emitted.get(f.name)
            if known is not None and (pa.types.is_null(f.type) or (
                known.type.equals(f.type) and is_json(known) == is_json(f) and (known.nullable or not f.nullable)
            )):
                continue
            emitted[f.name] = f
            changed = True
        return changed
