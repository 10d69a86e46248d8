"""What every command shares: the console, one-line errors, loading floe.yml, the run summary table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from floe.commands._table import box_table
from floe.core.secrets import redact

if TYPE_CHECKING:  # (and imported where used: `floe --help` need not load rich, pydantic or the engine)
    from rich.console import Console

    from floe.apps.reverse.engine import SyncResult
    from floe.config import FloeConfig
    from floe.engine.pipeline import StreamResult

ConfigOption = Annotated[Path | None, typer.Option(
    "-c", "--config", metavar="PATH", help="Config file (default: floe.yml).")]


class _Console:
    """rich's Console, made on first use (so that `floe --help` does not import rich)."""

    _real: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._real is None:
            from rich.console import Console

            # Off a terminal (cron, CI, pipes) rich would squeeze tables to 80 columns and cut names.
            self._real = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
        return getattr(self._real, name)


console = _Console()


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one redacted error line on stderr and exit non-zero."""
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code)


def open_config(path: Path | None) -> FloeConfig:
    """Load floe.yml (or `path`) and set up logging the way it asks."""
    from floe.config import load_config
    from floe.infra import logs

    config = load_config(path)
    logs.setup(fmt=config.log_format)
    return config


def print_summary(results: list[StreamResult]) -> None:
    """One table row per stream and destination of a run: rows, commits, seconds, status."""
    def status(r: StreamResult) -> str:
        rejected = r.details.get("rejected_rows", 0)  # `bad_rows: quarantine`
        return (f"ok ({rejected:,} rows to _floe_rejected)" if rejected else "ok") if r.ok else f"FAILED: {r.error}"

    rows = [(r.source, r.stream, r.destination, f"{r.rows:,}", str(r.commits), f"{r.seconds:.1f}", status(r))
            for r in results]
    typer.echo(box_table("floe run", ("source", "stream", "destination", "rows", "commits", "seconds", "status"),
                         rows, right=frozenset({"rows", "commits", "seconds"})))


def print_sync_summary(results: list[SyncResult]) -> None:
    """One table row per sync; a dry run also prints the first records it would have sent."""
    dry = any(r.dry_run for r in results)
    numbers: tuple[str, ...] = ("changed", "requests") if dry else ("changed", "sent", "updated", "missing", "failed")
    if any(r.clears for r in results):  # `deletes: clear`: keys gone from the rows, and cleared
        numbers += ("gone",) if dry else ("gone", "cleared")
    rows = [(r.name, r.target, *(f"{getattr(r, c):,}" for c in numbers), f"{r.seconds:.1f}",
             "ok" if r.ok else f"FAILED: {r.error}") for r in results]
    typer.echo(box_table("floe sync" + (" (dry run: nothing sent)" if dry else ""),
                         ("sync", "to", *numbers, "seconds", "status"), rows, right=frozenset({*numbers, "seconds"})))
    for r in results:
        if r.dry_run and r.samples:
            typer.echo(f"{r.name}: first records that would be sent:")
            for record in r.samples:
                typer.echo("  " + redact(json.dumps(record, default=str)))
        if r.dry_run and r.gone_keys:
            more = f" (the first {len(r.gone_keys)})" if r.gone > len(r.gone_keys) else ""
            typer.echo(f"{r.name}: {r.gone:,} keys gone from the rows whose fields would be cleared{more}:")
            for key in r.gone_keys:
                typer.echo("  " + redact(key))
