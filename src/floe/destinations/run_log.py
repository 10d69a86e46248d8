"""The run log (`_floe_runs`, see floe.core.runs) of every destination kind.

`SqlRunLog` keeps it in a table beside `_floe_state` (DuckDB, PostgreSQL, Redshift; BigQuery writes the
same rows through its jobs API with `RUNS_COLUMNS`); `ObjectRunLog` keeps one JSON object per run
under `_floe_runs/` for the files destination. A run's row is rewritten when the run ends.
"""

from __future__ import annotations

import json
from typing import Any

from floe.core.runs import RunRecord
from floe.destinations.sql import LOADS_TABLE, SqlDestination
from floe.destinations.state_ops import as_utc
from floe.infra.objectstore import ObjectStore

RUNS_TABLE = "_floe_runs"
# (column, kind): kind is "text", "timestamp" or "int"; the order of `run_values` and `run_of`.
RUNS_COLUMNS = (("run_id", "text"), ("destination", "text"), ("started_at", "timestamp"),
                ("finished_at", "timestamp"), ("status", "text"), ("streams", "int"), ("failed", "int"),
                ("rows", "int"), ("commits", "int"), ("error", "text"), ("details", "text"))


def run_values(run: RunRecord) -> tuple[Any, ...]:
    """The record as the values of a `_floe_runs` row, in `RUNS_COLUMNS` order."""
    return (run.run_id, run.destination, run.started_at, run.finished_at, run.status, run.streams, run.failed,
            run.rows, run.commits, run.error, json.dumps(run.details, sort_keys=True) if run.details else None)


def run_of(row: tuple[Any, ...] | list[Any]) -> RunRecord:
    """A `_floe_runs` row (in `RUNS_COLUMNS` order) as a record."""
    run_id, destination, started, finished, status, streams, failed, rows, commits, error, details = row
    started_at = as_utc(started)
    assert started_at is not None
    return RunRecord(str(run_id), str(destination), started_at, as_utc(finished), status, int(streams or 0),
                     int(failed or 0), int(rows or 0), int(commits or 0), error,
                     json.loads(details) if details else {})


def is_missing_table(exc: Exception) -> bool:
    """True if `exc` says a table does not exist (no run log yet), as the warehouses word it."""
    text = str(exc).lower()
    return "does not exist" in text or "not found" in text or "no such table" in text


class SqlRunLog(SqlDestination):
    """`_floe_runs` of a DB-API warehouse, created with floe's other tables (and `_floe_loads.run_id`
    added to a load log made before run ids)."""

    def meta_ddl(self) -> list[str]:
        kinds = {"text": self.text_type, "timestamp": self.timestamp_tz_type, "int": "BIGINT"}
        columns = ", ".join(f"{name} {kinds[kind]}" for name, kind in RUNS_COLUMNS)
        return [*super().meta_ddl(), f"CREATE TABLE IF NOT EXISTS {self.qualified(self.meta_schema, RUNS_TABLE)} "
                                     f"({columns})"]

    def upgrade_meta(self, cur: Any) -> None:
        super().upgrade_meta(cur)
        if "run_id" not in self.existing_columns(cur, self.meta_schema, LOADS_TABLE):  # made before run ids
            cur.execute(f"ALTER TABLE {self.qualified(self.meta_schema, LOADS_TABLE)} ADD COLUMN run_id {self.text_type}")

    def record_run(self, run: RunRecord) -> None:
        p, table = self.placeholder, self.qualified(self.meta_schema, RUNS_TABLE)
        self.prepare_meta()
        with self.transaction() as cur:
            cur.execute(f"DELETE FROM {table} WHERE run_id = {p} AND destination = {p}", (run.run_id, self.name))
            cur.execute(f"INSERT INTO {table} ({', '.join(name for name, _ in RUNS_COLUMNS)}) "
                        f"VALUES ({', '.join([p] * len(RUNS_COLUMNS))})", run_values(run))

    def runs(self, limit: int = 20) -> list[RunRecord]:
        try:
            rows = self.query(f"SELECT {', '.join(name for name, _ in RUNS_COLUMNS)} FROM "
                              f"{self.qualified(self.meta_schema, RUNS_TABLE)} WHERE destination = {self.placeholder}"
                              f" ORDER BY started_at DESC, run_id DESC LIMIT {int(limit)}", (self.name,))
        except Exception as exc:
            if is_missing_table(exc):
                return []
            raise
        return [run_of(row) for row in rows]


class ObjectRunLog:
    """`_floe_runs/<run id>.json` in an object store (run ids sort by start time)."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix.rstrip("/")

    def record(self, run: RunRecord) -> None:
        self.store.put_bytes(f"{self.prefix}/{run.run_id}.json", json.dumps(run.as_json()).encode())

    def last(self, limit: int) -> list[RunRecord]:
        keys = sorted((key for key, _ in self.store.list(self.prefix + "/") if key.endswith(".json")), reverse=True)
        records = [json.loads(data) for key in keys[:limit] if (data := self.store.get_bytes(key))]
        return [run_of([r[name] for name, _ in RUNS_COLUMNS[:-1]] + [json.dumps(r["details"])]) for r in records]
