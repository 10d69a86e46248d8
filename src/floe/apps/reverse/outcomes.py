"""What one sync run produced: its result (counts for the summary and `_floe_loads.details`) and
the outcomes it stages for the warehouse (accepted rows, failures, cleared keys) until they are committed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from floe.apps.notify import Notice, Notifier
from floe.apps.reverse import store
from floe.core.destination import LoadJob, StagedFile
from floe.core.errors import FloeError
from floe.core.secrets import redact
from floe.infra.stage import StageWriter, stage_dir

FLUSH_ROWS = 50_000  # accepted rows buffered before they are written to the stage file


class SyncError(FloeError):
    """A sync could not run (mapping, warehouse query, Pendo refused it)."""


@dataclass
class SyncResult:
    name: str
    target: str
    changed: int = 0  # rows the diff selected
    sent: int = 0  # rows in requests Pendo answered (each row once, however often it was split)
    updated: int = 0  # Pendo's own `updated` count
    missing: int = 0
    errors: int = 0
    requests: int = 0
    retries: int = 0
    splits: int = 0  # 408 answers that split a request
    seconds: float = 0.0
    error: str | None = None
    dry_run: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a field whose type Pendo did not give
    fresh: int = 0  # changed rows that were not already failing before this run
    clears: bool = False  # the sync has `deletes: clear`
    gone: int = 0  # keys synced before that the rows no longer hold
    cleared: int = 0  # of those, keys whose fields Pendo cleared (or no longer knows)
    clear_errors: int = 0  # clears Pendo rejected (retried next run)
    gone_keys: list[str] = field(default_factory=list)  # a dry run's list of keys it would clear

    @property
    def failed(self) -> int:
        return self.missing + self.errors + self.clear_errors

    @property
    def ok(self) -> bool:
        return self.error is None

    def details(self) -> dict[str, Any]:
        return {"changed": self.changed, "sent": self.sent, "updated": self.updated, "missing": self.missing,
                "errors": self.errors, "failed": self.failed, "requests": self.requests,
                "retries": self.retries, "splits_408": self.splits,
                **({"gone": self.gone, "cleared": self.cleared, "clear_errors": self.clear_errors}
                   if self.clears else {})}


@dataclass(frozen=True)
class SyncLoad(LoadJob):
    """The `_floe_loads` row of a sync run: `rows` = rows Pendo accepted over all its commits."""

    accepted: int = 0

    @property
    def rows(self) -> int:
        return self.accepted


@dataclass
class Piece:
    """One request's worth of rows: payload records and, in the same order, their snapshot columns
    (`key`, `hash`, `sent`, `load_ids`; a clear's rows hold `key` only)."""

    records: list[dict[str, Any]]
    rows: pa.RecordBatch
    clear: bool = False

    @property
    def keys(self) -> pa.Array:
        return self.rows.column("key")

    def split(self) -> tuple[Piece, Piece]:
        h = len(self.records) // 2
        return (Piece(self.records[:h], self.rows.slice(0, h), self.clear),
                Piece(self.records[h:], self.rows.slice(h), self.clear))


class RunOutcomes:
    """Collects accepted rows (snapshot) and failures (stage files) of one run."""

    def __init__(self, stage: Path, sync: str, load_id: str) -> None:
        self.sync = sync
        today = datetime.now(UTC)
        self.accepted = StageWriter(stage_dir(stage, store.SYNC_SOURCE, sync, today), load_id)
        self.failures = StageWriter(stage_dir(stage, store.SYNC_SOURCE, f"{sync}__failures", today), load_id)
        self.cleared = StageWriter(stage_dir(stage, store.SYNC_SOURCE, f"{sync}__gone", today), load_id)
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.pending = 0  # accepted rows not yet committed
        self.committed = 0

    def accept(self, rows: pa.RecordBatch) -> None:
        """Rows (`key`, `hash`, `sent`, `load_ids`) Pendo accepted just now."""
        n = rows.num_rows
        if not n:
            return
        sync = pa.array([self.sync] * n, pa.string())
        sent_at = pa.array([int(time.time() * 1000)] * n, pa.int64())
        columns = [sync, rows.column("key"), rows.column("hash"), rows.column("sent"), sent_at,
                   rows.column("load_ids")]
        self._buffer.append(pa.RecordBatch.from_arrays(columns, schema=store.SNAPSHOT_SCHEMA))
        self._buffered += n
        self.pending += n
        if self._buffered >= FLUSH_ROWS:
            self._flush()

    def gone(self, keys: pa.Array) -> None:
        """Keys whose fields Pendo cleared: they leave the snapshot at the next commit."""
        if len(keys):
            self.cleared.write(pa.RecordBatch.from_arrays(
                [pa.array([self.sync] * len(keys), pa.string()), keys], schema=store.GONE_SCHEMA))
        self.pending += len(keys)

    def fail(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            keys, outcomes, messages = zip(*rows, strict=True)
            self.failures.write(pa.RecordBatch.from_arrays(
                [pa.array([self.sync] * len(rows)), pa.array(keys), pa.array(outcomes), pa.array(messages)],
                schema=store.FAILURES_SCHEMA))

    def _flush(self) -> None:
        if self._buffer:
            self.accepted.write(pa.Table.from_batches(self._buffer).combine_chunks().to_batches()[0])
        self._buffer, self._buffered = [], 0

    def files(self) -> tuple[list[StagedFile], list[StagedFile], list[StagedFile]]:
        """Every staged file not yet handed over: accepted, failed, cleared (then counted as
        committed by the caller)."""
        self._flush()
        self.committed, self.pending = self.committed + self.pending, 0
        return self.accepted.flush(), self.failures.flush(), self.cleared.flush()

    def abort(self) -> None:
        self._buffer = []
        self.accepted.abort()
        self.failures.abort()
        self.cleared.abort()


def notify_failures(notifier: Notifier, results: list[SyncResult]) -> None:
    """Send a `failed` notice for every sync that failed or had rows rejected (dry runs never)."""
    if not notifier.enabled:
        return
    now = datetime.now(UTC).isoformat()
    for r in results:
        if r.dry_run or (r.ok and not r.failed):
            continue
        error = r.error or (f"{r.failed} rows rejected by Pendo ({r.missing} missing, {r.errors} errors); "
                            "see _floe_sync_failures, they are retried on the next run")
        notifier.send(Notice("failed", store.SYNC_SOURCE, r.name, r.target, redact(error), r.details(), now))
