"""`floe serve`: keep every source loaded, forever.

Each cycle runs the sources that are due, then sleeps until the next one is. When a source is
due: `Source.next_due(states, now)` when the source knows (FullStory: the next window's end plus
`export_delay`), else its `schedule:` (an interval like `15m`/`6h`, or a cron expression), else
every hour. A source whose run failed is retried after an exponential backoff (`backoff_base`
doubling up to `backoff_max`) and reported through `notify:`; committed progress is never
touched, because every run resumes from the destination's state.

After a cycle that ran sources, the `syncs:` run (as after `floe run`; not when serve was limited
to some sources with `--source`); a failed sync is logged and reported through `notify:` and is
tried again after the next cycle's loads.

`stop()` (SIGTERM/SIGINT in the CLI) lets the load in progress finish and commit, then returns;
sources that watch `Context.should_stop` (FullStory) stop at their next commit point instead of working
through a whole backlog first.
The clock is injectable: tests pass a fake whose `sleep` advances time instantly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from croniter import croniter

from floe.apps.notify import Notice, Notifier, report
from floe.apps.serve_status import ServeStatus
from floe.config import FloeConfig
from floe.core.destination import Destination
from floe.core.errors import ConfigError
from floe.core.secrets import redact
from floe.core.stream import RequestMetrics
from floe.engine.factory import context_for, make_destination, make_source
from floe.engine.pipeline import StreamResult
from floe.engine.progress import Progress
from floe.engine.runner import run_source, select_streams
from floe.engine.runs import RunLog
from floe.infra.threads import in_thread

log = logging.getLogger("floe.serve")
DEFAULT_INTERVAL = timedelta(hours=1)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        """Sleep `seconds`, or less if `wake` is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=max(0.0, seconds))


def parse_schedule(text: str, where: str) -> Callable[[datetime], datetime]:
    """`15m`, `6h`, `1d`, `90s` (an interval) or a cron expression -> next run time after a given time."""
    value = text.strip()
    number, unit = value[:-1], value[-1:].lower()
    if number.isdigit() and unit in _UNITS:
        interval = timedelta(seconds=int(number) * _UNITS[unit])
        if interval.total_seconds() <= 0:
            raise ConfigError(f"{where}: {text!r} must be a positive interval")
        return lambda last: last + interval
    if not croniter.is_valid(value):
        raise ConfigError(f"{where}: {text!r} is neither an interval (15m, 6h, 1d) nor a cron expression")
    return lambda last: croniter(value, last).get_next(datetime)


@dataclass
class SourceSchedule:
    name: str
    schedule: Callable[[datetime], datetime] | None
    due: datetime  # the next time this source should run
    failures: int = 0
    last_error: str | None = None


@dataclass
class Cycle:
    """What one cycle did (kept in `Server.history` for tests and status output)."""

    at: datetime
    results: list[StreamResult]
    slept: float = 0.0
    syncs: list[Any] = field(default_factory=list)  # the cycle's SyncResults (floe.apps.reverse)


