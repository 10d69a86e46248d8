"""PostgreSQL: staged Parquet is COPYed inside the load transaction (binary COPY tuples built from Arrow
columns, or CSV written by Arrow when a column has no exact binary mapping; no per-row Python).

Type mapping (Arrow -> PostgreSQL):

    bool -> BOOLEAN          int8/16/32 -> INTEGER     int64/uint* -> BIGINT    float -> DOUBLE PRECISION
    decimal(p,s) -> NUMERIC(p,s)   string -> TEXT      binary -> BYTEA          date -> DATE
    time -> TIME             timestamp -> TIMESTAMP    timestamp with zone -> TIMESTAMPTZ (session zone UTC)
    JSON fields, lists, structs, maps -> JSONB

Loads: `append` and `replace` COPY straight into the target table inside the transaction
(`replace` deletes the old rows first). `merge` COPYs into a temporary staging table with an
arrival-order column `_floe_seq`, keeps the last row per primary key, deletes the matching target
rows (hash join on `=`, plus a null-safe pass for keys holding NULL) and inserts. Merge tables get
a plain index on the primary key. `_floe_state` and `_floe_loads` are written in the same transaction.

Leases: a session-level advisory lock per stream, held on a connection of its own for the whole
run; the server releases it when that session ends, so a killed run frees its streams at once
(server-side TCP keepalives notice a vanished machine within about a minute). A `_floe_leases`
row names the holder (host, pid, since) for the message a waiting run ends with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg.copy import QueuedLibpqWriter

from floe.core.destination import SEQ, LoadJob, StagedFile, TableSpec, is_json, nested_as_json
from floe.core.errors import DestinationError, LeaseLostError
from floe.core.leases import Holder, Lease
from floe.core.settings import DestinationConfig, StateHistoryConfig
from floe.destinations.column_types import SPELLED_OUT, TEXT_KEYS, ColumnRules
from floe.destinations.merge import RANK, MergeStyle
from floe.destinations.rejected import RowRules
from floe.destinations.run_log import SqlRunLog
from floe.destinations.schema_changes import SchemaPlan, Widening
from floe.destinations.sql import LEASES_TABLE, STATE_TABLE, SqlDestination, arrow_type_key
from floe.destinations.state_ops import SqlStateOps
from floe.infra import pgbinary
from floe.infra.pgconn import UrlConnection, connect_postgres, describe, read_batches

COPY_BATCH_ROWS = 65_536
NEW = "_floe_new"  # alias of the incoming rows (a table may well be called `s`)
# Merge is delete+insert joined on `=` (hashable), plus a null-safe pass for staged keys holding NULL:
# `IS NOT DISTINCT FROM` alone cannot use a hash join or an index and turns a merge into a nested
# loop over the whole target table. Repeated keys are dropped in place: only the (usually few)
# earlier rows of a repeated key are deleted, instead of copying every staged row into another table.
MERGE_STYLE = MergeStyle(
    latest_rows=f"DELETE FROM {{staging}} WHERE {SEQ} IN (SELECT {SEQ} FROM (SELECT {SEQ}, row_number() OVER "
                f"(PARTITION BY {{keys}} ORDER BY {{latest}}) AS {RANK} FROM {{staging}}) AS ranked WHERE {RANK} > 1)",
    dedupe="in_place", delete="using_split_nulls", alias=NEW,
)
LEASE_LOCKS = 0x666C6F65  # "floe": the first key of floe's advisory locks; the second names the stream
T = TypeVar("T")
# Errors of two sessions creating the same object at once: duplicate schema, table, object, column;
# deadlock and serialization failures roll the whole transaction back too (so it can be run again).
RACE_SQLSTATES = {"42P06", "42P07", "42710", "42701", "40P01", "40001"}
CATALOG_INDEXES = {"pg_namespace_nspname_index", "pg_type_typname_nsp_index", "pg_class_relname_nsp_index"}


def advisory_key(*parts: str) -> int:
    """A stable signed 32-bit advisory lock key naming `parts`."""
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=4).digest(), "big", signed=True)


class AdvisoryLease(Lease):
    """A session-level advisory lock on the destination's lease connection."""

    def __init__(self, owner: PostgresDestination, conn: Any, key: int, source: str, stream: str) -> None:
        super().__init__(owner.lease_name(source, stream), None)
        self.owner, self.conn, self.key, self.source, self.stream = owner, conn, key, source, stream

    def _renew(self) -> None:
        try:
            held = self.owner.lease_session(lambda conn: self.conn.execute(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s AND objid::bigint = %s "
                "AND objsubid = 2 AND pid = pg_backend_pid() AND granted",
                (LEASE_LOCKS, self.key & 0xFFFFFFFF)).fetchone())
        except Exception as exc:  # noqa: BLE001 - the session is gone, and the lock with it
            raise LeaseLostError(f"{self.what}: the lease's database session was lost ({exc})") from None
        if held is None:
            raise LeaseLostError(f"{self.what}: the advisory lock is no longer held")

    def _release(self) -> None:
        def unlock(_: Any) -> None:
            self.owner.held_leases.discard(self.key)
            with self.conn.transaction():
                self.conn.execute(f"DELETE FROM {self.owner.qualified(self.owner.meta_schema, LEASES_TABLE)} "
                                  "WHERE source = %s AND stream = %s", (self.source, self.stream))
                self.conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LEASE_LOCKS, self.key))

        self.owner.lease_session(unlock)


