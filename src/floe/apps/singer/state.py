"""floe's saved stream states in Singer's form: `{"bookmarks": {stream: state}}` for ONE source.

That is exactly what `floe tap SOURCE --state FILE` reads, so a source loaded by `floe run` can be
continued as a Singer tap (and back) without re-reading anything.
"""

from __future__ import annotations

from typing import Any

from floe.core.errors import ConfigError


def singer_state(states: dict[str, list[dict[str, Any]]], source: str | None = None) -> dict[str, Any]:
    """`states` maps destination name -> its `Destination.states()` rows. Pick one source's bookmarks.

    Without `source`, the only source holding state is used; several destinations holding state for
    the chosen source must be narrowed with --destination (their states may differ)."""
    holders: dict[str, set[str]] = {}
    for dest, rows in states.items():
        for row in rows:
            holders.setdefault(row["source"], set()).add(dest)
    if source is None:
        if len(holders) > 1:
            raise ConfigError(f"--singer: several sources have state ({', '.join(sorted(holders))}): choose one "
                              "with --source")
        source = next(iter(holders), None)
    if source is None or source not in holders:
        return {"bookmarks": {}}
    if len(holders[source]) > 1:
        raise ConfigError(f"--singer: source {source} has state in several destinations "
                          f"({', '.join(sorted(holders[source]))}): choose one with --destination")
    (dest,) = holders[source]
    return {"bookmarks": {r["stream"]: r["state"] for r in states[dest]
                          if r["source"] == source and r["state"] is not None}}  # None: reset, never loaded
