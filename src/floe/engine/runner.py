"""`floe run`: every selected source into each of its destinations, each stream on its own.

A source is read once for all of its destinations (`run_source`, see `pipeline`); each destination
keeps its own state, lease and commits, so destinations never block or corrupt each other. Streams
of a source run concurrently under `max_streams`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from floe.config import FloeConfig
from floe.core.destination import Destination
from floe.core.errors import ConfigError
from floe.core.stream import Context, RunOptions, Source, Stream
from floe.engine.factory import context_for, make_destination, make_source
from floe.engine.naming import named
from floe.engine.pipeline import StreamResult, describe, run_stream_into
from floe.engine.progress import Progress
from floe.engine.runs import RunLog
from floe.infra.logs import logfmt_value
from floe.infra.pii import source_salt, stream_policy, undeclared_keys

log = logging.getLogger("floe.runner")
MAX_STREAMS = 4  # streams of one source loaded at once


def select_streams(source: Source, names: Iterable[str] | None) -> list[Stream]:
    streams = source.streams()
    modes = source.config.pii_columns()
    salt = source_salt(source.name, source.config) if modes else None
    for stream in streams:
        stream.schema_changes, stream.widen_to_text = source.config.schema_policy(stream.name)
        stream.bad_rows, stream.bad_rows_max = source.config.row_policy(stream.name), source.config.bad_rows_max
    streams = [named(stream, source.name, source.config.naming) for stream in streams]
    # Only a `pii:` asks for the declared columns: a stream may build its schema (and import pyarrow) when first asked.
    columns = {s.name: s.schema.names for s in streams} if modes else {}
    for key in undeclared_keys(modes, columns, f"sources.{source.name}"):
        log.warning("event=pii_column_not_declared source=%s key=%s note=%s", source.name, key,
                    logfmt_value("no stream declares this column: it applies only if a batch brings one of that name"))
    for stream in streams:  # `pii:` names the columns as they land (after `naming`)
        protected = {*stream.primary_key, *stream.parent_key, *([stream.cursor_field] if stream.cursor_field else [])}
        policy = stream_policy(modes, salt, stream.name, protected, f"sources.{source.name}")
        if policy:
            stream.personal_data = policy
    if not names:
        return streams
    wanted = list(names)
    known = {s.name for s in streams}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError(
            f"--stream {', '.join(unknown)}: source {source.name} has streams {', '.join(sorted(known))}"
        )
    return [s for s in streams if s.name in wanted]


@dataclass
class RunPlan:
    sources: list[str]
    streams: list[str] | None = None  # as given to `--stream`: SOURCE.STREAM, or STREAM
    destinations: list[str] | None = None


def plan(config: FloeConfig, sources: list[str] | None, streams: list[str] | None,
         destinations: list[str] | None = None) -> RunPlan:
    names = sources or list(config.sources)
    for name in names:
        config.source(name)  # raises a ConfigError naming the unknown source
    for name in destinations or ():
        config.destination(name)
    if destinations:
        names = [n for n in names if set(config.destinations_for(n)) & set(destinations)]
        if not names:
            raise ConfigError(f"--destination {', '.join(destinations)}: no selected source loads into it")
    if not names:
        raise ConfigError("sources: nothing to run (no sources configured)")
    return RunPlan(names, streams, destinations)


async def resolve_streams(config: FloeConfig, run_plan: RunPlan, context: Context) -> dict[str, list[str]] | None:
    """The streams `--stream` selects, by source: `SOURCE.STREAM`, or `STREAM` when exactly one
    selected source has a stream of that name. None: every stream. Raises a ConfigError before
    anything loads when a name is unknown or ambiguous."""
    if not run_plan.streams:
        return None
    qualified = {value: value.partition(".") for value in run_plan.streams}
    named = {source for source, dot, _ in qualified.values() if dot and source in run_plan.sources}
    plain = [v for v, (source, dot, _) in qualified.items() if not (dot and source in run_plan.sources)]
    known: dict[str, list[str]] = {}
    for name in run_plan.sources if plain else sorted(named):
        source = make_source(config, name, context)
        try:
            known[name] = [s.name for s in source.streams()]
        finally:
            await source.aclose()
    chosen: dict[str, list[str]] = {}
    for value, (source_name, _, stream) in qualified.items():
        if value in plain:
            having = [name for name, streams in known.items() if value in streams]
            if len(having) > 1:
                raise ConfigError(f"--stream {value}: several sources have it; name one: "
                                  + " or ".join(f"{name}.{value}" for name in having))
            if not having:
                every = ", ".join(f"{name}.{s}" for name, streams in known.items() for s in sorted(streams))
                raise ConfigError(f"--stream {value}: no selected source has it (streams: {every})")
            source_name, stream = having[0], value
        elif stream not in known[source_name]:
            raise ConfigError(f"--stream {value}: source {source_name} has streams "
                              f"{', '.join(sorted(known[source_name]))}")
        chosen.setdefault(source_name, []).append(stream)
    return chosen


async def backfill_streams(config: FloeConfig, run_plan: RunPlan, selected: dict[str, list[str]] | None,
                           context: Context) -> dict[str, list[str]]:
    """The streams a backfill (`--from/--to`) re-reads, by source: of the selection, those that can
    (`Stream.range_column`). A stream named with `--stream` that cannot is a ConfigError, as is a
    selection with none that can; the others are left out with a notice. Checked before anything loads."""
    chosen: dict[str, list[str]] = {}
    refused: list[str] = []
    for name in run_plan.sources:
        if selected is not None and name not in selected:
            continue
        source = make_source(config, name, context)
        try:
            streams = select_streams(source, None if selected is None else selected[name])
        finally:
            await source.aclose()
        for stream in streams:
            if stream.range_column is not None:
                chosen.setdefault(name, []).append(stream.name)
            else:
                refused.append(f"{name}.{stream.name}")
    days = context.options.backfill
    why = ("re-reads a range of days only from the time-windowed sources (Twilio's calls, messages and "
           "recordings, Singular, FullStory) and SQL tables whose replication_key is a date or timestamp")
    if refused and selected is not None:
        raise ConfigError(f"--from/--to: {', '.join(refused)} cannot be backfilled: floe {why}; "
                          "run without --from/--to to load it, or --full-refresh to read it again whole")
    if not chosen:
        raise ConfigError(f"--from/--to: none of the selected streams can be backfilled ({', '.join(refused)}): "
                          f"floe {why}")
    if refused:
        log.info("event=backfill_skipped streams=%s range=%s reason=cannot_backfill", ",".join(refused), days)
    return chosen


async def run_source(
    source: Source,
    streams: list[Stream],
    destinations: list[Destination],
    stage: Path,
    progress: Progress | None = None,
    max_streams: int = MAX_STREAMS,
) -> list[StreamResult]:
    """Every stream of `source` into each of `destinations` (see `pipeline`: one read feeds every
    destination that is at the same state), streams concurrently, at most `max_streams` at a time.
    One result per (stream, destination); `floe run` and `floe serve` both run sources through here."""
    limit = asyncio.Semaphore(max_streams)

    async def one(stream: Stream) -> list[StreamResult]:
        async with limit:
            return await run_stream_into(source, stream, destinations, stage, progress)

    return [result for results in await asyncio.gather(*(one(s) for s in streams)) for result in results]


async def run_async(
    config: FloeConfig,
    run_plan: RunPlan,
    options: RunOptions | None = None,
    progress: Progress | None = None,
    max_streams: int = MAX_STREAMS,
) -> list[StreamResult]:
    context = context_for(config, options)
    selected = await resolve_streams(config, run_plan, context)
    if context.options.backfill is not None:
        if context.options.full_refresh:
            raise ConfigError("--from/--to and --full-refresh: choose one (a backfill re-reads only its days)")
        selected = await backfill_streams(config, run_plan, selected, context)
    destinations: dict[str, Destination] = {}
    results: list[StreamResult] = []
    history = RunLog(context.run_id, "run", run_plan.sources)
    error: str | None = None
    try:
        for source_name in run_plan.sources:
            if selected is not None and source_name not in selected:
                continue
            wanted = [name for name in config.destinations_for(source_name)
                      if not run_plan.destinations or name in run_plan.destinations]
            for dest_name in wanted:
                if dest_name not in destinations:
                    destinations[dest_name] = make_destination(config, dest_name, context)
                await history.started(destinations[dest_name])
            source = make_source(config, source_name, context)
            try:
                streams = select_streams(source, None if selected is None else selected[source_name])
                targets = [destinations[name] for name in wanted]
                results += await run_source(source, streams, targets, config.stage, progress, max_streams)
            finally:
                await source.aclose()
    except BaseException as exc:
        error = describe(exc)
        raise
    finally:
        await history.finished(results, error)
        for destination in destinations.values():
            destination.close()
        if progress:
            progress.close()
    return results


def run(
    config: FloeConfig,
    sources: list[str] | None = None,
    streams: list[str] | None = None,
    options: RunOptions | None = None,
    progress: Progress | None = None,
    destinations: list[str] | None = None,
) -> list[StreamResult]:
    """Run the selected sources, streams (`SOURCE.STREAM` or `STREAM`) and destinations; return one
    result per (source, stream, destination)."""
    return asyncio.run(run_async(config, plan(config, sources, streams, destinations), options, progress))
