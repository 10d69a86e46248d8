"""Start-up without the garbage collector.

Start-up makes objects that live as long as the process (modules, classes, functions, pydantic
models), many of them in reference cycles, and the collector would walk them again and again while
the modules load. The `floe` executable pauses it from its first line (`pause_gc`) until the command
line is built (`resume_gc`): then what start-up made is frozen (moved where later collections never
look: it would survive them anyway) and the collector runs as usual for what the command does.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

_paused = False
M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc at `arenas` arenas (its default: 8 per core), before any thread starts.

    Each thread that allocates gets an arena of its own until the cap, and memory freed in one
    arena serves only the threads of that arena: a run's threads (HTTP, parsing, staging, DuckDB's
    workers) each kept the high-water mark of their own (FullStory bench, 2M events: 394 MB peak
    with the default, 357 MB with 2 arenas, the same CPU). True if glibc took it; False elsewhere
    (musl, macOS), where nothing changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's soname
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def use_system_allocator() -> None:
    """Arrow allocates with malloc (its system memory pool) instead of its default, mimalloc, which
    keeps freed buffers for reuse: parsed pages and batches come and go all run long, and with
    mimalloc the peak RSS held what they once took (Twilio bench, 200,000 calls: 355–372 MB with
    mimalloc, 281–285 MB with the system pool, the same CPU). Set before pyarrow is imported it
    costs no import; `ARROW_DEFAULT_MEMORY_POOL` set by the user wins."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if "pyarrow" in sys.modules and os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system":
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())


def single_threaded_blas() -> None:
    """numpy's OpenBLAS runs on one thread. floe does no linear algebra, but at import OpenBLAS starts
    a thread per core that spins for work: ~0.1 CPU s of every process that imports numpy (pyarrow's
    conversions, the Singer fast path), taken from the run's own threads. Set before numpy is
    imported; `OPENBLAS_NUM_THREADS` set by the user wins."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pause_gc() -> None:
    """No garbage collection until `resume_gc` (nothing happens if it is already off)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """Freeze what exists now and collect again; a no-op unless `pause_gc` turned the collector off."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
