"""`floe state show`: the latest committed state of every stream, per destination."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from floe.commands._output import ConfigOption, fail, open_config
from floe.errors import FloeError

state_app = typer.Typer(help="Inspect stream state.", no_args_is_help=True)


@state_app.command("show")
def state_show(
    config: ConfigOption = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    singer: Annotated[bool, typer.Option("--singer", help="Print one source's state as Singer state "
                                         "({\"bookmarks\": ...}, what `floe tap SOURCE --state` reads).")] = False,
    source: Annotated[str | None, typer.Option(help="With --singer: the source (needed if several have state).")] = None,
) -> None:
    """Print the latest state of every stream, per destination, as JSON."""
    from floe.engine.runner import context_for, make_destination

    try:
        cfg = open_config(config)
        out: dict[str, object] = {}
        for name in [destination] if destination else list(cfg.destinations):
            dest = make_destination(cfg, name, context_for(cfg))
            try:
                rows = dest.states()
            finally:
                dest.close()
            if singer:
                out[name] = rows
            else:
                out[name] = [{**r, "committed_at": str(r["committed_at"])} for r in rows]
        if singer:
            from floe.singer.state import singer_state

            typer.echo(json.dumps(singer_state(out, source), indent=2, default=str))  # type: ignore[arg-type]
            return
    except FloeError as exc:
        fail(str(exc))
    typer.echo(json.dumps(out if not destination else out[destination], indent=2, default=str))
