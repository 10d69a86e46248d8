"""`floe chaos`: kill and fault the configured pipeline against emulators; compare with a clean run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from floe.commands._output import ConfigOption, console, fail, open_config
from floe.core.errors import FloeError

if TYPE_CHECKING:
    from floe.apps.chaos.trials import Report


def chaos_command(
    config: ConfigOption = None,
    trials: Annotated[int, typer.Option(min=1, help="Chaos runs, each compared with the clean run.")] = 3,
    faults: Annotated[str, typer.Option(
        help="API faults the emulators inject, comma-separated: 429, 5xx, truncate (or none).")] = "429,5xx,truncate",
    kill: Annotated[bool, typer.Option(
        "--kill/--no-kill", help="Kill each chaos run 1-2 times at seeded kill points before letting it finish.")] = True,
    kill_at: Annotated[str | None, typer.Option(
        "--kill-at", metavar="POINTS", help="The kill points of every chaos run instead of drawn ones, comma-separated, "
        "one per restart: batch:N, before-commit:N, after-commit:N (the Nth staged batch or load commit).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generated data, kill points and faults.")] = 1,
    postgres_url: Annotated[str | None, typer.Option(
        "--postgres-url", metavar="URL", envvar="FLOE_CHAOS_POSTGRES_URL",
        help="A PostgreSQL server for scratch schemas (floe_chaos_*, dropped afterwards) standing in for "
             "your PostgreSQL destinations and holding generated tables for your sql sources.")] = None,
    keep: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Keep the scratch folder (configs, run logs, DuckDB files) here.")] = None,
) -> None:
    """Prove exactly-once on your own config: emulated sources, scratch destinations, kills and API faults."""
    from floe.apps.chaos.scratch import plan
    from floe.apps.chaos.trials import Options, experiment
    from floe.infra.killpoints import parse

    chosen_faults = tuple(f.strip() for f in faults.split(",") if f.strip() and f.strip() != "none")
    try:
        points = tuple(parse(p) for p in (kill_at or "").split(",") if p.strip())
    except ValueError as exc:
        fail(f"--kill-at {exc}")
    if points and not kill:
        fail("--kill-at and --no-kill contradict each other: drop one")
    try:
        cfg = open_config(config)
        chosen = plan(cfg, postgres_url)
        for note in chosen.notes:
            typer.echo(f"note: {note}", err=True)
        report = experiment(cfg, chosen, Options(trials, chosen_faults, kill, kill_at=points, seed=seed, keep=keep),
                            say=lambda line: typer.echo(line, err=True))
    except FloeError as exc:
        fail(str(exc))
    print_report(report)
    if not report.ok:
        fail("floe chaos: the chaos runs differ from the clean run (see above)")
    typer.echo("every table matches the clean run: no duplicates, no losses")


def print_report(report: Report) -> None:
    from rich.table import Table

    table = Table(title="floe chaos")
    for column in ("destination", "stream", "trials", "kills", "faults", "rows", "duplicates", "losses",
                   "changed", "result"):
        table.add_column(column, justify="left" if column in ("destination", "stream", "result") else "right")
    for s in report.streams:
        table.add_row(s.destination, f"{s.source}.{s.stream}", str(s.trials), str(s.kills), str(s.faults),
                      str(s.rows), str(s.duplicates), str(s.losses), str(s.changed),
                      "ok" if s.ok else "DIFFERENT" + (f" ({'; '.join(s.notes)})" if s.notes else ""))
    console.print(table)
    for error in report.errors:
        typer.echo(f"error: {error}", err=True)
