"""Keeps credentials out of logs, errors, state and stage files.

Every secret value floe reads from configuration is registered here; `redact` replaces any
registered value in a text with `***`. The CLI passes every message it prints through `redact`,
and the log formatter does the same, so even a library error that echoes a URL with a password
cannot leak it.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_secrets: set[str] = set()


def register(value: str | None) -> None:
    """Remember `value` as a secret (values shorter than 4 characters are ignored: too many false hits)."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """Return `text` with every registered secret replaced by `***` (longest first)."""
    if not _secrets:
        return text
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text
