"""The run log: one row per run of floe in each destination it loaded into (`_floe_runs`).

A run (`floe run`, or one source's turn in a `floe serve` cycle) gets a run id when it starts; every
`_floe_loads` row it writes carries that id, and each destination it loads into keeps one `RunRecord`
for it: `running` while it goes, then `succeeded` or `failed` with its counts. A run that found
nothing new still has its row (0 rows, 0 commits). A row left `running` by a process that died (killed,
out of memory, machine lost) is found by `ended_without_finishing` and rewritten `failed` by the next run
on the same host; `floe runs` shows it `failed` at once.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from floe.core.leases import process_started

RunStatus = Literal["running", "succeeded", "failed"]
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_run_id(now_ms: int | None = None) -> str:
    """A ULID: 26 characters, 48 bits of milliseconds then 80 random bits (sorts by start time)."""
    value = ((time.time_ns() // 1_000_000 if now_ms is None else now_ms) << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


@dataclass
class RunRecord:
    """One run as one destination's run log keeps it."""

    run_id: str
    destination: str
    started_at: datetime
    finished_at: datetime | None = None
    status: RunStatus = "running"
    streams: int = 0  # the (source, stream) pairs the run loaded into this destination
    failed: int = 0  # of which failed
    rows: int = 0
    commits: int = 0
    error: str | None = None  # the first failure's error
    details: dict[str, Any] = field(default_factory=dict)  # command, host, pid, floe version, sources

    @property
    def seconds(self) -> float | None:
        return (self.finished_at - self.started_at).total_seconds() if self.finished_at else None

    def as_json(self) -> dict[str, Any]:
        """The record as JSON-ready values (timestamps in ISO 8601)."""
        return {"run_id": self.run_id, "destination": self.destination, "started_at": self.started_at.isoformat(),
                "finished_at": self.finished_at.isoformat() if self.finished_at else None, "status": self.status,
                "streams": self.streams, "failed": self.failed, "rows": self.rows, "commits": self.commits,
                "seconds": self.seconds, "error": self.error, "details": self.details}


def who() -> dict[str, Any]:
    """Where a run ran: host and pid."""
    return {"host": os.uname().nodename, "pid": os.getpid()}


def ended_without_finishing(run: RunRecord) -> RunRecord | None:
    """`run` rewritten `failed` if it is `running` but its process on this host is gone (or its pid now
    belongs to a process started after the run: the pid was reused); else None. A run of another host
    cannot be judged from here and stays as it is."""
    host, pid = run.details.get("host"), run.details.get("pid")
    if run.status != "running" or host != os.uname().nodename or not isinstance(pid, int):
        return None
    started = process_started(pid)
    if started is not None and started <= run.started_at + timedelta(seconds=1):
        return None  # still running (the 1 s allows for /proc's clock ticks)
    return replace(run, status="failed", error=f"the run ended without finishing: its process (pid {pid} on "
                                               f"{host}) is gone (killed or crashed); see its _floe_loads rows "
                                               f"for what it committed")
