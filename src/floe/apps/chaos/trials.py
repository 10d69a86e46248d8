"""`floe chaos`: run the user's pipeline against emulators, kill it and fault it, compare with a clean run.

One experiment is a clean run (no faults, no kills) and `trials` chaos runs. Every run starts fresh
emulators (same seed, same clock: the same data) and fresh scratch destinations (see `scratch`), and
runs `floe run` in a child process. In a chaos run the emulators inject the chosen API faults, and
the child kills itself with SIGKILL at a named point (`floe.infra.killpoints`: after the Nth staged
batch, before or after the Nth commit), so a kill never depends on timing. The points are given
(`Options.kill_at`: one per run, in order) or drawn from a seeded RNG among the points the clean run
passed (the clean run traces them). After a kill `floe run` is started again (with the next point,
if any) until one finishes; a run that fails (too many faults in a row) is started again too.
Finally every table of every stream is compared with the clean run's (`compare`).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from floe.apps.chaos.compare import Difference, compare, read_rows
from floe.apps.chaos.scratch import (
    EMULATED_SOURCES,
    Clock,
    Plan,
    fill_sql_sources,
    start_emulators,
    trial_config,
)
from floe.config import FloeConfig, parse_config
from floe.core.errors import FloeError
from floe.engine.factory import context_for, make_destination, make_source
from floe.engine.runner import select_streams
from floe.infra import killpoints

FAULTS = {"429": "rate_429", "5xx": "rate_5xx", "truncate": "truncate_rate"}
FAULT_RATE = 0.05  # share of API requests given each chosen fault
MAX_FAILED_RUNS = 8  # failed (not killed) runs in a row before a trial gives up
HANG_FACTOR = 20  # a run taking this many times the clean run's duration (at least a minute) has hung


@dataclass
class Options:
    trials: int = 3
    faults: tuple[str, ...] = tuple(FAULTS)
    kill: bool = True
    kills: tuple[int, int] = (1, 2)  # kills per chaos run (drawn points): at least, at most
    kill_at: tuple[tuple[str, int], ...] = ()  # the kill points of every chaos run, in order (default: drawn)
    seed: int = 1
    keep: Path | None = None  # keep the scratch folder here (default: a temporary folder, removed)


@dataclass
class StreamReport:
    destination: str
    source: str
    stream: str
    trials: int = 0
    kills: int = 0
    faults: int = 0
    rows: int = 0
    duplicates: int = 0
    losses: int = 0
    changed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.losses or self.changed or self.notes)


@dataclass
class Report:
    streams: list[StreamReport]
    notes: list[str]  # what was not tested, or stood in for
    errors: list[str]  # runs that never completed

    @property
    def ok(self) -> bool:
        return not self.errors and all(s.ok for s in self.streams)


@dataclass
class RunOutcome:
    kills: int = 0
    failed_runs: int = 0
    error: str | None = None
    seconds: float = 0.0  # how long the run that completed took
    passed: Counter[str] = field(default_factory=Counter)  # kill points passed, over all its runs


Say = Callable[[str], None]


def experiment(config: FloeConfig, chosen: Plan, options: Options, say: Say = lambda _: None) -> Report:
    """Run the clean run and the chaos trials; compare every stream of every destination."""
    if not chosen.sources:
        raise FloeError("floe chaos: no source of the config can be tested (see the notes above): floe chaos "
                        f"emulates {', '.join(EMULATED_SOURCES)} sources (sql with --postgres-url)")
    unknown = [f for f in options.faults if f not in FAULTS]
    if unknown:
        raise FloeError(f"--faults {', '.join(unknown)}: known faults are {', '.join(FAULTS)}")
    folder = options.keep or Path(tempfile.mkdtemp(prefix="floe-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    clock, rng = Clock(), random.Random(options.seed)
    reports: dict[tuple[str, str, str], StreamReport] = {}
    errors: list[str] = []
    try:
        fill_sql_sources(chosen, clock, options.seed)
        say("clean run (no faults, no kills)")
        clean = _one_run(config, chosen, clock, folder / "clean", "clean", options, {}, None)
        if clean.outcome.error:
            raise FloeError(f"floe chaos: the clean run failed, so there is nothing to compare with: "
                            f"{clean.outcome.error}")
        rates = {FAULTS[f]: FAULT_RATE for f in options.faults}
        for n in range(1, options.trials + 1):
            points = list(options.kill_at) or (_draw_points(clean.outcome.passed, rng, options.kills)
                                               if options.kill else [])
            named = ", ".join(f"{p}:{c}" for p, c in points) or "none"
            say(f"trial {n}/{options.trials}: kills at {named}; faults {', '.join(options.faults) or 'none'}")
            trial = _one_run(config, chosen, clock, folder / f"trial{n}", f"t{n}", options, rates,
                             (points, clean.outcome.seconds))
            if trial.outcome.error:
                errors.append(f"trial {n}: {trial.outcome.error}")
                continue
            for where, difference in _differences(clean.tables, trial.tables).items():
                report = reports.setdefault(where, StreamReport(*where))
                report.trials += 1
                report.kills += trial.outcome.kills
                report.faults += trial.faults.get(where[1], 0)
                report.rows = difference.rows
                report.duplicates += difference.duplicates
                report.losses += difference.losses
                report.changed += difference.changed
                if difference.note:
                    report.notes.append(f"trial {n}: {difference.note}")
    finally:
        _drop_postgres_schemas(chosen)
        if options.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return Report(list(reports.values()), chosen.notes, errors)


@dataclass
class RunResult:
    outcome: RunOutcome
    tables: dict[tuple[str, str, str], Any]  # (destination, source, stream) -> (rows, key)
    faults: dict[str, int]  # source -> faults injected


def _draw_points(clean: Counter[str], rng: random.Random, kills: tuple[int, int]) -> list[tuple[str, int]]:
    """`kills` kill points among those the clean run passed: the first anywhere in a fresh run, each
    later one among what the runs before it left (roughly: the clean run's count less the points
    passed before)."""
    left = Counter(clean)
    points: list[tuple[str, int]] = []
    for _ in range(rng.randint(*kills)):
        kinds = [p for p in killpoints.POINTS if left[p] > 0]
        if not kinds:
            break
        kind = rng.choice(kinds)
        count = rng.randint(1, left[kind])
        points.append((kind, count))
        done = count / left[kind]  # the share of the work the killed run did, roughly
        for p in killpoints.POINTS:
            left[p] -= count if p == kind else round(left[p] * done)
    return points


def _one_run(config: FloeConfig, chosen: Plan, clock: Clock, folder: Path, trial: str, options: Options,
             rates: dict[str, float], kills: tuple[list[tuple[str, int]], float] | None) -> RunResult:
    """One clean or chaos run into fresh scratch copies; the rows of every stream afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    emulators = start_emulators(chosen, clock, options.seed, rates)
    try:
        entries = trial_config(chosen, emulators, clock, folder, trial, options.seed)
        path = folder / "floe.yml"
        path.write_text(yaml.safe_dump(entries, sort_keys=False))
        outcome = _run_until_done(path, folder, kills)
        faults = {name: emulators.faults(name) for name in chosen.sources}
    finally:
        emulators.stop()
    tables = _read_tables(parse_config(entries, path), config) if outcome.error is None else {}
    return RunResult(outcome, tables, faults)


