"""The `floe` command line: the typer app, one line per command (each lives in floe.commands)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from floe import __version__
from floe.commands.chaos import chaos_command
from floe.commands.check import check_command
from floe.commands.demo import demo_command
from floe.commands.drift import drift_command
from floe.commands.explain import explain_command
from floe.commands.init import init_command
from floe.commands.run import run_command
from floe.commands.runs import runs_command
from floe.commands.sandbox import sandbox_command
from floe.commands.serve import serve_command
from floe.commands.state import state_app
from floe.commands.sync import sync_command
from floe.commands.tap import discover_command, tap_command
from floe.commands.target import target_command
from floe.infra import signals

# Plain (click) help and usage errors: rich's help formatting alone costs a fifth of a second of imports.
app = typer.Typer(help="floe: warehouse SaaS data exactly once.", no_args_is_help=True, add_completion=False,
                  rich_markup_mode=None)


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"floe {__version__}")
        raise typer.Exit()


@app.callback()
def options(version: Annotated[bool, typer.Option(
        "--version", callback=print_version, is_eager=True, help="Print floe's version and exit.")] = False) -> None:
    """floe: warehouse SaaS data exactly once."""


app.command("init")(init_command)
app.command("run")(run_command)
app.command("runs")(runs_command)
app.command("check")(check_command)
app.add_typer(state_app, name="state")
app.command("demo")(demo_command)
app.command("sync")(sync_command)
app.command("explain")(explain_command)
app.command("tap")(tap_command)
app.command("discover")(discover_command)
app.command("target")(target_command)
app.command("sandbox")(sandbox_command)
app.command("serve")(serve_command)
app.command("chaos")(chaos_command)
app.command("drift")(drift_command)


def main() -> None:
    if sys.argv[1:2] != ["serve"]:  # `floe serve` stops cleanly on SIGTERM; the others die of it
        signals.release_sigterm()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
