"""The `floe` command line. Each command is a thin layer over a module that does the work.

Commands defined in other modules are registered at the bottom (one line each).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from floe import logs, signals
from floe.config import FloeConfig, load_config
from floe.engine.pipeline import StreamResult
from floe.engine.progress import Progress
from floe.engine.stream import RunOptions
from floe.errors import FloeError
from floe.secrets import redact

app = typer.Typer(help="floe: warehouse SaaS data exactly once.", no_args_is_help=True, add_completion=False)
state_app = typer.Typer(help="Inspect stream state.", no_args_is_help=True)
app.add_typer(state_app, name="state")

ConfigOption = Annotated[Path | None, typer.Option("-c", "--config", help="Config file (default: floe.yml).")]
# Off a terminal (cron, CI, pipes) rich would squeeze tables to 80 columns and cut names.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)


def fail(message: str, code: int = 1) -> None:
    """Print one redacted error line on stderr and exit non-zero."""
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code)


def open_config(path: Path | None) -> FloeConfig:
    config = load_config(path)
    logs.setup(fmt=config.log_format)
    return config


def print_summary(results: list[StreamResult]) -> None:
    table = Table(title="floe run", title_justify="left")
    for column in ("source", "stream", "destination", "rows", "commits", "seconds", "status"):
        table.add_column(column, justify="right" if column in ("rows", "commits", "seconds") else "left")
    for r in results:
        status = "ok" if r.ok else f"FAILED: {r.error}"
        table.add_row(r.source, r.stream, r.destination, f"{r.rows:,}", str(r.commits), f"{r.seconds:.1f}", status)
    console.print(table)


@app.command()
def run(
    config: ConfigOption = None,
    source: Annotated[list[str] | None, typer.Option("--source", "-s", help="Only this source (repeatable).")] = None,
    stream: Annotated[list[str] | None, typer.Option("--stream", help="Only this stream (repeatable).")] = None,
    reprocess: Annotated[bool, typer.Option(help="Re-read inputs already processed (e.g. changed files).")] = False,
    full_refresh: Annotated[bool, typer.Option(
        help="Read every stream again from its start; its rows replace the table's in one commit at the end.")] = False,
) -> None:
    """Load every source into its destinations (then run syncs, if any)."""
    from floe.engine import runner

    try:
        cfg = open_config(config)
        started = datetime.now(UTC)
        results = runner.run(cfg, source, stream, RunOptions(reprocess, full_refresh), Progress())
    except FloeError as exc:
        fail(str(exc))
    if cfg.notify:
        from floe.notify import notify_run

        notify_run(cfg, results, started)
    print_summary(results)
    failed = [r for r in results if not r.ok]
    if failed:
        reasons = list(dict.fromkeys(r.error or "" for r in failed))  # distinct, in order
        first = f": {reasons[0]}" + (f" (and {len(reasons) - 1} other errors above)" if len(reasons) > 1 else "")
        fail(f"{len(failed)} of {len(results)} streams failed{first}")
    if cfg.syncs and not source and not stream:
        from floe.syncs import run_syncs_cli

        run_syncs_cli(cfg)


@app.command()
def check(config: ConfigOption = None) -> None:
    """Validate the config and reach every destination."""
    from floe.engine.runner import context_for, make_destination

    try:
        cfg = open_config(config)
    except FloeError as exc:
        fail(str(exc))
    typer.echo(f"config ok: {len(cfg.sources)} sources, {len(cfg.destinations)} destinations")
    problems = 0
    context = context_for(cfg)
    for name in cfg.destinations:
        try:
            destination = make_destination(cfg, name, context)
            try:
                for line in destination.check():
                    typer.echo(f"  {name}: {redact(line)}")
            finally:
                destination.close()
        except FloeError as exc:
            problems += 1
            typer.echo(f"  {name}: FAILED: {redact(str(exc))}", err=True)
    if problems:
        fail(f"{problems} destination(s) unreachable")


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


@app.command()
def demo(
    directory: Annotated[Path, typer.Option(help="Where the sample data and demo.duckdb go.")] = Path("."),
) -> None:
    """Generate sample data, load it into demo.duckdb and answer the analytics questions."""
    from floe.demo import run_demo

    logs.setup()
    try:
        code = run_demo(directory)
    except FloeError as exc:
        fail(str(exc))
    raise typer.Exit(code)


def main() -> None:
    if sys.argv[1:2] != ["serve"]:  # `floe serve` stops cleanly on SIGTERM; the others die of it
        signals.release_sigterm()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


# Commands that live in their own modules register here, one line each.
from floe.commands.sync import sync_command  # noqa: E402

app.command("sync")(sync_command)
from floe.commands.tap import discover_command, tap_command  # noqa: E402
from floe.commands.target import target_command  # noqa: E402

app.command("tap")(tap_command)
app.command("discover")(discover_command)
app.command("target")(target_command)
from floe.commands.sandbox import sandbox_command  # noqa: E402

app.command("sandbox")(sandbox_command)
from floe.commands.serve import serve_command  # noqa: E402

app.command("serve")(serve_command)