@dataclass
class Server:
    config: FloeConfig
    sources: list[str] | None = None
    clock: Clock = field(default_factory=SystemClock)
    backoff_base: float = 30.0
    backoff_max: float = 3600.0
    notifier: Notifier | None = None
    history: list[Cycle] = field(default_factory=list)
    status: ServeStatus = field(default_factory=ServeStatus)  # /healthz, /metrics, the per-cycle summary line

    def __post_init__(self) -> None:
        names = self.sources or list(self.config.sources)
        now = self.clock.now()
        self.schedules = {
            n: SourceSchedule(n, self.schedule_of(n), now) for n in names
        }
        self.notifier = self.notifier or Notifier(self.config.notify)
        self._stop = asyncio.Event()

    def schedule_of(self, name: str) -> Callable[[datetime], datetime] | None:
        """The source's own `schedule:`, else `serve.schedule`; None: every hour."""
        if own := self.config.source(name).schedule:
            return parse_schedule(own, f"sources.{name}.schedule")
        if default := self.config.serve.schedule:
            return parse_schedule(default, "serve.schedule")
        return None

    def stop(self) -> None:
        """Finish the load in progress, then return from `run`."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, max_cycles: int | None = None) -> None:
        self.status.started()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self._loop(max_cycles)
        finally:
            heartbeat.cancel()
            self.status.stopped()

    async def _heartbeat(self) -> None:
        """Tell the status the loop is alive while it is (a stuck loop stops ticking)."""
        while True:
            self.status.beat()
            await asyncio.sleep(5)

    async def _loop(self, max_cycles: int | None) -> None:
        cycles = 0
        while not self.stopping and (max_cycles is None or cycles < max_cycles):
            now = self.clock.now()
            due = [s for s in self.schedules.values() if s.due <= now]
            results: list[StreamResult] = []
            self.status.cycle_started(cycles + 1)
            for sched in due:
                if self.stopping:
                    break
                results += await self.run_source(sched)
            syncs = await self.run_syncs() if due and not self.stopping else []
            cycles += 1
            self.status.cycle_finished({s.name: {"due": s.due.isoformat(), "failures": s.failures,
                                                 "last_error": s.last_error} for s in self.schedules.values()})
            if self.stopping or (max_cycles is not None and cycles >= max_cycles):
                self.history.append(Cycle(now, results, syncs=syncs))
                break
            wake = min(s.due for s in self.schedules.values())
            seconds = max(0.0, (wake - self.clock.now()).total_seconds())
            self.history.append(Cycle(now, results, seconds, syncs))
            log.info("event=serve_sleep seconds=%.0f until=%s next=%s", seconds, wake.isoformat(),
                     ",".join(s.name for s in self.schedules.values() if s.due == wake))
            await self.clock.sleep(seconds, self._stop)
        log.info("event=serve_stopped cycles=%d", cycles)

    async def run_source(self, sched: SourceSchedule) -> list[StreamResult]:
        """Run every stream of one source into its destinations (one read for all, as `floe run`);
        then plan its next run."""
        started = self.clock.now()
        wall_started = datetime.now(UTC)
        context = context_for(self.config)
        context.clock = self.clock.now  # sources that decide what is ready use serve's clock
        context.should_stop = lambda: self.stopping  # long backlogs stop at a commit point
        results: list[StreamResult] = []
        destinations: dict[str, Destination] = {}
        states: dict[str, Any] = {}
        source = None
        history = RunLog(context.run_id, "serve", [sched.name])
        metrics: list[RequestMetrics] = []
        reported = False  # the status was told of the results
        error: str | None = None
        try:
            for dest_name in self.config.destinations_for(sched.name):
                destinations[dest_name] = make_destination(self.config, dest_name, context)
                await history.started(destinations[dest_name])
            source = make_source(self.config, sched.name, context)
            progress = Progress(self.config.progress_interval, tty=False)
            try:
                results = await run_source(source, select_streams(source, None), list(destinations.values()),
                                           self.config.stage, progress)
            finally:
                progress.close()
                metrics = list(source.request_metrics())
                await source.aclose()
            self.status.source_ran(sched.name, results, metrics)
            reported = True
            for result in results:  # when the source is due next: from its streams' states
                if not states.get(result.stream):
                    states[result.stream] = result.state or await in_thread(
                        destinations[result.destination].get_state, source.name, result.stream)
            failed = [r for r in results if not r.ok]
            self.plan_next(sched, source, states, started, failed[0].error if failed else None)
            if self.notifier is not None:
                report(self.notifier, results, destinations, wall_started)
        except Exception as exc:  # noqa: BLE001 - config/destination trouble: back off, keep serving
            error = redact(str(exc))
            log.error("event=serve_source_failed source=%s error=%s", sched.name, error)
            self.status.source_ran(sched.name, [] if reported else results, [] if reported else metrics, error)
            self.plan_next(sched, source, states, started, error)
            if self.notifier is not None:
                self.notifier.send(Notice("failed", sched.name, "*", "*", error, None,
                                          datetime.now(UTC).isoformat()))
        finally:
            await history.finished(results, error)
            for dest in destinations.values():
                dest.close()
        return results

    async def run_syncs(self) -> list[Any]:
        """Run every sync after a cycle's loads (as `floe run` does); failures are logged and notified."""
        if not self.config.syncs or self.sources is not None:
            return []
        from floe.apps.reverse.engine import run_syncs
        from floe.apps.reverse.outcomes import notify_failures

        results = await run_syncs(self.config)
        for r in results:
            if not r.ok:
                log.error("event=serve_sync_failed sync=%s error=%s", r.name, r.error)
        if self.notifier is not None:
            notify_failures(self.notifier, results)
        return results

    def plan_next(self, sched: SourceSchedule, source: Any, states: dict[str, Any], started: datetime,
                  error: str | None) -> None:
        now = self.clock.now()
        if error:
            sched.failures += 1
            sched.last_error = error
            delay = min(self.backoff_max, self.backoff_base * 2 ** (sched.failures - 1))
            sched.due = now + timedelta(seconds=delay)
            log.error("event=serve_backoff source=%s failures=%d retry_in=%.0fs error=%s", sched.name,
                      sched.failures, delay, error)
            return
        if sched.failures:
            log.info("event=serve_recovered source=%s after_failures=%d", sched.name, sched.failures)
        sched.failures, sched.last_error = 0, None
        due = source.next_due(states, now) if source is not None else None
        if due is None:
            due = sched.schedule(started) if sched.schedule else started + DEFAULT_INTERVAL
        sched.due = max(due, now)
