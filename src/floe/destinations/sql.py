"""What SQL warehouses share: DDL from Arrow schemas, delete+insert merge, state and load bookkeeping.

A SQL destination subclasses `SqlDestination` and supplies data (its type map, quoting,
capability flags) plus three hooks: `connect`, `stage_rows` (bulk-load the job's files into a
staging relation) and, if needed, `existing_columns`. The transaction in `load` is the same for
every warehouse, so it is tested for real on DuckDB and PostgreSQL.

Concurrent runs: `_floe_state` versions are unique per stream (a unique index where the warehouse
has one), and a commit checks inside its transaction that the version it builds on is still the
latest. floe's own tables and a source's schema are created in short transactions of their own;
two sessions creating the same object at once (`is_ddl_race`) retry instead of failing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from floe.core.destination import (
    Destination,
    LoadJob,
    StagedFile,
    TableSpec,
    arrow_type_key,
    is_json,
    refresh_copy,
    state_conflict,
)
from floe.core.errors import DestinationError
from floe.core.secrets import redact
from floe.core.stream import RefreshScope
from floe.destinations import drift, ledger, merge, schema_changes
from floe.destinations.column_types import ColumnRules
from floe.destinations.merge import STANDARD, MergeStyle
from floe.destinations.rejected import RowRules, insert_rejected, quarantined
from floe.destinations.schema_changes import SchemaPlan, Widening, log_changes, routed
from floe.destinations.state_index import STATE_TABLE, index_state_versions
from floe.infra import killpoints

if TYPE_CHECKING:
    import pyarrow as pa

LOADS_TABLE = "_floe_loads"
LEASES_TABLE = "_floe_leases"
RACE_RETRIES = 5
log = logging.getLogger("floe.sql")
T = TypeVar("T")


class SqlDestination(Destination):
    """Shared load transaction for DB-API warehouses (DuckDB, PostgreSQL, Redshift)."""

    # --- per-warehouse data -------------------------------------------------------------
    type_map: ClassVar[dict[str, str]]  # keys: see `arrow_type_key`
    column_rules: ClassVar[ColumnRules]  # which column types hold which staged types exactly
    widening: ClassVar[Widening] = Widening()  # how a column changes type (in the load's transaction)
    json_type: ClassVar[str] = "JSON"
    text_type: ClassVar[str] = "VARCHAR"
    timestamp_tz_type: ClassVar[str] = "TIMESTAMPTZ"
    meta_schema: ClassVar[str] = "main"  # where _floe_state and _floe_loads live
    merge_style: ClassVar[MergeStyle] = STANDARD  # how the disposition statements are written
    placeholder: ClassVar[str] = "?"
    group_size = 100  # tables per transaction (PostgreSQL's max_locks_per_transaction bounds how many)
    now_sql: ClassVar[str] = "CURRENT_TIMESTAMP"  # the server's clock, in statements that read tables
    keeps_ledger: ClassVar[bool] = True  # `_floe_files` (see `ledger`)
    unique_state_versions: ClassVar[bool] = True  # a unique index on _floe_state (source, stream, version)
    records_drift: ClassVar[bool] = True  # see destinations/drift.py
    lock_state_sql: ClassVar[str | None] = None  # run before the version check ({table}: _floe_state)

    def __init__(self, name: str, config: Any, context: Any = None) -> None:
        super().__init__(name, config, context)
        self._conn: Any = None
        self._lock = threading.Lock()  # one load at a time per connection
        self._meta_ready = False
        self._schemas: set[str] = set()  # created (or found) by this instance

    # --- hooks ---------------------------------------------------------------------------
    @abstractmethod
    def connect(self) -> Any:
        """Open a DB-API connection with autocommit off."""

    @abstractmethod
    def stage_rows(self, cur: Any, job: LoadJob, staging: str) -> str:
        """Bulk-load the job's files into a staging relation named `staging`.

        Returns the SQL expression that orders staged rows by arrival (later rows win a merge)."""

    def is_ddl_race(self, exc: Exception) -> bool:
        """True if `exc` says another session created the same schema, table or column at the same
        time (the transaction is rolled back and run again)."""
        return False

    def is_state_conflict(self, exc: Exception, job: LoadJob) -> bool:
        """True if `exc` is the unique index on `_floe_state` refusing `job`'s version: another run
        committed it first."""
        return False

    def existing_columns(self, cur: Any, schema: str, table: str) -> dict[str, str]:
        """Each column of the table (none: no table) with its type as the warehouse reports it,
        a decimal's precision and scale included (`NUMERIC(12,2)`)."""
        cur.execute(
            "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns "
            f"WHERE table_schema = {self.placeholder} AND table_name = {self.placeholder}",
            (schema, table),
        )
        columns = {}
        for name, data_type, precision, scale in cur.fetchall():
            exact = data_type.lower() in ("numeric", "decimal") and precision is not None
            columns[name] = f"{data_type}({precision},{scale or 0})" if exact else data_type
        return columns

    # --- SQL building (pure, testable) ----------------------------------------------------
    @staticmethod
    def quote(identifier: str) -> str:
        return '"' + identifier.replace('"', '""') + '"'

    def located(self, spec: TableSpec) -> TableSpec:
        """The spec with the schema this destination puts the source's tables in (see PostgreSQL's
        `schema_prefix`)."""
        return spec

    def schema_ref(self, schema: str) -> str:
        """A schema as named in CREATE SCHEMA (DuckDB adds its catalog)."""
        return self.quote(schema)

    def qualified(self, schema: str, table: str) -> str:
        return f"{self.quote(schema)}.{self.quote(table)}"

    def column_type(self, f: pa.Field) -> str | None:
        """The warehouse type of an Arrow field; None for all-null columns (typed when data arrives)."""
        import pyarrow as pa

        if is_json(f):
            return self.json_type
        return self.type_map.get(arrow_type_key(f.type), self.text_type) if not pa.types.is_null(f.type) else None

    def create_table_sql(self, spec: TableSpec) -> str:
        cols = [
            f"{self.quote(f.name)} {t}" for f in spec.columns if (t := self.column_type(f)) is not None
        ]
        cols += [f"_floe_load_id {self.text_type}", f"_floe_loaded_at {self.timestamp_tz_type}"]
        return f"CREATE TABLE IF NOT EXISTS {self.qualified(spec.schema_name, spec.table)} ({', '.join(cols)})"

    def add_column_sql(self, spec: TableSpec, f: pa.Field) -> str:
        return (
            f"ALTER TABLE {self.qualified(spec.schema_name, spec.table)} "
            f"ADD COLUMN {self.quote(f.name)} {self.column_type(f)}"
        )

    def insert_columns(self, spec: TableSpec) -> list[str]:
        import pyarrow as pa

        return [f.name for f in spec.columns if not pa.types.is_null(f.type)]

    def staged_keys_unique(self, cur: Any, spec: TableSpec, staging: str) -> bool:
        """True if a merge's staged rows hold each primary key once (NULLs group together).

        Reads only the key columns; when true, the merge skips ranking every staged row."""
        if spec.disposition != "merge" or not spec.primary_key:
            return False
        keys = self.merge_style.distinct_keys.format(keys=", ".join(self.quote(k) for k in spec.primary_key))
        cur.execute(f"SELECT 1 FROM {staging} GROUP BY {keys} HAVING COUNT(*) > 1 LIMIT 1")
        return cur.fetchone() is None

    def value_sql(self, f: pa.Field) -> str:
        """How a staged column is read into the target, from the incoming rows (`merge_style.alias`)."""
        return f"{self.merge_style.alias}.{self.quote(f.name)}"

    def disposition_sql(
        self, spec: TableSpec, staging: str, order: str, load_id: str, unique_keys: bool = False
    ) -> list[str]:
        """The statements that move staged rows into the target, in order (see `floe.destinations.merge`).

        `unique_keys`: the caller checked that no primary key occurs twice among the staged rows,
        so a merge reads them directly instead of first ranking every row (a full copy)."""
        import pyarrow as pa

        columns = [(self.quote(f.name), self.value_sql(f)) for f in spec.columns if not pa.types.is_null(f.type)]
        return merge.disposition_sql(
            self.merge_style, spec, self.qualified(spec.schema_name, spec.table), staging, columns=columns,
            order=order, load_id=f"'{load_id}'", now=self.now_sql, quote=self.quote, unique_keys=unique_keys)

    def views_sql(self, spec: TableSpec) -> list[str]:
        """Recreate the stream's views (TableSpec.views) over the target; drop+create so new columns show."""
        statements: list[str] = []
        columns = ", ".join(self.quote(c) for c in [*self.insert_columns(spec), "_floe_load_id", "_floe_loaded_at"])
        for name, template in spec.views:
            view = self.qualified(spec.schema_name, name)
            sql = template.format(table=self.qualified(spec.schema_name, spec.table), columns=columns)
            statements += [f"DROP VIEW IF EXISTS {view}", f"CREATE VIEW {view} AS {sql}"]
        return statements

    def meta_ddl(self) -> list[str]:
        t, ts = self.text_type, self.timestamp_tz_type
        return [
            ledger.ledger_ddl(self.qualified(self.meta_schema, ledger.LEDGER_TABLE), t),
            f"CREATE TABLE IF NOT EXISTS {self.qualified(self.meta_schema, STATE_TABLE)} ("
            f"source {t}, stream {t}, version BIGINT, state {t}, load_id {t}, committed_at {ts})",
            f"CREATE TABLE IF NOT EXISTS {self.qualified(self.meta_schema, LOADS_TABLE)} ("
            f"load_id {t}, source {t}, stream {t}, destination {t}, rows BIGINT, started_at {ts}, "
            f"finished_at {ts}, status {t}, error {t}, details {t}, run_id {t})",
            drift.drift_ddl(self.qualified(self.meta_schema, drift.DRIFT_TABLE), drift.DriftSql(text_type=t)),
        ]

    def upgrade_meta(self, cur: Any) -> None:  # noqa: B027 - optional hook
        """Bring floe's own tables, as an older floe made them, up to date (in prepare_meta's transaction)."""

    # --- the transaction --------------------------------------------------------------------
    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = self.connect()
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on any error."""
        with self._lock:
            cur = self.conn.cursor()
            self.begin(cur)
            try:
                yield cur
            except BaseException:
                self.rollback(cur)
                raise
            else:
                self.commit(cur)
            finally:
                cur.close()

    def retrying_races(self, work: Callable[[], T]) -> T:
        """`work()`, run again (up to RACE_RETRIES times) while it fails on a DDL race."""
        for attempt in range(RACE_RETRIES):
            try:
                return work()
            except Exception as exc:
                if attempt + 1 == RACE_RETRIES or not self.is_ddl_race(exc):
                    raise
                log.info("event=ddl_race destination=%s attempt=%d error=%s", self.name, attempt + 1,
                         redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)
                time.sleep(0.05 * 2**attempt * (1 + random.random()))
        raise AssertionError("unreachable")

    def prepare_meta(self) -> None:
        """Create `_floe_state` (with its unique version index), `_floe_loads` and the warehouse's
        other meta tables once per instance, each in a short transaction of its own."""
        if self._meta_ready:
            return

        def create() -> None:
            with self.transaction() as cur:
                cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema_ref(self.meta_schema)}")
                for statement in self.meta_ddl():
                    cur.execute(statement)
                self.upgrade_meta(cur)

        self.retrying_races(create)
        self._schemas.add(self.meta_schema)
        if self.unique_state_versions:
            self.retrying_races(lambda: index_state_versions(self))
        self._meta_ready = True

    def ensure_schema(self, schema: str) -> None:
        """Create `schema` if it is missing, in a transaction of its own (once per instance)."""
        if schema in self._schemas:
            return

        def create() -> None:
            with self.transaction() as cur:
                cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema_ref(schema)}")

        self.retrying_races(create)
        self._schemas.add(schema)

    def begin(self, cur: Any) -> None:
        """Start a transaction (drivers with implicit transactions need nothing)."""

    def commit(self, cur: Any) -> None:
        self.conn.commit()

    def rollback(self, cur: Any) -> None:
        self.conn.rollback()

    def ensure_table(self, cur: Any, spec: TableSpec, staged: Sequence[StagedFile] = ()) -> SchemaPlan:
        """Create the table, or evolve it by the stream's `schema_changes` (floe.destinations.schema_changes):
        add columns, widen them, plan variant columns. Never drops or narrows a column: raises
        DestinationError if a column would not hold the spec's or a staged file's values exactly."""
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema_ref(spec.schema_name)}")
        return schema_changes.ensure_sql_table(self, cur, spec, staged)

    def load(self, job: LoadJob) -> None:
        self.load_group([job])

    def row_rules(self) -> RowRules:
        """The values this warehouse cannot store (what `bad_rows: quarantine` leaves out)."""
        return RowRules()

    def load_group(self, jobs: list[LoadJob]) -> None:
        """The jobs (less the rows their streams quarantine) committed by `commit_group`."""
        with quarantined(jobs, self.row_rules(), self.name) as checked:
            self.commit_group(checked)

    def commit_group(self, jobs: list[LoadJob]) -> None:
        """Every job's `load_step` in ONE transaction: all of them are committed, or none.

        floe's own tables and the jobs' schemas are created first, in short transactions of their own;
        a transaction that lost a DDL race to another session is run again."""
        current: LoadJob | None = None

        def commit() -> None:
            nonlocal current
            with self.transaction() as cur:
                for current in jobs:
                    self.load_step(cur, current)
                current = None  # a failure from here on is the commit's
                killpoints.reached("before-commit")
            killpoints.reached("after-commit")

        try:
            self.prepare_meta()
            for schema in dict.fromkeys(job.table.schema_name for job in jobs):
                self.ensure_schema(schema)
            self.retrying_races(commit)
            for job in jobs:
                log_changes(self.name, job)
        except DestinationError:
            raise
        except Exception as exc:
            conflict = next((job for job in jobs if self.is_state_conflict(exc, job)), None)
            if conflict is not None:
                raise state_conflict(self.name, conflict, None) from None
            names = [f"{j.table.schema_name}.{j.table.table}" for j in jobs]
            failed = f"{current.table.schema_name}.{current.table.table}" if current else ", ".join(names)
            others = [n for n in names if n != failed] if current else []
            held = f" (nor of {', '.join(others)}, in the same transaction)" if others else ""
            raise DestinationError(
                f"{self.name}: loading {failed} failed, nothing committed{held}: {redact(str(exc)).strip()}"
            ) from exc

    def load_step(self, cur: Any, job: LoadJob) -> None:
        """One job inside the caller's transaction: table, rows by the disposition, views, state, load row.

        A full refresh's job (`job.refresh`) loads into the table's refresh copy and writes no state."""
        if job.refresh:  # its rows wait in the refresh copy until finish_refresh
            job = dataclasses.replace(job, table=refresh_copy(job.table))
        with routed(job, self.ensure_table(cur, job.table, job.files)) as job:
            spec = job.table
            if job.replaces is not None:  # a backfill: the range's rows go, its re-read rows come in
                where, params = self.scope_sql(job.replaces)
                cur.execute(f"DELETE FROM {self.qualified(spec.schema_name, spec.table)} WHERE {where}", params)
            if job.files or spec.disposition == "replace":
                staging = f"_floe_staging_{job.load_id.replace('-', '_')}"
                order = self.stage_rows(cur, job, staging)
                unique_keys = self.staged_keys_unique(cur, spec, staging)
                late = self.drift_statement(job, staging)
                if late and late.before_rows:
                    cur.execute(late.sql, late.params)
                for statement in self.disposition_sql(spec, staging, order, job.load_id, unique_keys):
                    cur.execute(statement)
                if late and not late.before_rows:
                    cur.execute(late.sql, late.params)
                self.drop_staging(cur, staging)
        for statement in self.views_sql(spec):
            cur.execute(statement)
        insert_rejected(self, cur, job)
        if not job.refresh:
            self.write_state(cur, job)
        self.write_load_row(cur, job, "refreshing" if job.refresh else "committed", None, datetime.now(UTC))

    # --- full refresh: rows wait in a copy of the table, which replaces its rows in one commit -----
    def begin_refresh(self, spec: TableSpec) -> None:
        copy = refresh_copy(self.located(spec))
        self.ensure_schema(copy.schema_name)
        with self.transaction() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {self.qualified(copy.schema_name, copy.table)}")

    def finish_refresh(self, job: LoadJob, scope: RefreshScope | None = None) -> None:
        spec = self.located(job.table)
        copy = refresh_copy(spec)
        target, rows = self.qualified(spec.schema_name, spec.table), self.qualified(copy.schema_name, copy.table)
        try:
            self.prepare_meta()
            with self.transaction() as cur:
                if self.ensure_table(cur, spec, job.files).reshaped:
                    raise schema_changes.variant_refresh_error(self.name, spec)
                names = [c for c in self.existing_columns(cur, copy.schema_name, copy.table)
                         if c not in ("_floe_load_id", "_floe_loaded_at")]
                columns = "".join(f"{self.quote(c)}, " for c in names)
                if scope is None:
                    cur.execute(f"DELETE FROM {target}")
                else:
                    where, params = self.scope_sql(scope)
                    cur.execute(f"DELETE FROM {target} WHERE {where}", params)
                cur.execute(f"INSERT INTO {target} ({columns}_floe_load_id, _floe_loaded_at) "
                            f"SELECT {columns}'{job.load_id}', {self.now_sql} FROM {rows}")
                cur.execute(f"DROP TABLE {rows}")
                for statement in self.views_sql(spec):
                    cur.execute(statement)
                self.write_state(cur, job)
                self.write_load_row(cur, job, "committed", None, datetime.now(UTC))
        except DestinationError:
            raise
        except Exception as exc:
            if self.is_state_conflict(exc, job):
                raise state_conflict(self.name, job, None) from None
            raise DestinationError(
                f"{self.name}: replacing {spec.schema_name}.{spec.table} by its full refresh failed, nothing "
                f"committed: {redact(str(exc)).strip()}"
            ) from exc

    def scope_sql(self, scope: RefreshScope) -> tuple[str, tuple[Any, ...]]:
        """The condition (and its parameters) true for the rows of `scope`."""
        column, p = self.quote(scope.column), self.placeholder
        if scope.end is None:
            return f"{column} >= {p}", (scope.start,)
        return f"{column} >= {p} AND {column} < {p}", (scope.start, scope.end)

    def drift_statement(self, job: LoadJob, staging: str) -> drift.DriftStatement | None:
        """The INSERT recording the job's late changes in `_floe_drift` (floe.destinations.drift)."""
        if not self.records_drift or job.refresh:
            return None
        p, spec = self.placeholder, job.table
        return drift.drift_statement(job, drift.DriftSql(text_type=self.text_type), staging=staging,
                                     quote=self.quote, target=self.qualified(spec.schema_name, spec.table),
                                     values=(p, p, p), drift_table=self.qualified(self.meta_schema, drift.DRIFT_TABLE))

    def drift_ages(self, source: str, stream: str) -> list[tuple[Any, ...]]:
        p = self.placeholder
        return self.query(drift.ages_query(self.qualified(self.meta_schema, drift.DRIFT_TABLE), p, p), (source, stream))

    def drop_staging(self, cur: Any, staging: str) -> None:
        cur.execute(f"DROP TABLE IF EXISTS {staging}")

    def write_state(self, cur: Any, job: LoadJob) -> None:
        """Insert the stream's next state version; with `job.base_version`, only if that is still the
        latest version (else StateConflictError, and the caller's transaction rolls back)."""
        p = self.placeholder
        table = self.qualified(self.meta_schema, STATE_TABLE)
        if job.base_version is not None:
            if self.lock_state_sql:
                cur.execute(self.lock_state_sql.format(table=table))
            cur.execute(f"SELECT COALESCE(MAX(version), 0) FROM {table} WHERE source = {p} AND stream = {p}",
                        (job.source, job.stream))
            latest = int(cur.fetchone()[0])
            if latest != job.base_version:
                raise state_conflict(self.name, job, latest)
        job.check_lease()
        state, entries = ledger.split_ledger(job.checkpoint)
        cur.execute(
            f"INSERT INTO {table} (source, stream, version, state, load_id, committed_at) "
            f"SELECT {p}, {p}, COALESCE(MAX(version), 0) + 1, {p}, {p}, {self.now_sql} FROM {table} "
            f"WHERE source = {p} AND stream = {p}",
            (job.source, job.stream, json.dumps(state, sort_keys=True), job.load_id, job.source, job.stream),
        )
        days = self.config.state_history_days
        if entries or job.details.get("full_refresh") or days:
            cur.execute(f"SELECT MAX(version) FROM {table} WHERE source = {p} AND stream = {p}", (job.source, job.stream))
            version = int(cur.fetchone()[0])
            ledger.append_entries(cur, self.qualified(self.meta_schema, ledger.LEDGER_TABLE), p, job.source,
                                  job.stream, entries, version, job.load_id, bool(job.details.get("full_refresh")))
            if days:
                ledger.prune_versions(cur, table, p, job.source, job.stream, days, version)

    def write_load_row(
        self, cur: Any, job: LoadJob, status: str, error: str | None, finished: datetime
    ) -> None:
        p = self.placeholder
        cur.execute(
            f"INSERT INTO {self.qualified(self.meta_schema, LOADS_TABLE)} "
            "(load_id, source, stream, destination, rows, started_at, finished_at, status, error, details, run_id) "
            f"VALUES ({', '.join([p] * 11)})",
            (
                job.load_id, job.source, job.stream, self.name, job.rows, job.started_at, finished,
                status, error, json.dumps(job.details, sort_keys=True) if job.details else None, job.run_id,
            ),
        )

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query and return its rows (for checks, demos and tests)."""
        with self.transaction() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
