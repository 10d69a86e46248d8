"""floe as a library: `floe.run` and `floe.sync` (see docs/python.md), for orchestrators (Airflow, Dagster).

Each call does what the command does (`floe run`, `floe sync`), from a config file or an already
parsed dict, and returns a result object instead of printing a table. A failure raises a FloeError:
`ConfigError` for a bad config (nothing ran), `RunFailed` / `SyncFailed` when some streams or syncs
failed (the others committed; the exception carries the whole result). Logging is left to the caller's
`logging` configuration (floe logs under the `floe` logger).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from floe.config import FloeConfig, interpolate, load_config, parse_config
from floe.core.errors import FloeError
from floe.core.stream import RunOptions
from floe.infra import startup

ConfigInput = str | Path | Mapping[str, Any] | FloeConfig
Names = str | Sequence[str] | None


@dataclass(frozen=True)
class StreamRun:
    """One stream loaded into one destination."""

    source: str
    stream: str
    destination: str
    rows: int
    commits: int
    seconds: float
    error: str | None = None
    schema_changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RunResult:
    """What a run did, one `StreamRun` per (source, stream, destination)."""

    streams: list[StreamRun]
    started: datetime
    finished: datetime

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.streams)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.streams)

    @property
    def commits(self) -> int:
        return sum(s.commits for s in self.streams)

    @property
    def errors(self) -> dict[str, str]:
        """`source.stream -> destination` of each failed stream, and its error."""
        return {f"{s.source}.{s.stream} -> {s.destination}": s.error for s in self.streams if s.error is not None}

    def stream(self, name: str, destination: str | None = None) -> StreamRun:
        """The result of `SOURCE.STREAM` (or `STREAM`), in `destination` when several were loaded."""
        found = [s for s in self.streams if name in (s.stream, f"{s.source}.{s.stream}")
                 and destination in (None, s.destination)]
        if len(found) != 1:
            raise KeyError(f"{name}{f' -> {destination}' if destination else ''}: "
                           f"{'not in this run' if not found else 'matches several; name SOURCE.STREAM and the destination'}")
        return found[0]


@dataclass(frozen=True)
class SyncRun:
    """One sync pushed to its target."""

    name: str
    target: str
    changed: int
    sent: int
    failed: int
    dry_run: bool
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class SyncResult:
    syncs: list[SyncRun]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.syncs)

    @property
    def errors(self) -> dict[str, str]:
        return {s.name: s.error for s in self.syncs if s.error is not None}


def failure(what: str, errors: dict[str, str], total: int) -> str:
    """`2 of 5 streams failed: twilio.calls -> warehouse: <its error>`."""
    name, error = next(iter(errors.items()))
    return f"{len(errors)} of {total} {what} failed: {name}: {error}"


class RunFailed(FloeError):
    """Some streams failed (the others committed); `result` holds every stream's outcome."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(failure("streams", result.errors, len(result.streams)))
        self.result = result


class SyncFailed(FloeError):
    """Some syncs failed; `result` holds every sync's outcome."""

    def __init__(self, result: SyncResult) -> None:
        super().__init__(failure("syncs", result.errors, len(result.syncs)))
        self.result = result


def as_config(config: ConfigInput) -> FloeConfig:
    """A FloeConfig from a path to floe.yml, a dict shaped like it (`${VAR}` interpolated), or a FloeConfig."""
    if isinstance(config, FloeConfig):
        return config
    if isinstance(config, str | Path):
        return load_config(Path(config))
    if isinstance(config, Mapping):
        return parse_config(interpolate(dict(config)))
    raise FloeError(f"config: a path to floe.yml or a dict, not {type(config).__name__}")


def names(value: Names) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def run(config: ConfigInput, streams: Names = None, destination: Names = None, *, sources: Names = None,
        full_refresh: bool = False, reprocess: bool = False, raise_on_failure: bool = True) -> RunResult:
    """Load the selected streams (`SOURCE.STREAM` or `STREAM`; all by default) into the selected
    destinations, as `floe run` does (syncs are `sync`'s). Raises `RunFailed` when a stream failed
    (unless `raise_on_failure=False`), `ConfigError` when the config or a selection is wrong."""
    from floe.engine import runner

    startup.use_system_allocator()
    cfg = as_config(config)
    started = datetime.now(UTC)
    results = runner.run(cfg, names(sources), names(streams), RunOptions(reprocess, full_refresh), None,
                         names(destination))
    if cfg.notify:
        from floe.apps.notify import notify_run

        notify_run(cfg, results, started)
    result = RunResult([StreamRun(r.source, r.stream, r.destination, r.rows, r.commits, r.seconds, r.error,
                                  list(r.schema_changes)) for r in results], started, datetime.now(UTC))
    if raise_on_failure and not result.ok:
        raise RunFailed(result)
    return result


def sync(config: ConfigInput, syncs: Names = None, *, dry_run: bool = False, full: bool = False,
         force: bool = False, raise_on_failure: bool = True) -> SyncResult:
    """Run the named syncs (all by default), as `floe sync` does. Raises `SyncFailed` when a sync
    failed (unless `raise_on_failure=False`); `force` as `floe sync --force` (deletes beyond `max_deletes`)."""
    from floe.apps.reverse.engine import run_syncs

    startup.use_system_allocator()
    cfg = as_config(config)
    results = asyncio.run(run_syncs(cfg, names(syncs), dry_run=dry_run, full=full, force=force))
    if cfg.notify:
        from floe.apps.notify import Notifier
        from floe.apps.reverse.outcomes import notify_failures

        notify_failures(Notifier(cfg.notify), results)
    result = SyncResult([SyncRun(r.name, r.target, r.changed, r.sent, r.failed, r.dry_run, r.error)
                         for r in results])
    if raise_on_failure and not result.ok:
        raise SyncFailed(result)
    return result
