"""`floe sync [NAME] [--dry-run] [--full] [--force] [--verify] [--repair]`: push warehouse rows to
Pendo, or check that Pendo holds what floe sent (see docs/pendo.md)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from floe.commands._output import ConfigOption, fail, open_config, print_sync_summary
from floe.core.errors import FloeError
from floe.core.secrets import redact

if TYPE_CHECKING:
    from floe.apps.reverse.engine import SyncResult
    from floe.apps.reverse.verify import VerifyResult
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


SHOWN_DIFFERENCES = 20  # differences listed one per line, per sync
KIND_TEXT = {"not_applied": "accepted but not applied", "changed_in_pendo": "changed in Pendo since",
             "missing_id": "missing id"}


def print_verify(results: list[VerifyResult]) -> None:
    """Per sync and field: how many values differ, by kind; then the first differences, one a line."""
    from rich.table import Table

    from floe.apps.reverse.verify import KINDS
    from floe.commands._output import console

    table = Table(title="floe sync --verify", title_justify="left")
    for column in ("sync", "field", "keys checked", *(KIND_TEXT[k] for k in KINDS)):
        table.add_column(column, justify="left" if column in ("sync", "field") else "right")
    for r in results:
        if r.error is not None and not r.differences:
            table.add_row(r.name, "", "", "", "", f"FAILED: {r.error}")
        by_field = r.by_field()
        if not by_field and r.error is None:
            table.add_row(r.name, "(all)", f"{r.checked:,}", "0", "0", "0")
        for name, counts in sorted(by_field.items()):
            table.add_row(r.name, name, f"{r.checked:,}", *(f"{counts[k]:,}" for k in KINDS))
    console.print(table)
    for r in results:
        for d in r.differences[:SHOWN_DIFFERENCES]:
            pendo = "no such record" if d.kind == "missing_id" else f"Pendo holds {json.dumps(d.pendo)}"
            typer.echo(f"{r.name}: {d.key} {d.field}: floe sent {json.dumps(d.sent)}, {pendo} ({KIND_TEXT[d.kind]})")
        if len(r.differences) > SHOWN_DIFFERENCES:
            typer.echo(f"{r.name}: ... and {len(r.differences) - SHOWN_DIFFERENCES:,} more differences")


def verify_and_report(config: FloeConfig, names: list[str] | None, *, repair: bool) -> None:
    """Verify (and repair) syncs, print what differs; exit non-zero if anything still differs."""
    import asyncio

    from floe.apps.reverse.verify import verify_syncs

    try:
        results = asyncio.run(verify_syncs(config, names, repair=repair))
    except FloeError as exc:
        fail(str(exc))
    print_verify(results)
    repairs = [r.repair for r in results if r.repair is not None]
    if repairs:
        print_sync_summary(repairs)
    bad = [r for r in results if not r.ok]
    for r in bad:
        if r.error:
            typer.echo(f"error: {redact(r.error)}", err=True)
        elif r.after:
            typer.echo(f"error: syncs.{r.name}: {len(r.after):,} values still differ after the repair", err=True)
        elif r.repair is not None and not r.repair.ok:
            typer.echo(f"error: syncs.{r.name}: the repair failed: {r.repair.error}", err=True)
        else:
            typer.echo(f"error: syncs.{r.name}: {len(r.differences):,} values in Pendo differ from what floe sent "
                       "(floe sync --repair resends them)", err=True)
    if bad:
        raise typer.Exit(1)
    if repairs:
        typer.echo("repaired: Pendo holds what floe sent", err=True)


def sync_command(
    name: Annotated[list[str] | None, typer.Argument(help="Sync(s) to run (default: all).")] = None,
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Resend every row, not only the changed ones.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Clear the keys gone from the rows even above max_deletes.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Read the synced fields back from Pendo and report what differs from what floe sent.")] = False,
    repair: Annotated[bool, typer.Option(
        "--repair", help="Verify, resend what differs, and verify again.")] = False,
) -> None:
    """Push warehouse rows to Pendo visitor/account metadata (only rows changed since the last run)."""
    try:
        cfg = open_config(config)
    except FloeError as exc:
        fail(str(exc))
    if verify or repair:
        verify_and_report(cfg, name, repair=repair)
        return
    run_and_report(cfg, name, dry_run=dry_run, full=full, force=force)
