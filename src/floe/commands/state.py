"""`floe state show | log | revert | reset`: a stream's state, its versions, and setting it back.

Every command that changes state takes the stream's lease in the destination first and refuses
(one line naming the holder, exit 1) while a run holds it; the change itself is one commit of the
destination (`Destination.change_state`), written on top of the version the command showed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from floe.commands._output import ConfigOption, console, fail, open_config
from floe.core.errors import ConfigError, FloeError

if TYPE_CHECKING:  # the rest is imported where used: `floe --help` need not load the engine
    from floe.config import FloeConfig
    from floe.core.destination import Destination, StateVersion, TableSpec
    from floe.core.leases import Lease

state_app = typer.Typer(help="See, revert and reset stream state.", no_args_is_help=True)

StreamArgument = Annotated[str, typer.Argument(metavar="SOURCE.STREAM", help="The stream, e.g. fs.events.")]
DestinationOption = Annotated[str | None, typer.Option("--destination", "-d", help="Only this destination.")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Go ahead without asking.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Say what would change; change nothing.")]
# What revert cannot give back, by the stream's write disposition.
CAVEATS = {
    "merge": "rows that loads after version {to} overwrote or deleted are not restored: their keys are missing "
             "until the next run reads those records again (with their current values)",
    "replace": "each load of a replace stream replaces the whole table: the rows of version {to}'s load are "
               "gone, so the table holds no rows of it until the next run loads the stream again",
}


@state_app.command("show")
def state_show(
    config: ConfigOption = None,
    destination: DestinationOption = None,
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    as_json: JsonOption = False,
    singer: Annotated[bool, typer.Option("--singer", help="Print one source's state as Singer state "
                                         "({\"bookmarks\": ...}, what `floe tap SOURCE --state` reads).")] = False,
) -> None:
    """The latest state of every stream, per destination (a table; JSON with --json)."""
    from floe.engine.factory import context_for, make_destination

    try:
        cfg = open_config(config)
        if source is not None:
            cfg.source(source)
        out: dict[str, list[dict[str, Any]]] = {}
        for name in [destination] if destination else list(cfg.destinations):
            dest = make_destination(cfg, name, context_for(cfg))
            try:
                out[name] = [r for r in dest.states() if source is None or r["source"] == source]
            finally:
                dest.close()
        if singer:
            from floe.apps.singer.state import singer_state

            typer.echo(json.dumps(singer_state(out, source), indent=2, default=str))
            return
    except FloeError as exc:
        fail(str(exc))
    if as_json:
        shown = {name: [{**r, "committed_at": str(r["committed_at"])} for r in rows] for name, rows in out.items()}
        typer.echo(json.dumps(shown[destination] if destination else shown, indent=2, default=str))
        return
    from rich.table import Table
    table = Table(title="floe state", title_justify="left")
    for column in ("destination", "source", "stream", "version", "committed_at", "state"):
        table.add_column(column, justify="right" if column == "version" else "left")
    for name, rows in out.items():
        for r in rows:
            table.add_row(name, r["source"], r["stream"], str(r["version"]), when(r["committed_at"]), short(r["state"]))
    console.print(table)


@state_app.command("log")
def state_log(
    target: StreamArgument,
    config: ConfigOption = None,
    destination: DestinationOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per version and line.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many versions per destination (0: all).")] = 20,
) -> None:
    """The stream's state versions, newest first: version, commit time, load id, rows, change, state."""
    try:
        cfg = open_config(config)
        source, stream = split_target(target)
        logs = {}
        for dest in open_destinations(cfg, source, destination):
            with closing(dest):
                logs[dest.name] = dest.state_log(source, stream, limit or None)
    except FloeError as exc:
        fail(str(exc))
    for name, versions in logs.items():
        if as_json:
            for v in versions:
                typer.echo(json.dumps({"destination": name, "source": source, "stream": stream, "version": v.version,
                                       "committed_at": v.committed_at.isoformat() if v.committed_at else None,
                                       "load_id": v.load_id, "rows": v.rows, "action": v.action,
                                       "details": v.details, "state": v.state}, default=str))
            continue
        from rich.table import Table
        table = Table(title=f"{target} -> {name}", title_justify="left")
        for column in ("version", "committed_at", "load_id", "rows", "change", "state"):
            table.add_column(column, justify="right" if column in ("version", "rows") else "left")
        for v in versions:
            table.add_row(str(v.version), when(v.committed_at), v.load_id, "" if v.rows is None else f"{v.rows:,}",
                          describe(v), short(v.state))
        console.print(table if versions else f"{target} -> {name}: never loaded")


