"""`floe runs`: the last runs, from the run log (`_floe_runs`) of each destination."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from floe.commands._output import ConfigOption, console, fail, open_config
from floe.core.errors import FloeError
from floe.core.secrets import redact

if TYPE_CHECKING:
    from floe.core.runs import RunRecord


def runs_command(
    config: ConfigOption = None,
    destination: Annotated[list[str] | None, typer.Option(
        "--destination", "-d", metavar="NAME", help="Only this destination (repeatable).")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many runs to list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list instead of a table.")] = False,
) -> None:
    """The last runs (newest first): when, how long, status, streams, rows, commits, error."""
    from floe.engine.factory import context_for, make_destination

    records: list[RunRecord] = []
    try:
        cfg = open_config(config)
        for name in destination or list(cfg.destinations):
            dest = make_destination(cfg, name, context_for(cfg))
            try:
                records += dest.runs(limit)
            except FloeError:
                raise
            except Exception as exc:  # noqa: BLE001 - the warehouse's own error, named
                raise FloeError(f"destinations.{name}: cannot read _floe_runs: {type(exc).__name__}: {exc}") from None
            finally:
                dest.close()
    except FloeError as exc:
        fail(str(exc))
    from floe.core.runs import ended_without_finishing

    records = sorted((ended_without_finishing(r) or r for r in records), key=lambda r: (r.started_at, r.run_id),
                     reverse=True)[:limit]
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in records], indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title="floe runs", title_justify="left")
    for column in ("run_id", "destination", "started_at", "seconds", "status", "streams", "failed", "rows",
                   "commits", "error"):
        table.add_column(column, justify="right" if column in ("seconds", "streams", "failed", "rows", "commits")
                         else "left")
    for r in records:
        table.add_row(r.run_id, r.destination, f"{r.started_at:%Y-%m-%d %H:%M:%S}Z",
                      "" if r.seconds is None else f"{r.seconds:.1f}", r.status, str(r.streams), str(r.failed),
                      f"{r.rows:,}", str(r.commits), redact(r.error or "")[:200])
    console.print(table)
