"""`floe demo`: sample data for every source, loaded into demo.duckdb, analytics questions answered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from floe.commands._output import fail, print_summary
from floe.core.errors import FloeError
from floe.infra import logs


def demo_command(
    directory: Annotated[Path, typer.Option(help="Where the sample data and demo.duckdb go.")] = Path("."),
) -> None:
    """Generate sample data, load it into demo.duckdb and answer the analytics questions."""
    from floe.apps.demo import run_demo

    logs.setup()
    try:
        code = run_demo(directory, print_results=print_summary)
    except FloeError as exc:
        fail(str(exc))
    raise typer.Exit(code)
