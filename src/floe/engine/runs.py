"""A run's rows in the run log of each destination it loads into (see floe.core.runs).

`RunLog.started(destination)` writes the `running` row when the run first opens a destination, and
rewrites `failed` the rows of earlier runs on this host whose process died before finishing;
`finished(results, error)` rewrites every such row with the run's outcome there: `succeeded` when every
stream into that destination did, else `failed` with the first error. Both are best effort: a
destination that cannot take its row is logged and the run goes on (its loads report their own errors).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from floe.core.destination import Destination
from floe.core.runs import RunRecord, ended_without_finishing, who
from floe.core.secrets import redact
from floe.engine.pipeline import StreamResult
from floe.infra.threads import in_thread

log = logging.getLogger("floe.runs")


def floe_version() -> str:
    """The installed distribution's version (importing `floe` for it would be an import cycle)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("floehouse")
    except PackageNotFoundError:
        return "unknown"


class RunLog:
    """The run log rows of one run (`run_id`), made by `command` ("run", "serve")."""

    def __init__(self, run_id: str, command: str, sources: Sequence[str] = ()) -> None:
        self.run_id = run_id
        self.started_at = datetime.now(UTC)
        self.details: dict[str, Any] = {"command": command, "floe_version": floe_version(), **who(),
                                        "sources": list(sources)}
        self.destinations: dict[str, Destination] = {}

    async def started(self, destination: Destination) -> None:
        if destination.name not in self.destinations:
            self.destinations[destination.name] = destination
            await self._write(destination, RunRecord(self.run_id, destination.name, self.started_at,
                                                     details=self.details))
            await self._close_dead_runs(destination)

    async def finished(self, results: Sequence[StreamResult], error: str | None = None) -> list[RunRecord]:
        """Write the outcome into every destination the run started in; return the records."""
        records = []
        for name, destination in self.destinations.items():
            mine = [r for r in results if r.destination == name]
            failed = [r for r in mine if not r.ok]
            first = error or next((r.error for r in failed), None)
            record = RunRecord(self.run_id, name, self.started_at, datetime.now(UTC),
                               "failed" if first else "succeeded", len(mine), len(failed),
                               sum(r.rows for r in mine), sum(r.commits for r in mine),
                               redact(first)[:4000] if first else None,
                               {**self.details, **({"failed_streams": [f"{r.source}.{r.stream}" for r in failed]}
                                                   if failed else {})})
            await self._write(destination, record)
            records.append(record)
        return records

    async def _close_dead_runs(self, destination: Destination, look_back: int = 50) -> None:
        """Rewrite `failed` the last `look_back` runs' rows left `running` by a process of this host that died."""
        try:
            recent = await in_thread(destination.runs, look_back)
        except Exception as exc:  # noqa: BLE001 - bookkeeping never fails the run
            log.warning("event=run_log_failed run_id=%s destination=%s error=%s", self.run_id, destination.name,
                        redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        for run in recent:
            dead = ended_without_finishing(run) if run.run_id != self.run_id else None
            if dead is not None:
                log.warning("event=run_ended_without_finishing run_id=%s destination=%s pid=%s", run.run_id,
                            destination.name, run.details.get("pid"))
                await self._write(destination, dead)

    async def _write(self, destination: Destination, record: RunRecord) -> None:
        try:
            await in_thread(destination.record_run, record)
        except Exception as exc:  # noqa: BLE001 - bookkeeping never fails the run
            log.warning("event=run_log_failed run_id=%s destination=%s error=%s", self.run_id, destination.name,
                        redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)
