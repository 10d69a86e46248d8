"""The `floe` executable (and `python -m floe`): holds SIGTERM while the CLI loads (see floe.infra.signals),
and ends the process without the interpreter's teardown once the command is done."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading

from floe.infra.signals import hold_sigterm
from floe.infra.startup import pause_gc


def exit_now(code: int | str | None) -> None:
    """End the process as `sys.exit(code)` would, less the interpreter's teardown.

    Tearing down pyarrow, DuckDB, pydantic and the rest (a last garbage collection over every
    object, then each module) costs a fifth of the CPU of a run that finds nothing new. Everything
    a normal exit does that matters still happens first: non-daemon threads are waited for, the
    atexit functions run (logging's flush, multiprocessing's children), stdout and stderr are
    flushed. Destinations are closed by the commands themselves."""
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    # What the interpreter's exit does first: threading's exit calls (thread pools stop taking
    # work), then it waits for every non-daemon thread; then the atexit functions.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code or 0)


def main() -> None:
    hold_sigterm()
    pause_gc()  # until the command line is built (floe.infra.startup)
    from floe.cli import main as cli_main

    try:
        cli_main()
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)


if __name__ == "__main__":
    main()
