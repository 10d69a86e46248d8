"""Replays of a Singer input the target has partly committed already (see `Replay`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from floe.core.stream import State


@dataclass
class Replay:
    """Where the records an append table already holds may start again in this input.

    The table's last commit covered the input up to its STATE `state` plus `skip` records after
    it; `state` was the n-th STATE message, and `records` the number of the table's records, since
    the last STATE line written before that commit. An orchestrator that lost that commit's STATE
    line feeds the tap from the earlier one, so a deterministic tap sends `state` again as the n-th
    STATE of this input (n+1-th if it first repeats the state it was given), after that many of the
    table's records. Until the `window_end`-th STATE, such a STATE marks the table's records before
    it as loaded already. Otherwise the input was started from `state` itself, and only its first
    `skip` records of the table are loaded already."""

    state: Any
    window_end: int
    records: int
    skip: int

    @classmethod
    def of(cls, committed: State | None) -> Replay | None:
        """From the table's committed state; None when its commit saw no STATE (a tap without state)."""
        if not isinstance(committed, dict) or committed.get("singer_state") is None or "records" not in committed:
            return None
        return cls(committed["singer_state"], int(committed.get("state_messages", 0)) + 1,
                   int(committed["records"]), int(committed.get("records_after_state", 0)))

    def marked_by(self, state: Any, received: int) -> bool:
        """Whether a STATE, after `received` records of the table, is where the committed records end."""
        return received == self.records and state == self.state