@state_app.command("revert")
def state_revert(
    target: StreamArgument,
    to: Annotated[int, typer.Option("--to", help="The version whose state becomes the latest again.")],
    config: ConfigOption = None,
    destination: DestinationOption = None,
    yes: YesOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """Delete the rows of the loads after version --to and make its state the latest (as a new version)."""
    try:
        cfg = open_config(config)
        source, stream = split_target(target)
        spec = table_of(cfg, source, stream)
        [dest] = open_destinations(cfg, source, destination, one=True)
        with closing(dest), held(dest, source, stream) as lease:
            log = dest.state_log(source, stream)
            latest = log[0].version if log else 0
            chosen = next((v for v in log if v.version == to), None)
            if chosen is None:
                kept = f"versions {log[-1].version} to {latest}" if log else "no versions: never loaded"
                raise ConfigError(f"--to {to}: {target} -> {dest.name} has no version {to} ({kept})")
            undone = [v for v in log if v.version > to and v.action in ("load", "full refresh", "backfill")]
            if latest == to:
                typer.echo(f"{target} -> {dest.name}: version {to} is the latest; nothing to revert")
                return
            plan = (f"{target} -> {dest.name}: revert to version {to} (state {short(chosen.state)}): deletes the rows "
                    f"of the {len(undone)} loads after it ({sum(v.rows or 0 for v in undone):,} rows loaded)")
            caveat = CAVEATS.get(spec.disposition, "").format(to=to)
            if dry_run:
                typer.echo(f"{plan}{'; ' + caveat if caveat else ''} (dry run: nothing changed)")
                return
            if caveat:
                confirm(f"{plan}.\nA {spec.disposition} stream: {caveat}.", yes)
            from floe.core.destination import StateChange
            from floe.infra.stage import new_load_id
            deleted = dest.change_state(StateChange(
                new_load_id(), spec, source, stream, chosen.state, latest, to, "revert", {"to_version": to}, lease))
    except FloeError as exc:
        fail(str(exc))
    typer.echo(f"{target} -> {dest.name}: reverted to version {to} as version {latest + 1}; deleted {deleted:,} "
               f"rows; the next run loads from version {to}'s state")


@state_app.command("reset")
def state_reset(
    target: StreamArgument,
    config: ConfigOption = None,
    destination: DestinationOption = None,
    keep_rows: Annotated[bool, typer.Option("--keep-rows", help="Keep the table's rows (the next run loads "
                                            "everything again beside them).")] = False,
    yes: YesOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """Set the stream back to never loaded: its rows are deleted (kept with --keep-rows), its state is
    cleared as a new version, so the next run loads it from the start."""
    try:
        cfg = open_config(config)
        source, stream = split_target(target)
        spec = table_of(cfg, source, stream)
        destinations = open_destinations(cfg, source, destination)
        # A replace stream's next load replaces its rows anyway: they stay until then.
        delete = not keep_rows and spec.disposition != "replace"
        rows = "its rows are deleted" if delete else "its rows are kept"
        if keep_rows and spec.disposition != "replace":
            rows += " (the next run loads every row again beside them)"
        plan = f"{target} -> {', '.join(d.name for d in destinations)}: reset to never loaded; {rows}"
        done = []
        with held_everywhere(destinations, source, stream) as leases:  # every lease before any change
            if dry_run:
                typer.echo(f"{plan} (dry run: nothing changed)")
                return
            if delete:
                confirm(plan, yes)
            for dest in destinations:
                latest = dest.read_state(source, stream).version
                from floe.core.destination import StateChange
                from floe.infra.stage import new_load_id
                deleted = dest.change_state(StateChange(new_load_id(), spec, source, stream, None, latest,
                                                        0 if delete else None, "reset", {"keep_rows": not delete},
                                                        leases[dest.name]))
                done.append(f"{target} -> {dest.name}: reset as version {latest + 1}; "
                            + (f"deleted {deleted:,} rows" if delete else "rows kept"))
    except FloeError as exc:
        fail(str(exc))
    for line in done:
        typer.echo(line)


# --- helpers -----------------------------------------------------------------------------------------
def split_target(target: str) -> tuple[str, str]:
    source, dot, stream = target.partition(".")
    if not (dot and source and stream):
        raise ConfigError(f"{target!r}: name the stream as SOURCE.STREAM (e.g. fs.events)")
    return source, stream


def open_destinations(cfg: FloeConfig, source: str, only: str | None, one: bool = False) -> list[Destination]:
    """The destinations `source` loads into (or `only`, which must be one of them), opened."""
    from floe.engine.factory import context_for, make_destination

    names = cfg.destinations_for(source)
    if only is not None:
        if only not in names:
            cfg.destination(only)  # an unknown name says which are configured
            raise ConfigError(f"--destination {only}: source {source} does not load into it (it loads into "
                              f"{', '.join(names)})")
        names = [only]
    if one and len(names) > 1:
        raise ConfigError(f"source {source} loads into several destinations ({', '.join(names)}), each with its own "
                          "versions: choose one with --destination")
    return [make_destination(cfg, name, context_for(cfg)) for name in names]


def table_of(cfg: FloeConfig, source: str, stream: str) -> TableSpec:
    """The table of `source`.`stream` as the source declares it (its disposition, keys and columns)."""
    import asyncio

    from floe.engine.factory import context_for, make_source
    from floe.engine.pipeline import table_spec

    plugin = make_source(cfg, source, context_for(cfg))
    try:
        streams = {s.name: s for s in plugin.streams()}
    finally:
        asyncio.run(plugin.aclose())
    if stream not in streams:
        raise ConfigError(f"{source}.{stream}: source {source} has no stream {stream!r} (streams: "
                          f"{', '.join(sorted(streams))})")
    return table_spec(source, streams[stream], [])


@contextmanager
def closing(dest: Destination) -> Iterator[Destination]:
    try:
        yield dest
    finally:
        dest.close()


@contextmanager
def held(dest: Destination, source: str, stream: str) -> Iterator[Lease]:
    """The stream's lease in `dest` for the duration of the block; refused at once while a run holds it."""
    got = dest.try_lease(source, stream)
    from floe.core.leases import Holder
    if isinstance(got, Holder):
        raise FloeError(f"{dest.lease_name(source, stream)}: another run is loading this stream ({got.describe()}); "
                        "nothing changed, try again once it has finished")
    got.start()
    try:
        yield got
    finally:
        got.release()


@contextmanager
def held_everywhere(destinations: list[Destination], source: str, stream: str) -> Iterator[dict[str, Lease]]:
    """The stream's lease in each destination (see `held`), by destination name; then the destinations closed."""
    with ExitStack() as stack:
        for dest in destinations:
            stack.enter_context(closing(dest))
        yield {dest.name: stack.enter_context(held(dest, source, stream)) for dest in destinations}


def confirm(message: str, yes: bool) -> None:
    """Show what will change; go on with --yes or the user's yes at a terminal, else stop (exit 1)."""
    typer.echo(message, err=True)
    if yes:
        return
    if not sys.stdin.isatty():
        fail("not confirmed: pass --yes to go ahead (nothing changed)")
    if not typer.confirm("Go ahead?", err=True):
        fail("cancelled; nothing changed")


def when(value: Any) -> str:
    from floe.destinations.state_ops import as_utc
    at = as_utc(value)
    return f"{at:%Y-%m-%d %H:%M:%S} UTC" if at else ""


def short(state: Any, width: int = 60) -> str:
    """A state as one line of compact JSON, cut at `width` characters."""
    if state is None:
        return "(never loaded)"
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def describe(v: StateVersion) -> str:
    if v.action == "revert":
        return f"revert to {v.details.get('to_version')} (-{v.details.get('deleted_rows', 0):,} rows)"
    if v.action == "reset":
        kept = v.details.get("keep_rows")
        return "reset (rows kept)" if kept else f"reset (-{v.details.get('deleted_rows', 0):,} rows)"
    if v.action == "backfill":
        days = v.details.get("backfill", {})
        return f"backfill {days.get('from')}..{days.get('to')}"
    return v.action
