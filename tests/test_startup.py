"""`floe --help` loads none of the heavy libraries: each command imports them where it uses them."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("pyarrow", "pyarrow.compute", "duckdb", "pydantic", "httpx", "rich", "numpy", "uvicorn", "yaml", "psycopg",
         "boto3", "google.cloud", "asyncio", "floe.engine.runner", "floe.config")

SCRIPT = """
import sys
from pathlib import Path

import pytest
sys.argv = ["floe", "--help"]
from floe.cli import main
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


EXIT_SCRIPT = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
sys.argv = ["floe", *ARGS]
atexit.register(lambda: print("atexit ran", flush=True))
pool = ThreadPoolExecutor(1)  # never shut down: the exit still stops it
pool.submit(lambda: None).result()
threading.Thread(target=lambda: (time.sleep(0.3), Path(OUT).write_text("done"))).start()
class Garbage:
    def __del__(self):
        print("torn down", flush=True)
garbage = Garbage()  # collected only by the interpreter's teardown
from floe.__main__ import main
main()
print("not reached")
"""


@pytest.mark.parametrize(("args", "code", "says"), [(["--version"], 0, "floe "), (["run", "-c", "missing.yml"], 1, "error:")])
def test_the_executable_exits_with_the_command_status_after_threads_and_atexit(
        tmp_path: Path, args: list[str], code: int, says: str) -> None:
    """`floe` skips the interpreter's teardown (a fifth of a no-op run's CPU), not what a normal exit does first."""
    out = tmp_path / "thread.txt"
    script = EXIT_SCRIPT.replace("ARGS", repr(args)).replace("OUT", repr(str(out)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert says in done.stdout + done.stderr and "not reached" not in done.stdout and "torn down" not in done.stdout
    assert done.stdout.rstrip().endswith("atexit ran") and out.read_text() == "done"
