"""Start-up without the garbage collector.

Start-up makes objects that live as long as the process (modules, classes, functions, pydantic
models), many of them in reference cycles, and the collector would walk them again and again while
the modules load. The `floe` executable pauses it from its first line (`pause_gc`) until the command
line is built (`resume_gc`): then what start-up made is frozen (moved where later collections never
look: it would survive them anyway) and the collector runs as usual for what the command does.
"""

from __future__ import annotations

import gc

_paused = False


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
