"""Named points where a `floe run` started by `floe chaos` kills itself: deterministic kills, no timing.

- `batch`: a batch of rows was just written to the stage (nothing of it committed);
- `before-commit`: a load's statements (rows, state, `_floe_loads` row) ran, its COMMIT is not sent;
- `after-commit`: a load's transaction just committed.

`floe chaos` starts each `floe run` child with `FLOE_CHAOS_KILL_AT=POINT:N`: the child sends itself
SIGKILL the Nth time it reaches POINT (counted over all its streams). With `FLOE_CHAOS_TRACE=FILE`
every point reached is appended to FILE, one name a line, so the clean run tells how many of each a
run passes. Without either variable `reached` returns at once.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = ("batch", "before-commit", "after-commit")
KILL_AT = "FLOE_CHAOS_KILL_AT"
TRACE = "FLOE_CHAOS_TRACE"


def parse(text: str) -> tuple[str, int]:
    """`POINT:N` -> (POINT, N); ValueError naming what is wrong."""
    point, _, count = text.strip().partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{text!r}: a kill point is POINT:N, POINT one of {', '.join(POINTS)}, N >= 1")
    return point, int(count)


_lock = threading.Lock()
_counts: dict[str, int] = {}
_trace = os.environ.get(TRACE) or None
_target = parse(os.environ[KILL_AT]) if os.environ.get(KILL_AT) else None


def reached(point: str) -> None:
    """Note that this process is at `point` (one of POINTS); die here if it is the chosen kill point."""
    if _target is None and _trace is None:
        return
    with _lock:
        n = _counts[point] = _counts.get(point, 0) + 1
        if _trace is not None:
            with open(_trace, "a", encoding="utf-8") as out:
                out.write(point + "\n")
        if _target == (point, n):
            os.kill(os.getpid(), signal.SIGKILL)