class PostgresConfig(DestinationConfig, StateHistoryConfig, UrlConnection):
    type: str = "postgres"
    schema_prefix: str = ""  # tables of source S go into schema `<schema_prefix><S>`
    state_schema: str = "public"  # where _floe_state and _floe_loads live

    def places(self, base: Path) -> list[str]:
        server = f"{self.host}:{self.port}/{self.database}"
        return [f"schema {self.state_schema} of {server} (the state)",
                f"schemas {self.schema_prefix}<source> of {server} (the tables)"]


def csv_ready(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """The batch with every column in a form `pyarrow.csv` writes and PostgreSQL's CSV COPY reads.

    Strings lose NUL characters (PostgreSQL text cannot hold them); nested values become JSON text;
    binary becomes bytea hex. Everything else is written by pyarrow's vectorised CSV writer."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    columns = []
    for column in table.columns:
        t = column.type
        if pa.types.is_dictionary(t):
            column, t = column.cast(t.value_type), t.value_type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            column = pc.replace_substring(column, "\x00", "")
        elif arrow_type_key(t) == "nested":
            column = nested_as_json(column)
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            column = pa.array([None if v is None else "\\x" + v.hex() for v in column.to_pylist()], pa.string())
        elif pa.types.is_float16(t):
            column = column.cast(pa.float32())
        elif pa.types.is_timestamp(t) and t.tz:
            # The same instants without the zone: formatting them is ~50x faster, and the session
            # time zone (UTC, set on connect) reads them back as the same instants.
            column = column.cast(pa.timestamp(t.unit))
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def csv_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, batch_size=COPY_BATCH_ROWS))
    return sink.getvalue()


class PostgresDestination(SqlStateOps, SqlRunLog, SqlDestination):
    Config: ClassVar[type[PostgresConfig]] = PostgresConfig
    type_map: ClassVar[dict[str, str]] = {
        "bool": "BOOLEAN",
        "int32": "INTEGER",
        "int64": "BIGINT",
        "float64": "DOUBLE PRECISION",
        "decimal": "NUMERIC",
        "string": "TEXT",
        "binary": "BYTEA",
        "date": "DATE",
        "time": "TIME",
        "timestamp": "TIMESTAMP",
        "timestamp_tz": "TIMESTAMPTZ",
        "nested": "JSONB",
    }
    # What PostgreSQL's input conversions (COPY) keep exactly; NUMERIC without (p,s) is unbounded.
    column_rules: ClassVar[ColumnRules] = ColumnRules(
        holds={
            "BOOLEAN": frozenset({"bool"}), "INTEGER": frozenset({"int32"}), "BIGINT": frozenset({"int32", "int64"}),
            "DOUBLE PRECISION": frozenset({"float64", "int32"}), "TEXT": TEXT_KEYS, "VARCHAR": TEXT_KEYS,
            "BYTEA": frozenset({"binary"}), "DATE": frozenset({"date"}), "TIME": frozenset({"time"}),
            "TIMESTAMP": frozenset({"timestamp", "date"}), "TIMESTAMPTZ": frozenset({"timestamp_tz", "timestamp", "date"}),
            "JSONB": frozenset({"json", "nested"}), "JSON": frozenset({"json", "nested"}),
        },
        decimals={"NUMERIC": None},
        aliases={**SPELLED_OUT, "DECIMAL": "NUMERIC"},
    )
    # In the load's transaction; the USING cast is PostgreSQL's own (a date becomes midnight UTC: sessions run in UTC).
    widening = Widening("ALTER TABLE {table} ALTER COLUMN {column} TYPE {type} USING {column}::{type}")
    json_type = "JSONB"
    text_type = "TEXT"
    timestamp_tz_type = "TIMESTAMPTZ"
    placeholder = "%s"
    merge_style = MERGE_STYLE
    direct_load: ClassVar[bool] = True  # append/replace COPY straight into the target (in the transaction)
    binary_copy: ClassVar[bool] = True  # binary COPY where every column maps exactly (else CSV)

    # The lease connection's session: the server probes an idle client every 10 s after 30 s of
    # silence and ends the session (releasing its advisory locks) after 3 probes go unanswered.
    lease_session_sql: ClassVar[tuple[str, ...]] = (
        "SET tcp_keepalives_idle = 30", "SET tcp_keepalives_interval = 10", "SET tcp_keepalives_count = 3")

    def __init__(self, name: str, config: Any, context: Any = None) -> None:
        super().__init__(name, config, context)
        self.meta_schema = config.state_schema  # type: ignore[misc]  # per instance: it is a config key here
        self._lease_conn: Any = None
        self._lease_lock = threading.Lock()
        self.held_leases: set[int] = set()  # advisory keys held by this instance's lease session

    # --- connection ------------------------------------------------------------------------------
    def connect(self) -> Any:
        return connect_postgres(self.config, where=f"destinations.{self.name}")

    def lease_session(self, work: Callable[[Any], T]) -> T:
        """`work(connection)` on the lease connection (autocommit; opened when first needed), one at a time."""
        with self._lease_lock:
            if self._lease_conn is None or self._lease_conn.closed:
                self.held_leases.clear()  # a new session holds nothing
                self._lease_conn = connect_postgres(self.config, where=f"destinations.{self.name}", autocommit=True,
                                                    application_name="floe lease")
                for statement in self.lease_session_sql:
                    self._lease_conn.execute(statement)
            return work(self._lease_conn)

    def meta_ddl(self) -> list[str]:
        t, ts = self.text_type, self.timestamp_tz_type
        return [*super().meta_ddl(),
                f"CREATE TABLE IF NOT EXISTS {self.qualified(self.meta_schema, LEASES_TABLE)} (source {t}, "
                f"stream {t}, destination {t}, host {t}, pid BIGINT, since {ts}, expires_at {ts}, token {t})"]

    def try_lease(self, source: str, stream: str) -> Lease | Holder:
        self.prepare_meta()
        key = advisory_key(self.meta_schema, source, stream)
        leases = self.qualified(self.meta_schema, LEASES_TABLE)

        def take(conn: Any) -> Lease | Holder:
            if key in self.held_leases:  # advisory locks nest within a session: refuse a second holder here
                me = Holder.me()
                return Holder(me.host, me.pid, None, how="another run in this process")
            if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LEASE_LOCKS, key)).fetchone()[0]:
                row = conn.execute(f"SELECT host, pid, since FROM {leases} WHERE source = %s AND stream = %s "
                                   "ORDER BY since DESC LIMIT 1", (source, stream)).fetchone()
                return Holder(*row) if row else Holder(None, None, None, how="a session that left no lease row")
            me = Holder.me()
            try:
                with conn.transaction():
                    conn.execute(f"DELETE FROM {leases} WHERE source = %s AND stream = %s", (source, stream))
                    conn.execute(f"INSERT INTO {leases} (source, stream, destination, host, pid, since) "
                                 "VALUES (%s, %s, %s, %s, %s, %s)", (source, stream, self.name, me.host, me.pid, me.since))
            except BaseException:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LEASE_LOCKS, key))
                raise
            self.held_leases.add(key)
            return AdvisoryLease(self, conn, key, source, stream)

        return self.lease_session(take)

    def is_ddl_race(self, exc: Exception) -> bool:
        if not isinstance(exc, psycopg.Error):
            return False
        if exc.sqlstate in RACE_SQLSTATES:
            return True
        if exc.sqlstate == "23505":  # a unique violation on a catalog index: CREATE ... IF NOT EXISTS raced
            return exc.diag.constraint_name in CATALOG_INDEXES
        return exc.sqlstate == "XX000" and "tuple concurrently updated" in str(exc)

    def is_state_conflict(self, exc: Exception, job: LoadJob) -> bool:
        return (isinstance(exc, psycopg.Error) and exc.sqlstate == "23505"
                and exc.diag.constraint_name == f"{STATE_TABLE}_version")

    def rollback(self, cur: Any) -> None:
        if not self.conn.closed:
            self.conn.rollback()

    def check(self) -> list[str]:
        where = f"destinations.{self.name}"
        row = self.query(
            "SELECT version(), current_user, current_database(), "
            "has_database_privilege(current_user, current_database(), 'CREATE')"
        )[0]
        if not row[3]:
            raise DestinationError(
                f"{where}: permission denied: user {row[1]!r} may not create schemas in database {row[2]!r} "
                f"(GRANT CREATE ON DATABASE {row[2]} TO {row[1]})"
            )
        return [f"connected to {describe(self.config)} ({row[0].split(',')[0]}); user may create schemas"]

    def read_batches(self, sql: str, params: Any = (), batch_size: int = 50_000) -> Iterator[pa.RecordBatch]:
        """Stream a query's rows as Arrow batches on a separate read-only connection (loads stay free)."""
        conn = connect_postgres(self.config, where=f"destinations.{self.name}")
        try:
            conn.read_only = True
            yield from read_batches(conn, sql, params, batch_size)
            conn.commit()
        finally:
            conn.close()

    # --- naming and types ------------------------------------------------------------------------
    def table_schema(self, source: str) -> str:
        return f"{self.config.schema_prefix}{source}"

    def column_type(self, f: pa.Field) -> str | None:
        if pa.types.is_decimal(f.type) and f.type.precision <= 1000:
            return f"NUMERIC({f.type.precision},{f.type.scale})"
        return super().column_type(f)

    def located(self, spec: TableSpec) -> TableSpec:
        schema = self.table_schema(spec.schema_name)
        if schema == spec.schema_name:
            return spec
        return dataclasses.replace(spec, schema_name=schema)

    def load_group(self, jobs: list[LoadJob]) -> None:
        super().load_group([self._named(job) for job in jobs])

    def row_rules(self) -> RowRules:
        return RowRules(json_nul_escape=True)  # jsonb cannot hold \u0000

    def _named(self, job: LoadJob) -> LoadJob:
        """The job with its table in the schema this destination uses for the source."""
        spec = self.located(job.table)
        return job if spec is job.table else dataclasses.replace(job, table=spec)

    def ensure_table(self, cur: Any, spec: TableSpec, staged: Sequence[StagedFile] = ()) -> SchemaPlan:
        plan = super().ensure_table(cur, spec, staged)
        if spec.disposition == "merge" and spec.primary_key:
            digest = hashlib.sha1(f"{spec.schema_name}.{spec.table}".encode()).hexdigest()[:10]
            keys = ", ".join(self.quote(k) for k in spec.primary_key)
            cur.execute(
                f"CREATE INDEX IF NOT EXISTS {self.quote(f'floe_pk_{digest}')} "
                f"ON {self.qualified(spec.schema_name, spec.table)} ({keys})"
            )
        return plan

    # --- loading ---------------------------------------------------------------------------------
    def column_oids(self, cur: Any, table: str) -> dict[str, int]:
        """The type OID of every column of `table` (works for temporary tables too)."""
        cur.execute(f"SELECT * FROM {table} LIMIT 0")
        return {d.name: d.type_code for d in cur.description or []}

    def copy_files(self, cur: Any, job: LoadJob, table: str, extra: dict[str, Any] | None = None) -> None:
        """COPY every staged file into `table`, batch by batch, with constant `extra` columns appended.

        Binary COPY when every column maps exactly onto its target type (see pgbinary), else CSV."""
        extra = extra or {}
        wanted = set(self.insert_columns(job.table))
        json_columns = {f.name for f in job.table.columns if is_json(f)}
        oids = self.column_oids(cur, table)
        for staged in job.files:
            parquet = pq.ParquetFile(staged.path)
            fields = [f for f in parquet.schema_arrow if f.name in wanted and not pa.types.is_null(f.type)]
            names = [f.name for f in fields]
            if not names and not extra:
                continue
            constants = {k: pa.scalar(v) for k, v in extra.items()}
            schema = pa.schema([*fields, *(pa.field(k, v.type) for k, v in constants.items())])
            encode = pgbinary.encoder(schema, [oids.get(n, 0) for n in schema.names], json_columns) \
                if self.binary_copy else None
            column_list = ", ".join(self.quote(n) for n in schema.names)
            fmt = "binary" if encode else "csv"
            # The queued writer sends on a worker thread: encoding the next batch overlaps the server's work.
            writer = QueuedLibpqWriter(cur)
            with cur.copy(f"COPY {table} ({column_list}) FROM STDIN (FORMAT {fmt})", writer=writer) as copy:
                if encode:
                    copy.write(pgbinary.HEADER)
                for batch in parquet.iter_batches(batch_size=COPY_BATCH_ROWS, columns=names):
                    if constants:
                        arrays = [*batch.columns, *(pa.repeat(v, batch.num_rows) for v in constants.values())]
                        batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
                    copy.write(encode(batch) if encode else csv_bytes(csv_ready(batch)))
                if encode:
                    copy.write(pgbinary.TRAILER)

    def stage_rows(self, cur: Any, job: LoadJob, staging: str) -> str:
        spec = job.table
        target = self.qualified(spec.schema_name, spec.table)
        if self.direct_load and spec.disposition in ("append", "replace"):
            if spec.disposition == "replace":
                cur.execute(f"DELETE FROM {target}")
            stamp = {"_floe_load_id": job.load_id, "_floe_loaded_at": datetime.now(UTC)}
            self.copy_files(cur, job, target, stamp)
            return ""
        names = ", ".join(self.quote(c) for c in self.insert_columns(spec))
        cur.execute(f"CREATE TEMP TABLE {staging} ON COMMIT DROP AS SELECT {names} FROM {target} WITH NO DATA")
        cur.execute(f"ALTER TABLE {staging} ADD COLUMN {SEQ} BIGINT GENERATED ALWAYS AS IDENTITY")
        self.copy_files(cur, job, staging)
        return SEQ

    def staged_keys_unique(self, cur: Any, spec: TableSpec, staging: str) -> bool:
        return False  # staged_sql de-duplicates in place, which costs little when no key repeats

    def disposition_sql(
        self, spec: TableSpec, staging: str, order: str, load_id: str, unique_keys: bool = False
    ) -> list[str]:
        if self.direct_load and spec.disposition in ("append", "replace"):
            return []  # the rows went straight into the target in stage_rows
        return self.staged_sql(spec, staging, order, load_id)

    def staged_sql(self, spec: TableSpec, staging: str, order: str, load_id: str) -> list[str]:
        """Statements moving staged rows into the target by the disposition (`MERGE_STYLE`)."""
        return SqlDestination.disposition_sql(self, spec, staging, order, load_id)

    def drop_staging(self, cur: Any, staging: str) -> None:
        cur.execute(f"DROP TABLE IF EXISTS {staging}")

    def close(self) -> None:
        super().close()
        with self._lease_lock:
            if self._lease_conn is not None:
                self._lease_conn.close()  # ends the session: the server releases its advisory locks
                self._lease_conn = None
