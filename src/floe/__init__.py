"""floe: warehouse SaaS data exactly once, and sync warehouse facts back into SaaS tools."""

import sys

__version__ = "0.1.0"

# httpx's own command line (httpx._main) imports rich and pygments along with httpx, a tenth of a
# second of every floe start-up; floe never runs it, and without it httpx defines a stub.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
