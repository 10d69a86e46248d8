"""`floe drift SOURCE.STREAM`: when late changes land, and the lookback that would have caught them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from floe.commands._output import ConfigOption, console, fail, open_config
from floe.core.errors import FloeError

if TYPE_CHECKING:
    from floe.apps.drift import Cost, Drift


def drift_command(
    stream: Annotated[str, typer.Argument(metavar="SOURCE.STREAM", help="The stream, e.g. singular.campaign_stats.")],
    config: ConfigOption = None,
    share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of changed rows the lookback must catch.")] = 0.995,
    destination: Annotated[str | None, typer.Option(
        "--destination", "-d", help="Read _floe_drift from this destination (default: the source's first).")] = None,
) -> None:
    """Show how many rows each re-read changed, by age in days, and the lookback catching --share of them."""
    from floe.apps.drift import drift

    try:
        found = drift(open_config(config), stream, share, destination)
    except FloeError as exc:
        fail(str(exc))
    print_drift(found)


def print_drift(found: Drift) -> None:
    from rich.table import Table

    where = f"{found.source}.{found.stream} in {found.destination}"
    if not found.ages:
        typer.echo(f"{where}: no re-read recorded yet (a run re-reads the lookback window once rows are loaded)")
        return
    total = found.changed or 1
    table = Table(title=f"{where}: {found.loads} re-reads")
    for column in ("age (days)", "re-read", "changed", "share", "cumulative", "amount changed"):
        table.add_column(column, justify="right")
    caught = 0
    for age in found.ages:
        caught += age.changed
        amount = _amount(age.amount_changed) + (
            f" ({age.amount_changed / age.amount_before:.2%})" if age.amount_before else "")
        table.add_row(str(age.days), f"{age.reread:,}", f"{age.changed:,}", f"{age.changed / total:.1%}",
                      f"{caught / total:.1%}", amount)
    console.print(table)
    if found.suggested is None:
        typer.echo("no re-read row changed: a lookback of 0 days would have lost nothing")
    else:
        typer.echo(f"{found.share:.1%} of changes land within {found.suggested} days: "
                   f"a lookback of {found.suggested} days would have caught them")
    for label, cost in (("configured", found.configured), ("suggested", found.proposed)):
        if cost is not None:
            typer.echo(f"{label:<10} lookback_days: {cost.lookback_days:>3}  {describe(cost)}")


def _amount(value: float) -> str:
    """Money as people read it: cents, or four decimals below 1 (Twilio prices a call at $0.0085)."""
    return f"{value:,.2f}" if value >= 1 or value == 0 else f"{value:.4f}"


def describe(cost: Cost) -> str:
    calls = f"~{cost.api_calls:,} API calls, " if cost.api_calls is not None else ""
    return f"{calls}~{cost.rows:,} rows re-read per run"
