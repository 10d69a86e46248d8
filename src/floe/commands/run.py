"""`floe run`: load every source into its destinations, then run the syncs (if any)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from floe.commands._output import ConfigOption, fail, open_config, print_summary
from floe.core.errors import FloeError


def run_command(
    config: ConfigOption = None,
    source: Annotated[list[str] | None, typer.Option(
        "--source", "-s", metavar="NAME", help="Only this source (repeatable).")] = None,
    stream: Annotated[list[str] | None, typer.Option(
        "--stream", metavar="[SOURCE.]STREAM",
        help="Only this stream (repeatable); STREAM alone when only one source has it.")] = None,
    destination: Annotated[list[str] | None, typer.Option(
        "--destination", "-d", metavar="NAME", help="Only into this destination (repeatable).")] = None,
    reprocess: Annotated[bool, typer.Option(
        "--reprocess", help="Re-read inputs already processed (e.g. changed files).")] = False,
    full_refresh: Annotated[bool, typer.Option(
        "--full-refresh",
        help="Read every stream again from its start; its rows replace the table's in one commit at the end.")] = False,
    from_day: Annotated[datetime | None, typer.Option(
        "--from", formats=["%Y-%m-%d"], metavar="DATE",
        help="Backfill: re-read the days from DATE (UTC) to --to; their rows are replaced in one commit "
             "and the bookmark stays where it is.")] = None,
    to_day: Annotated[datetime | None, typer.Option(
        "--to", formats=["%Y-%m-%d"], metavar="DATE", help="Backfill: the last day re-read (included).")] = None,
) -> None:
    """Load every source into its destinations (then run syncs, if any)."""
    from floe.core.stream import DayRange, RunOptions
    from floe.engine import runner
    from floe.engine.progress import Progress

    if (from_day is None) != (to_day is None):
        fail("--from and --to go together: the first and the last day to backfill (YYYY-MM-DD)")
    backfill = DayRange(from_day.date(), to_day.date()) if from_day and to_day else None
    if backfill and backfill.last < backfill.first:
        fail(f"--to {backfill.last} is before --from {backfill.first}")
    try:
        cfg = open_config(config)
        started = datetime.now(UTC)
        results = runner.run(cfg, source, stream, RunOptions(reprocess, full_refresh, backfill),
                             Progress(cfg.progress_interval), destination)
    except FloeError as exc:
        fail(str(exc))
    if cfg.notify:
        from floe.apps.notify import notify_run

        notify_run(cfg, results, started)
    print_summary(results)
    failed = [r for r in results if not r.ok]
    if failed:
        reasons = list(dict.fromkeys(r.error or "" for r in failed))  # distinct, in order
        first = f": {reasons[0]}" + (f" (and {len(reasons) - 1} other errors above)" if len(reasons) > 1 else "")
        fail(f"{len(failed)} of {len(results)} streams failed{first}")
    if cfg.syncs and not source and not stream and not destination and not backfill:
        from floe.commands.sync import run_and_report

        run_and_report(cfg)
