"""`floe sync [NAME] [--dry-run] [--full] [--force]`: push warehouse rows to Pendo (see docs/pendo.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from floe.commands._output import ConfigOption, fail, open_config, print_sync_summary
from floe.core.errors import FloeError

if TYPE_CHECKING:
    from floe.apps.reverse.engine import SyncResult
    from floe.config import FloeConfig


def notify_failures(config: FloeConfig, results: list[SyncResult]) -> None:
    """Send a `failed` notice through `notify:` for every sync that failed or had rows rejected."""
    from floe.apps.notify import Notifier
    from floe.apps.reverse.outcomes import notify_failures as send

    send(Notifier(config.notify), results)


def run_and_report(config: FloeConfig, names: list[str] | None = None, *, dry_run: bool = False,
                   full: bool = False, force: bool = False) -> list[SyncResult]:
    """Run syncs, print the summary, notify; exit non-zero if a sync failed (one line per failed sync
    on stderr). A sync fails when Pendo accepted none of its rows; some rows rejected only warn."""
    import asyncio

    from floe.apps.reverse.engine import run_syncs

    try:
        results = asyncio.run(run_syncs(config, names, dry_run=dry_run, full=full, force=force))
    except FloeError as exc:
        fail(str(exc))
    print_sync_summary(results)
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
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Resend every row, not only the changed ones.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Clear the keys gone from the rows even above max_deletes.")] = False,
) -> None:
    """Push warehouse rows to Pendo visitor/account metadata (only rows changed since the last run)."""
    try:
        cfg = open_config(config)
    except FloeError as exc:
        fail(str(exc))
    run_and_report(cfg, name, dry_run=dry_run, full=full, force=force)
