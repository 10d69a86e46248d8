"""SIGTERM while floe is still starting up.

Importing the command line takes about a second. A SIGTERM then would kill the process with the
default action (status 143) before `floe serve` has installed its own handler, which lets the load
in progress commit and exits 0. So the `floe` executable holds SIGTERM from its first line
(`hold_sigterm`): `floe serve` honours a held SIGTERM like a later one (`sigterm_held`), every
other command gets the default action back at once (`release_sigterm`), a held signal included.
"""

from __future__ import annotations

import os
import signal

_held: list[int] = []
_holding = False


def hold_sigterm() -> None:
    """Note SIGTERM instead of dying of it, until `release_sigterm` (or a command's own handler)."""
    global _holding
    _holding = True
    signal.signal(signal.SIGTERM, lambda signum, frame: _held.append(signum))


def release_sigterm() -> None:
    """Back to the default action; a SIGTERM held meanwhile ends the process now, as it would have."""
    global _holding
    if not _holding:
        return
    _holding = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _held:
        os.kill(os.getpid(), signal.SIGTERM)


def sigterm_held() -> bool:
    """Whether a SIGTERM came while it was held."""
    return bool(_held)
