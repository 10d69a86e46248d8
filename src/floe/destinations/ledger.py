"""The per-stream ledger of the SQL warehouses (`_floe_files`) and the pruning of old state versions.

A checkpoint's ledger entries (`core.stream.LEDGER`: for Sailthru, each export file's name and
checksum) are appended to `_floe_files` with the state version that commits them, in the load's
transaction, so a state version holds only the stream's small state however many files it has
loaded. The ledger of a stream is its rows, the latest version winning per entry; undoing versions
(`floe state revert`) deletes their rows, so the older entries count again; a reset deletes them all,
and a full refresh's finishing commit replaces them. `state_history_days` deletes state versions
older than that many days, never the latest.

Functions take the warehouse's qualified table names and parameter placeholder, so every SQL
destination shares them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from floe.core.stream import LEDGER, State

LEDGER_TABLE = "_floe_files"


def ledger_ddl(table: str, text: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {table} (source {text}, stream {text}, entry {text}, value {text}, "
            f"version BIGINT, load_id {text})")


def split_ledger(checkpoint: State | None) -> tuple[State | None, dict[str, Any]]:
    """(the state to store as the version, the ledger entries to append)."""
    if not checkpoint or LEDGER not in checkpoint:
        return checkpoint, {}
    return {k: v for k, v in checkpoint.items() if k != LEDGER}, dict(checkpoint[LEDGER])


def append_entries(cur: Any, table: str, p: str, source: str, stream: str, entries: dict[str, Any],
                   version: int, load_id: str, replace: bool) -> None:
    """Append `entries` as committed by `version` (`replace`: the ledger becomes exactly these)."""
    if replace:
        cur.execute(f"DELETE FROM {table} WHERE source = {p} AND stream = {p}", (source, stream))
    if entries:
        cur.executemany(
            f"INSERT INTO {table} (source, stream, entry, value, version, load_id) VALUES ({p}, {p}, {p}, {p}, {p}, {p})",
            [(source, stream, entry, str(value), version, load_id) for entry, value in entries.items()],
        )


def read_entries(cur: Any, table: str, p: str, source: str, stream: str) -> dict[str, str]:
    """The stream's ledger: each entry's value as its latest version committed it."""
    cur.execute(f"SELECT entry, value FROM {table} WHERE source = {p} AND stream = {p} ORDER BY version",
                (source, stream))
    return {entry: value for entry, value in cur.fetchall()}


def undo_entries(cur: Any, table: str, p: str, source: str, stream: str, after: int) -> None:
    """Delete the entries committed by versions after `after` (0: every entry)."""
    cur.execute(f"DELETE FROM {table} WHERE source = {p} AND stream = {p} AND version > {p}", (source, stream, after))


def prune_versions(cur: Any, state_table: str, p: str, source: str, stream: str, days: int, latest: int) -> None:
    """Delete the stream's state versions committed more than `days` days ago, except `latest`."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    cur.execute(f"DELETE FROM {state_table} WHERE source = {p} AND stream = {p} AND version < {p} "
                f"AND committed_at < {p}", (source, stream, latest, cutoff))


def with_ledger(state: State | None, entries: dict[str, str]) -> State | None:
    """A stored state with the stream's ledger under LEDGER (as streams read it back)."""
    if not entries:
        return state
    return {**(state or {}), LEDGER: entries}
