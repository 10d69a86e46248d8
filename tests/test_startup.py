"""`floe --help` loads none of the heavy libraries: each command imports them where it uses them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pyarrow", "pyarrow.compute", "duckdb", "pydantic", "httpx", "rich", "numpy", "uvicorn", "yaml", "psycopg",
         "boto3", "google.cloud", "asyncio", "floe.engine.runner", "floe.config")

SCRIPT = """
import sys
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
