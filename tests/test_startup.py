"""`floe --help` loads none of the heavy libraries: each command imports them where it uses them."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

HEAVY = ("pyarrow", "pyarrow.compute", "duckdb", "pydantic", "httpx", "rich", "numpy", "uvicorn", "yaml", "psycopg",
         "boto3", "google.cloud", "asyncio", "floe.engine.runner", "floe.config")

SCRIPT = """
import sys

import pytest
sys.argv = ["floe", "--help"]
from floe.__main__ import main
try:
    main()
except SystemExit:
    pass
print(",".join(name for name in sys.argv[1:] if name in sys.modules), file=sys.stderr)
"""


def test_help_imports_no_heavy_library() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT.replace("sys.argv[1:]", repr(list(HEAVY)))],
                          capture_output=True, text=True, timeout=60)
    assert "Usage: floe" in done.stdout and "run" in done.stdout
    assert done.stderr.strip().splitlines()[-1:] in ([], [""]), f"imported: {done.stderr.strip()}"


def test_httpx_loads_without_its_command_line() -> None:
    """httpx's CLI module imports rich and pygments; floe never runs it."""
    done = subprocess.run([sys.executable, "-c", "import floe, httpx, sys; print('rich' in sys.modules, "
                           "'pygments' in sys.modules, httpx.Client is not None)"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "False", "True"]


@pytest.mark.parametrize("rows", [
    [("twilio", "calls", "2,000", "ok"), ("fs", "events", "0", "FAILED: HTTP 500 from /exports: try again")],
    [],
], ids=["rows", "empty"])
def test_run_summary_is_drawn_as_rich_draws_it(rows: list[tuple[str, ...]]) -> None:
    """The summary table is drawn without rich (a tenth of a second of start-up), to the same text."""
    from rich.console import Console
    from rich.table import Table

    from floe.commands._table import box_table

    columns, right = ("source", "stream", "rows", "status"), frozenset({"rows"})
    drawn = io.StringIO()
    table = Table(title="floe run", title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*row)
    Console(file=drawn, width=200).print(table)
    assert box_table("floe run", columns, rows, right) == drawn.getvalue().rstrip("\n")