def _run_until_done(path: Path, folder: Path, kills: tuple[list[tuple[str, int]], float] | None) -> RunOutcome:
    """`floe run -c path` in child processes, each killing itself at the next of `kills[0]`'s points
    (a run that fails first keeps its point for the next), until one exits 0. `kills[1]`: the clean
    run's seconds, which set the time after which a run counts as hung."""
    outcome = RunOutcome()
    points, seconds = (list(kills[0]), kills[1]) if kills else ([], 0.0)
    timeout = max(60.0, HANG_FACTOR * seconds) if kills else None
    attempt = 0
    while True:
        attempt += 1
        log, trace = folder / f"run{attempt}.log", folder / f"run{attempt}.trace"
        env = {k: v for k, v in os.environ.items() if k != killpoints.KILL_AT} | {killpoints.TRACE: str(trace)}
        if points:
            env[killpoints.KILL_AT] = "{}:{}".format(*points[0])
        started = time.monotonic()
        with log.open("wb") as out:
            child = subprocess.Popen([sys.executable, "-m", "floe", "run", "-c", str(path)],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                child.wait()
                outcome.error = f"floe run did not finish within {timeout or 0:.0f}s (log: {log})"
                return outcome
        if trace.exists():
            outcome.passed.update(trace.read_text().split())
        if code == -signal.SIGKILL and points:
            outcome.kills += 1
            points.pop(0)
            continue
        if code == 0:
            outcome.seconds = time.monotonic() - started
            return outcome
        outcome.failed_runs += 1
        if kills is None or outcome.failed_runs >= MAX_FAILED_RUNS:  # a clean run has one go
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            outcome.error = f"floe run failed {outcome.failed_runs} times; the last: {tail[0]} (log: {log})"
            return outcome


def _read_tables(scratch: FloeConfig, user: FloeConfig) -> dict[tuple[str, str, str], Any]:
    """(rows, key) of every stream of every source in every scratch destination."""
    context = context_for(scratch, None)
    tables: dict[tuple[str, str, str], Any] = {}
    streams = {}
    for name in scratch.sources:
        source = make_source(scratch, name, context)
        try:
            streams[name] = select_streams(source, None)
        finally:
            asyncio.run(source.aclose())
    for dest_name in scratch.destinations:
        destination = make_destination(scratch, dest_name, context)
        try:
            for source_name, source_streams in streams.items():
                if dest_name not in user.destinations_for(source_name):
                    continue
                for stream in source_streams:
                    key = stream.primary_key if stream.current_view is None else ()
                    tables[(dest_name, source_name, stream.name)] = (
                        read_rows(destination, source_name, stream), key)
        finally:
            destination.close()
    return tables


def _differences(clean: dict[tuple[str, str, str], Any],
                 chaos: dict[tuple[str, str, str], Any]) -> dict[tuple[str, str, str], Difference]:
    return {where: compare(rows, chaos.get(where, (None, key))[0], key) for where, (rows, key) in clean.items()}


def _drop_postgres_schemas(chosen: Plan) -> None:
    """Drop every scratch schema of the experiment on the PostgreSQL server (they all share its token)."""
    if not chosen.postgres_url or not (any(chosen.scratch_kind(n) == "postgres" for n in chosen.destinations)
                                       or any(s.type == "sql" for s in chosen.sources.values())):
        return
    from floe.destinations.sql import SqlDestination

    server = parse_config({"destinations": {"server": {"type": "postgres", "url": chosen.postgres_url}}})
    destination = make_destination(server, "server", context_for(server))
    try:
        assert isinstance(destination, SqlDestination)
        with destination.transaction() as cur:
            cur.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"floe_chaos_{chosen.token}_%",))
            for (schema,) in cur.fetchall():
                cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        destination.close()
