"""State you can see and set back, for the SQL warehouses (DuckDB, PostgreSQL, Redshift).

`SqlStateOps` adds reading the state (`read_state`, `states`, the ledger folded in),
`Destination.state_log` and `Destination.change_state` to `SqlDestination`; every
SQL destination lists it first among its bases. A change is one transaction: the rows of the loads
after a version are deleted by their `_floe_load_id` (the load ids `_floe_state` names for the later
versions, so nothing but floe's own bookkeeping decides what goes), the new state version is written
on top of the version read under the lease (refused if another commit came in between), and the
change gets its row in `_floe_loads` (status `reverted` or `reset`, the counts in `details`).

`version_of` and `as_utc` turn a log row into a `StateVersion` for every destination.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from floe.core.destination import CommittedState, LoadJob, StateChange, StateVersion, state_conflict
from floe.core.errors import DestinationError
from floe.core.secrets import redact
from floe.destinations import ledger
from floe.destinations.sql import LOADS_TABLE, STATE_TABLE, SqlDestination

# The `_floe_loads` status of each kind of state change, and back.
CHANGE_STATUS = {"revert": "reverted", "reset": "reset"}
ACTIONS = {"committed": "load", **{status: action for action, status in CHANGE_STATUS.items()}}


def as_utc(value: Any) -> datetime | None:
    """A commit time as the warehouses return it (a datetime, ISO text, or BigQuery's epoch seconds)."""
    if value is None or isinstance(value, datetime):
        return value.astimezone(UTC) if value is not None and value.tzinfo else value
    text = str(value)
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        parsed = datetime.fromisoformat(text)
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def version_of(version: Any, committed_at: Any, load_id: str, state: str | None, rows: Any, status: str | None,
               details: str | None) -> StateVersion:
    """A `_floe_state` row joined with its `_floe_loads` row (status, rows and details may be missing)."""
    noted = json.loads(details) if details else {}
    action = ACTIONS.get(status or "committed", status or "load")
    if action == "load" and noted.get("full_refresh"):
        action = "full refresh"
    elif action == "load" and noted.get("backfill"):
        action = "backfill"
    return StateVersion(int(version), as_utc(committed_at), load_id, None if rows is None else int(rows),
                        json.loads(state) if state else None, action, noted)


class SqlStateOps(SqlDestination):
    """The state log, state changes and load log of a SQL warehouse, in its own transactions."""

    def read_state(self, source: str, stream: str) -> CommittedState:
        p = self.placeholder
        self.prepare_meta()
        with self.transaction() as cur:
            cur.execute(
                f"SELECT version, state FROM {self.qualified(self.meta_schema, STATE_TABLE)} "
                f"WHERE source = {p} AND stream = {p} ORDER BY version DESC LIMIT 1",
                (source, stream),
            )
            row = cur.fetchone()
            entries = ledger.read_entries(cur, self.qualified(self.meta_schema, ledger.LEDGER_TABLE), p, source, stream)
        return CommittedState(int(row[0]), ledger.with_ledger(json.loads(row[1]), entries)) if row else CommittedState()

    def states(self) -> list[dict[str, Any]]:
        self.prepare_meta()
        with self.transaction() as cur:
            cur.execute(
                f"SELECT source, stream, version, state, load_id, committed_at FROM "
                f"{self.qualified(self.meta_schema, STATE_TABLE)} s WHERE version = "
                f"(SELECT MAX(version) FROM {self.qualified(self.meta_schema, STATE_TABLE)} m "
                "WHERE m.source = s.source AND m.stream = s.stream) ORDER BY source, stream"
            )
            rows = cur.fetchall()
            cur.execute(f"SELECT source, stream, entry, value FROM "
                        f"{self.qualified(self.meta_schema, ledger.LEDGER_TABLE)} ORDER BY version")
            entries: dict[tuple[str, str], dict[str, str]] = {}
            for source, stream, entry, value in cur.fetchall():
                entries.setdefault((source, stream), {})[entry] = value
        return [
            {"source": r[0], "stream": r[1], "version": r[2], "load_id": r[4], "committed_at": r[5],
             "state": ledger.with_ledger(json.loads(r[3]), entries.get((r[0], r[1]), {}))}
            for r in rows
        ]

    def last_load_status(self, source: str, stream: str, before: datetime) -> str | None:
        p = self.placeholder
        try:
            rows = self.query(
                f"SELECT status FROM {self.qualified(self.meta_schema, LOADS_TABLE)} WHERE source = {p} "
                f"AND stream = {p} AND destination = {p} AND started_at < {p} ORDER BY finished_at DESC LIMIT 1",
                (source, stream, self.name, before),
            )
        except Exception:  # noqa: BLE001 - no bookkeeping table yet: never failed
            return None
        return str(rows[0][0]) if rows else None

    def record_failure(self, job: LoadJob, error: str) -> None:
        try:
            self.prepare_meta()
            with self.transaction() as cur:
                self.write_load_row(cur, job, "failed", redact(error)[:4000], datetime.now(UTC))
        except Exception:  # noqa: BLE001 - bookkeeping must never hide the original error
            pass

    def record_recovery(self, job: LoadJob) -> None:
        self.prepare_meta()
        with self.transaction() as cur:
            self.write_load_row(cur, job, "recovered", None, datetime.now(UTC))

    def state_log(self, source: str, stream: str, limit: int | None = None) -> list[StateVersion]:
        p = self.placeholder
        self.prepare_meta()
        with self.transaction() as cur:
            cur.execute(
                f"SELECT s.version, s.committed_at, s.load_id, s.state, l.rows, l.status, l.details "
                f"FROM {self.qualified(self.meta_schema, STATE_TABLE)} s "
                f"LEFT JOIN {self.qualified(self.meta_schema, LOADS_TABLE)} l ON l.load_id = s.load_id "
                "AND l.source = s.source AND l.stream = s.stream AND l.status IN ('committed', 'reverted', 'reset') "
                f"WHERE s.source = {p} AND s.stream = {p} ORDER BY s.version DESC"
                + (f" LIMIT {int(limit)}" if limit else ""),
                (source, stream),
            )
            rows = cur.fetchall()
        return [version_of(*row) for row in rows]

    def change_state(self, change: StateChange) -> int:
        spec = self.located(change.table)
        target = self.qualified(spec.schema_name, spec.table)
        where, params = self.deleted_rows_sql(change)
        try:
            self.prepare_meta()
            with self.transaction() as cur:
                deleted = 0
                if change.delete_after is not None and self.existing_columns(cur, spec.schema_name, spec.table):
                    cur.execute(f"SELECT COUNT(*) FROM {target}{where}", params)
                    deleted = int(cur.fetchone()[0])
                    if deleted:
                        cur.execute(f"DELETE FROM {target}{where}", params)
                job = change.job(deleted)
                self.write_state(cur, job)
                # the ledger entries of the undone versions go too (a reset: all of them)
                ledger.undo_entries(cur, self.qualified(self.meta_schema, ledger.LEDGER_TABLE), self.placeholder,
                                    change.source, change.stream, 0 if change.state is None else change.delete_after or 0)
                self.write_load_row(cur, job, CHANGE_STATUS[change.action], None, datetime.now(UTC))
        except DestinationError:
            raise
        except Exception as exc:
            if self.is_state_conflict(exc, change.job(0)):
                raise state_conflict(self.name, change.job(0), None) from None
            raise DestinationError(f"{self.name}: {change.action} of {change.source}.{change.stream} failed, "
                                   f"nothing changed: {redact(str(exc)).strip()}") from exc
        return deleted

    def deleted_rows_sql(self, change: StateChange) -> tuple[str, tuple[Any, ...]]:
        """The WHERE clause (with its parameters) of the rows `change` deletes: those whose load committed
        a version after `delete_after` (every row after version 0)."""
        if not change.delete_after:
            return "", ()
        p = self.placeholder
        return (f" WHERE _floe_load_id IN (SELECT load_id FROM {self.qualified(self.meta_schema, STATE_TABLE)} "
                f"WHERE source = {p} AND stream = {p} AND version > {p})",
                (change.source, change.stream, change.delete_after))
