"""Start-up: `floe --help` and a run that finds nothing new load none of the heavy libraries (each
command, and each function, imports them where it uses them); only the command argv names is imported."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
import typer
from typer.testing import CliRunner

from floe import cli

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


# Runs `floe ARGS` as the executable does; at exit, prints which of WATCHED were imported, and whether
# the garbage collector is on again (start-up pauses it).
WATCH_SCRIPT = """
import atexit, gc, sys
sys.argv = ["floe", *ARGS]
def report():
    loaded = sorted(name for name in sys.modules if name in WATCHED or name.startswith("floe.commands."))
    print("imported:" + ",".join(loaded) + " gc:" + str(gc.isenabled()), file=sys.stderr, flush=True)
atexit.register(report)
from floe.__main__ import main
main()
"""
NOT_FOR_NOTHING = ("pyarrow", "pyarrow.compute", "numpy", "httpx", "httpcore")


def watched_run(args: list[str], cwd: Path, watched: tuple[str, ...] = NOT_FOR_NOTHING,
                ) -> tuple[subprocess.CompletedProcess[str], list[str], bool]:
    """`floe ARGS` in a child process: the process, the watched modules it imported, and whether GC ended on."""
    script = WATCH_SCRIPT.replace("ARGS", repr(args)).replace("WATCHED", repr(set(watched)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd)
    line = next(line for line in done.stderr.splitlines() if line.startswith("imported:"))
    names, _, gc_on = line.removeprefix("imported:").partition(" gc:")
    return done, [n for n in names.split(",") if n], gc_on == "True"


def test_help_and_version_import_no_command_module(tmp_path: Path) -> None:
    for args in (["--help"], ["--version"], []):
        done, imported, gc_on = watched_run(args, tmp_path)
        assert imported == [] and gc_on, (args, imported, done.stderr)
    assert "Usage: floe" in watched_run(["--help"], tmp_path)[0].stdout


def test_a_run_that_finds_nothing_new_imports_no_heavy_library(
        tmp_path: Path, fullstory_config: Callable[..., Path]) -> None:
    """The second run of a FullStory source whose windows are all loaded: it reads the state from the
    DuckDB file, loads nothing, prints its summary and exits 0, without pyarrow, numpy or httpx."""
    config = fullstory_config(end_time="2024-01-01T01:00:00Z")
    first = subprocess.run([sys.executable, "-m", "floe", "run", "-c", str(config)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    db = tmp_path / "w.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        loaded = con.sql('SELECT count(*) FROM fs.events').fetchall()[0][0]
    assert loaded > 0

    done, imported, gc_on = watched_run(["run", "-c", str(config)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert imported == ["floe.commands._output", "floe.commands._table", "floe.commands.run"], imported
    assert gc_on
    summary = [line for line in done.stdout.splitlines() if " fs " in line]
    assert len(summary) == 1 and "events" in summary[0] and " 0 " in summary[0] and "ok" in summary[0], done.stdout
    with duckdb.connect(str(db), read_only=True) as con:  # the state said: nothing left to read
        assert con.sql('SELECT count(*) FROM fs.events').fetchall()[0][0] == loaded


def test_a_run_that_loads_imports_what_it_needs(tmp_path: Path, fullstory_config: Callable[..., Path]) -> None:
    """The same check sees the heavy libraries when a run does load: it can fail."""
    config = fullstory_config(end_time="2024-01-01T01:00:00Z")
    done, imported, _ = watched_run(["run", "-c", str(config)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert {"pyarrow", "pyarrow.compute", "numpy", "httpx", "httpcore"} <= set(imported), imported


def test_the_command_table_says_what_each_command_says() -> None:
    """`floe --help` lists the commands from COMMANDS without importing them: each entry's help is the
    first paragraph of the command's own help, and the listing is the one of the app with every command."""
    for name in cli.COMMANDS:
        target = cli.load(name)
        own = target.info.help if isinstance(target, typer.Typer) else inspect.getdoc(target)
        assert own is not None and own.split("\n\n")[0] == cli.COMMANDS[name].help, name
    listed = CliRunner().invoke(cli.build_app(set()), ["--help"], terminal_width=200)
    every = CliRunner().invoke(cli.build_app(cli.COMMANDS), ["--help"], terminal_width=200)
    assert listed.exit_code == every.exit_code == 0
    assert listed.output == every.output and "discover" in listed.output and "state" in listed.output


@pytest.mark.parametrize("args", [["run", "--help"], ["state", "show", "--help"], ["--help"], ["nope"]])
def test_one_command_loaded_answers_as_every_command_loaded(args: list[str]) -> None:
    one = CliRunner().invoke(cli.build_app(cli.wanted(args)), args, terminal_width=120)
    every = CliRunner().invoke(cli.build_app(cli.COMMANDS), args, terminal_width=120)
    assert (one.exit_code, one.output) == (every.exit_code, every.output)
    assert cli.wanted(args) == ({args[0]} if args[0] in cli.COMMANDS else set())


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


ARENAS = """
import ctypes, sys, tempfile, threading
from floe.infra.startup import limit_malloc_arenas
if sys.argv[1] == "capped":
    assert limit_malloc_arenas()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
go, done = threading.Barrier(9), threading.Barrier(9)
def work():
    go.wait()
    blocks = [libc.malloc(4096) for _ in range(100)]  # each thread's first malloc picks its arena
    done.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
go.wait(); done.wait()
for t in threads:
    t.join()
with tempfile.NamedTemporaryFile("r") as f:
    libc.fopen.restype = ctypes.c_void_p
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp)); libc.fclose(ctypes.c_void_p(fp))
    print(f.read().count("<heap nr="))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_floe_caps_glibc_malloc_arenas():
    # Threads allocating at once get an arena each (glibc: up to 8 per core) unless capped at two.
    def arenas(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=60, check=True)
        return int(out.stdout)

    assert arenas("default") > 2
    assert arenas("capped") <= 2


POOL = """
import os, sys
if sys.argv[1] == "chosen":
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "mimalloc"
if sys.argv[1] == "imported":
    import pyarrow
from floe.infra.startup import use_system_allocator
use_system_allocator()
import pyarrow as pa
print(pa.default_memory_pool().backend_name)
"""


@pytest.mark.parametrize("case,backend", [("fresh", "system"), ("imported", "system"), ("chosen", "mimalloc")])
def test_arrow_allocates_with_malloc_unless_the_user_chose_a_pool(case: str, backend: str) -> None:
    # mimalloc, Arrow's default here, keeps freed buffers: a run's peak RSS held what parsed pages once took.
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", POOL, case], capture_output=True, text=True, timeout=60, check=True,
                         env=env)
    assert out.stdout.strip() == backend


BLAS = """
import os, sys
from floe.infra.startup import single_threaded_blas
if sys.argv[1] != "default":
    single_threaded_blas()
import numpy
print(len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(sys.platform != "linux" or (os.cpu_count() or 1) < 2, reason="counts threads in /proc")
@pytest.mark.parametrize("case,env,single", [("default", {}, False), ("floe", {}, True),
                                             ("floe", {"OPENBLAS_NUM_THREADS": "2"}, False)])
def test_numpy_blas_runs_on_one_thread_unless_the_user_chose(case: str, env: dict[str, str], single: bool) -> None:
    # OpenBLAS starts a spinning thread per core when numpy is imported: ~0.1 CPU s of every run.
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", BLAS, case], capture_output=True, text=True, timeout=60, check=True,
                         env=base | env)
    assert (int(out.stdout) == 1) is single
