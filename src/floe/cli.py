"""The `floe` command line: a typer app holding the one command that argv names.

`COMMANDS` says where each command lives (in floe.commands) and what `floe --help` says of it, so
`floe run` imports floe.commands.run alone and `floe --help` lists every command without importing
one. `app` (for tests and embedding) is the app with every command loaded.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from floe import __version__
from floe.infra import signals, startup


@dataclass(frozen=True)
class Command:
    target: str  # "module:attribute" under floe.commands: a command function, or a typer.Typer (a group)
    help: str  # the first paragraph of the command's help: what `floe --help` shortens to one line


# In the order `floe --help` lists them; groups last (typer lists them after the commands).
COMMANDS: dict[str, Command] = {
    "init": Command("init:init_command", "Write a commented floe.yml for the chosen sources and destination "
                    "(secrets as ${ENV}) and a .env template."),
    "run": Command("run:run_command", "Load every source into its destinations (then run syncs, if any)."),
    "runs": Command("runs:runs_command",
                    "The last runs (newest first): when, how long, status, streams, rows, commits, error."),
    "check": Command("check:check_command", "Validate the config, then check every source (paths, secrets, "
                     "credentials), destination and\nthe stage: one line each, ok or FAILED with the reason. "
                     "Loads and creates nothing."),
    "demo": Command("demo:demo_command",
                    "Generate sample data, load it into demo.duckdb and answer the analytics questions."),
    "sync": Command("sync:sync_command",
                    "Push warehouse rows to Pendo visitor/account metadata (only rows changed since the last run)."),
    "explain": Command("explain:explain_command", "Trace a Pendo value back: what Pendo holds, the sync run that "
                       "sent it, the warehouse rows and\nthe loads (and source window, file or page) they came from."),
    "tap": Command("tap:tap_command",
                   "Run SOURCE as a Singer tap: SCHEMA, RECORD, STATE and ACTIVATE_VERSION messages on stdout."),
    "discover": Command("tap:discover_command", "Print SOURCE's Singer catalog (streams, JSON Schemas, metadata)."),
    "target": Command("target:target_command", "Run as a Singer target: SCHEMA/RECORD/STATE/ACTIVATE_VERSION/BATCH "
                      "on stdin, STATE out once committed."),
    "sandbox": Command("sandbox:sandbox_command",
                       "Start the emulators (Twilio, Singular, ...) on 127.0.0.1 and keep them running."),
    "serve": Command("serve:serve_command",
                     "Keep sources loaded: catch up, sleep until the next piece of work is due, repeat."),
    "chaos": Command("chaos:chaos_command", "Prove exactly-once on your own config: emulated sources, scratch "
                     "destinations, kills and API faults."),
    "drift": Command("drift:drift_command", "Show how many rows each re-read changed, by age in days, and the "
                     "lookback catching --share of them."),
    "state": Command("state:state_app", "See, revert and reset stream state."),
}


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"floe {__version__}")
        raise typer.Exit()


def options(version: Annotated[bool, typer.Option(
        "--version", callback=print_version, is_eager=True, help="Print floe's version and exit.")] = False) -> None:
    """floe: warehouse SaaS data exactly once."""


def load(name: str) -> Any:
    """The command function (or typer group) `name` of `COMMANDS`, imported."""
    module, _, attribute = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(f"floe.commands.{module}"), attribute)


def listed_only(name: str) -> Any:
    """A stand-in for a command that is listed by `floe --help` but not loaded (argv named another)."""
    def command() -> None:
        raise RuntimeError(f"floe {name}: the command was not loaded")  # build_app loads the one argv names
    return command


def build_app(loaded: Collection[str]) -> typer.Typer:
    """The app with the commands `loaded` imported; the others are listed, by their help, only."""
    # Plain (click) help and usage errors: rich's help formatting alone costs a fifth of a second of imports.
    app = typer.Typer(help="floe: warehouse SaaS data exactly once.", no_args_is_help=True, add_completion=False,
                      rich_markup_mode=None)
    app.callback()(options)
    for name, command in COMMANDS.items():
        if name not in loaded:
            app.command(name, help=command.help)(listed_only(name))
        elif isinstance(target := load(name), typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def wanted(args: list[str]) -> set[str]:
    """The command argv names (the first argument that is not an option: floe's own options take no
    value), or none for `floe`, `floe --help` and `floe --version`."""
    name = next((arg for arg in args if not arg.startswith("-")), None)
    return {name} if name in COMMANDS else set()


def __getattr__(name: str) -> Any:
    """`app`: every command loaded (what tests invoke through typer's CliRunner)."""
    if name == "app":
        globals()["app"] = every = build_app(COMMANDS)
        return every
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    if sys.argv[1:2] != ["serve"]:  # `floe serve` stops cleanly on SIGTERM; the others die of it
        signals.release_sigterm()
    startup.limit_malloc_arenas()  # before the command starts threads
    startup.use_system_allocator()
    startup.single_threaded_blas()  # the API leaves it to the program it runs in
    app = build_app(wanted(sys.argv[1:]))
    startup.resume_gc()  # the command line is built; what the command imports and does collects as usual
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
