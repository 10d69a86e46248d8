"""Checks of local paths that create nothing (for `floe check`): can a run write there?"""

from __future__ import annotations

import os
from pathlib import Path

from floe.core.errors import FloeError


def creatable(path: Path) -> str:
    """What a run would do with `path` (a file or folder it writes): "exists and is writable" or
    "will be created". Raise FloeError when a run could not write there. Creates nothing."""
    if path.exists():
        if not os.access(path, os.W_OK):
            raise FloeError(f"{path}: exists but is not writable")
        return f"{path} exists and is writable"
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FloeError(f"{path}: cannot be created ({parent} is not a writable folder)")
    return f"{path} will be created by the first run"
