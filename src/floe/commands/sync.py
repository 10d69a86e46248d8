"""`floe sync [NAME] [--dry-run] [--full]`: push warehouse rows to Pendo (see docs/pendo.md)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from floe.config import FloeConfig
from floe.errors import FloeError
from floe.secrets import redact
from floe.syncs.engine import SyncResult, run_syncs

console = Console()


def print_summary(results: list[SyncResult]) -> None:
    dry = any(r.dry_run for r in results)
    table = Table(title="floe sync" + (" (dry run: nothing sent)" if dry else ""), title_justify="left")
    numbers = ("changed", "requests") if dry else ("changed", "sent", "updated", "missing", "failed")
    for column in ("sync", "to", *numbers, "seconds", "status"):
        table.add_column(column, justify="right" if column in (*numbers, "seconds") else "left")
    for r in results:
        counts = [f"{getattr(r, c):,}" for c in numbers]
        table.add_row(r.name, r.target, *counts, f"{r.seconds:.1f}", "ok" if r.ok else f"FAILED: {r.error}")
    console.print(table)
    for r in results:
        if r.dry_run and r.samples:
            typer.echo(f"{r.name}: first records that would be sent:")
            for record in r.samples:
                typer.echo("  " + redact(json.dumps(record, default=str)))


def notify_failures(config: FloeConfig, results: list[SyncResult]) -> None:
    """Send a `failed` notice through `notify:` for every sync that failed or had rows rejected."""
    from floe.notify import Notice, Notifier

    notifier = Notifier(config.notify)
    if not notifier.enabled:
        return
    now = datetime.now(UTC).isoformat()
    for r in results:
        if r.dry_run or (r.ok and not r.failed):
            continue
        error = r.error or (f"{r.failed} rows rejected by Pendo ({r.missing} missing, {r.errors} errors); "
                            "see _floe_sync_failures, they are retried on the next run")
        notifier.send(Notice("failed", "_floe_sync", r.name, r.target, redact(error), r.details(), now))


def run_and_report(config: FloeConfig, names: list[str] | None = None, *, dry_run: bool = False,
                   full: bool = False) -> list[SyncResult]:
    """Run syncs, print the summary, notify; exit non-zero if a sync failed (one line per failed sync
    on stderr). A sync fails when Pendo accepted none of its rows; some rows rejected only warn."""
    try:
        results = asyncio.run(run_syncs(config, names, dry_run=dry_run, full=full))
    except FloeError as exc:
        typer.echo(f"error: {redact(str(exc))}", err=True)
        raise typer.Exit(1) from None
    print_summary(results)
    notify_failures(config, results)
    for r in results:
        for warning in r.warnings:
            typer.echo(f"warning: syncs.{r.name}.{warning}", err=True)
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:  # one line each, naming the sync (the summary table wraps long reasons)
            reason = " ".join(str(r.error).split())
            where = "" if reason.startswith(f"syncs.{r.name}") else f"syncs.{r.name}: "
            typer.echo(f"error: {where}{reason}", err=True)
        typer.echo(f"error: {len(failed)} of {len(results)} syncs failed", err=True)
        raise typer.Exit(1)
    rejected = sum(r.failed for r in results)
    if rejected:
        typer.echo(f"warning: {rejected} rows were rejected by Pendo; they are in _floe_sync_failures and "
                   "will be retried on the next run", err=True)
    return results


def sync_command(
    name: Annotated[list[str] | None, typer.Argument(help="Sync(s) to run (default: all).")] = None,
    config: Annotated[Path | None, typer.Option("-c", "--config", help="Config file (default: floe.yml).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Resend every row, not only the changed ones.")] = False,
) -> None:
    """Push warehouse rows to Pendo visitor/account metadata (only rows changed since the last run)."""
    from floe.cli import fail, open_config

    try:
        cfg = open_config(config)
    except FloeError as exc:
        fail(str(exc))
    run_and_report(cfg, name, dry_run=dry_run, full=full)
