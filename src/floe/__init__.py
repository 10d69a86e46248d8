"""floe: warehouse SaaS data exactly once, and sync warehouse facts back into SaaS tools.

As a library: `floe.run(config, streams=None, destination=None)` and `floe.sync(config, syncs=None)`
(docs/python.md). They import the engine when called, so `import floe` stays cheap.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from floe.apps.api import RunResult, SyncResult

__version__ = "0.1.0"
__all__ = ["__version__", "run", "sync"]

# httpx's own command line (httpx._main) imports rich and pygments along with httpx, a tenth of a
# second of every floe start-up; floe never runs it, and without it httpx defines a stub.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def run(config: Any, streams: Any = None, destination: Any = None, **options: Any) -> RunResult:
    """Load streams as `floe run` does; see `floe.apps.api.run`."""
    from floe.apps import api

    return api.run(config, streams, destination, **options)


def sync(config: Any, syncs: Any = None, **options: Any) -> SyncResult:
    """Run syncs as `floe sync` does; see `floe.apps.api.sync`."""
    from floe.apps import api

    return api.sync(config, syncs, **options)
