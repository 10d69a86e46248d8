"""DuckDB: the embedded default warehouse. An append's stage files are Arrow IPC, streamed into
the table by pyarrow; a merge's are Parquet, read (several times) by `read_parquet`.

Leases: DuckDB lets one process at a time open a database file for writing, so the file lock is
the lease between processes (a second process is told which pid holds it); runs within one
process take a lease per stream among themselves."""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import duckdb
from pydantic import Field

from floe.core.destination import SEQ, LoadJob, StagedFile, TableSpec, staged_column
from floe.core.errors import DestinationError
from floe.core.leases import Holder, Lease, process_started, take_process_lease
from floe.core.runs import RunRecord
from floe.core.settings import DestinationConfig, StateHistoryConfig, local_place
from floe.core.stream import Disposition, Stream
from floe.destinations.column_types import SPELLED_OUT, TEXT_KEYS, ColumnRules
from floe.destinations.merge import STANDARD
from floe.destinations.run_log import SqlRunLog
from floe.destinations.sql import SqlDestination
from floe.destinations.state_ops import SqlStateOps
from floe.infra.localpaths import creatable
from floe.infra.stage import SUFFIXES

if TYPE_CHECKING:
    import pyarrow as pa


class DuckDBConfig(DestinationConfig, StateHistoryConfig):
    type: str = "duckdb"
    path: str = "warehouse.duckdb"
    memory_limit: str | None = None  # e.g. "1GB"; DuckDB's own default is 80% of RAM
    threads: int | None = None
    # An append's INSERT runs on this many threads. Each thread buffers a row group of its own
    # (122,880 rows) and leaves a partly filled one per commit. Unset: as many of `threads` as keep
    # those buffers within 64 MB, by the staged Arrow files' bytes per row (FullStory's ~470-byte
    # rows: one thread, ~75 MB; Sailthru's narrow rows: every thread, which its rate needs).
    append_threads: int | None = Field(default=None, ge=1)
    # DuckDB checkpoints once its WAL passes this size. Its own default (16MB) checkpoints after
    # nearly every load of ~100k wide rows, recompressing the table's last, partly filled row group
    # each time (about half the CPU of such loads); a larger WAL is replayed on open after a crash.
    checkpoint_threshold: str | None = "64MB"
    # An insert buffers this many row groups (of 122,880 rows) per thread before writing them; DuckDB's
    # default (5, or 20% of memory_limit per thread) holds ~1GB of wide rows without a memory_limit.
    write_buffer_row_group_count: int = Field(default=1, ge=1)
    # A merge's INSERT runs on this many threads (empty: all of DuckDB's). Each thread holds a row group
    # of its own until it is written and the parts are compressed again when they are joined: a
    # 200,000-call Twilio merge peaked ~150 MB over the start on two threads and ~85 MB on one, with
    # a fifth less CPU.
    merge_insert_threads: int | None = Field(default=1, ge=1)
    # An append stream's checkpoints are folded into commits of at least `commit_rows` rows, or of
    # `commit_wait_seconds` seconds' worth when rows come slower: fewer commits, fewer partly filled
    # row groups (appends do not vacuum: DuckDB leaves those row groups as they are).
    commit_rows: int = Field(default=250_000, ge=0)
    commit_wait_seconds: float = Field(default=10.0, ge=0)
    # Stage files are local and read once, at once: appends stage Arrow IPC, which costs almost
    # nothing to write and read; merges stage Parquet (lz4: less CPU than zstd).
    stage_format: Literal["arrow", "parquet"] = "arrow"
    stage_compression: Literal["zstd", "lz4", "snappy", "none"] = "lz4"

    def places(self, base: Path) -> list[str]:
        return [f"the DuckDB file {local_place(base, self.path)}"]


# What DuckDB's block cache is cut down to after each commit (see `DuckDBDestination.commit`).
CACHE_AFTER_COMMIT = "32MB"
APPEND_BUFFER_BYTES = 64 << 20  # what an append's insert threads buffer at most, together (estimated)
ROW_GROUP_ROWS = 122_880


def insert_threads(files: list[StagedFile], most: int, budget: int = APPEND_BUFFER_BYTES) -> int:
    """How many threads (1 to `most`) an append of `files` inserts on: each buffers a row group,
    whose size is estimated by the files' bytes per row (Arrow IPC stage files hold the rows uncompressed)."""
    rows = sum(f.rows for f in files)
    if not rows:
        return most
    per_thread = ROW_GROUP_ROWS * sum(f.path.stat().st_size for f in files) / rows
    return max(1, min(most, int(budget // max(per_thread, 1))))

# DuckDB's error when another process has the file open: "... Conflicting lock is held in <program> (PID n) ..."
LOCK_HELD = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")


class DatabaseFileLocked(DestinationError):
    """Another process has the DuckDB file open; `holder` says which."""

    def __init__(self, message: str, holder: Holder) -> None:
        super().__init__(message)
        self.holder = holder


class DuckDBDestination(SqlStateOps, SqlRunLog, SqlDestination):
    Config: ClassVar[type[DuckDBConfig]] = DuckDBConfig
    # The last row to arrive per key, also across several staged files (`order` is the file name,
    # then the row number in it: both descending). The check that no staged key repeats groups by
    # the keys' hash: for 1M Sailthru rows of five key columns it held ~75 MB instead of ~170 MB.
    merge_style = dataclasses.replace(STANDARD, latest_rows=(
        "SELECT * FROM {staging} QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {latest}) = 1"),
        distinct_keys="hash({keys})")
    type_map: ClassVar[dict[str, str]] = {
        "bool": "BOOLEAN",
        "int32": "INTEGER",
        "int64": "BIGINT",
        "float64": "DOUBLE",
        "decimal": "DOUBLE",
        "string": "VARCHAR",
        "binary": "BLOB",
        "date": "DATE",
        "time": "TIME",
        "timestamp": "TIMESTAMP",
        "timestamp_tz": "TIMESTAMPTZ",
        "nested": "JSON",
    }
    # DuckDB's casts keep these exactly (a date becomes midnight UTC: sessions run in UTC).
    column_rules: ClassVar[ColumnRules] = ColumnRules(
        holds={
            "BOOLEAN": frozenset({"bool"}), "INTEGER": frozenset({"int32"}), "BIGINT": frozenset({"int32", "int64"}),
            "DOUBLE": frozenset({"float64", "int32"}), "VARCHAR": TEXT_KEYS, "BLOB": frozenset({"binary"}),
            "DATE": frozenset({"date"}), "TIME": frozenset({"time"}), "TIMESTAMP": frozenset({"timestamp", "date"}),
            "TIMESTAMPTZ": frozenset({"timestamp_tz", "timestamp", "date"}), "JSON": frozenset({"json", "nested"}),
        },
        decimals={"DECIMAL": (18, 3)},
        aliases={**SPELLED_OUT, "NUMERIC": "DECIMAL"},
    )
    meta_schema = "main"
    placeholder = "?"

    def __init__(self, name: str, config: Any, context: Any = None) -> None:
        super().__init__(name, config, context)
        self.commit_rows, self.commit_wait = config.commit_rows, config.commit_wait_seconds
        self.stage_compression = config.stage_compression
        self._threads = 0  # as DuckDB resolved it (`connect`): what loads other than appends run on
        self._append_threads = 0  # the current append's (`stage_rows`, under the load lock)

    def column_type(self, f: pa.Field) -> str | None:
        import pyarrow as pa

        if pa.types.is_decimal(f.type) and f.type.precision <= 38:  # DuckDB's widest DECIMAL
            return f"DECIMAL({f.type.precision},{f.type.scale})"
        return super().column_type(f)

    def commit_due(self, stream: Stream, rows: int, seconds: float) -> bool:
        # A merge's transaction holds the rows it deletes and inserts in memory: it commits each checkpoint.
        return stream.disposition == "merge" or super().commit_due(stream, rows, seconds)

    def stage_format(self, disposition: Disposition) -> str:
        # A merge reads its staged rows several times, which read_parquet does from the files; an
        # Arrow stream is read once, straight into the table.
        return "parquet" if disposition == "merge" else self.config.stage_format

    @property
    def path(self) -> Path:
        return self.context.path(self.config.path)

    def connect(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No network in most deployments: never try to download extensions (json, parquet, icu are built in).
        settings: dict[str, Any] = {"autoinstall_known_extensions": False}
        if self.config.memory_limit:
            settings["memory_limit"] = self.config.memory_limit
        if self.config.threads:
            settings["threads"] = self.config.threads
        if self.config.checkpoint_threshold:
            settings["checkpoint_threshold"] = self.config.checkpoint_threshold
        settings["write_buffer_row_group_count"] = self.config.write_buffer_row_group_count
        try:
            conn = duckdb.connect(str(self.path), config=settings)
        except duckdb.Error as exc:
            message = f"destinations.{self.name}: cannot open {self.path}: {exc}"
            if held := LOCK_HELD.search(str(exc)):
                pid = int(held["pid"])
                raise DatabaseFileLocked(message, Holder(
                    socket.gethostname(), pid, process_started(pid),
                    how=f"DuckDB's lock on {self.path} ({held['program']})")) from None
            raise DestinationError(message) from None
        conn.execute("SET TimeZone = 'UTC'")
        self._threads = int(conn.execute("SELECT current_setting('threads')").fetchall()[0][0])
        self._catalog = conn.execute("SELECT current_database()").fetchall()[0][0]
        return conn

    def runs(self, limit: int = 20) -> list[RunRecord]:
        return super().runs(limit) if self.path.exists() else []  # never loaded: no file made to say so

    # With the catalog: a file named like a source (sailthru.duckdb) makes `sailthru.blast` ambiguous.
    def qualified(self, schema: str, table: str) -> str:
        return f"{self.schema_ref(schema)}.{self.quote(table)}"

    def schema_ref(self, schema: str) -> str:
        self.conn  # noqa: B018 - connecting learns the catalog name
        return f"{self.quote(self._catalog)}.{self.quote(schema)}"

    # A DuckDB cursor is its own connection: the transaction lives on the cursor.
    def begin(self, cur: Any) -> None:
        cur.execute("BEGIN TRANSACTION")

    def commit(self, cur: Any) -> None:
        """Commit, then drop DuckDB's cache of the blocks the load wrote: DuckDB keeps every block it
        writes in memory until `memory_limit` (80% of RAM by default) makes it evict, so without this
        the process grows with every row loaded (4M FullStory events: ~230 MB of cached blocks, and
        as much again of the allocator's). floe never reads them back but for merges, which read
        them again from the file (the operating system's cache). Lowering the limit evicts them;
        it is raised again at once. Commits run under the load lock, so no other load of this
        connection holds memory meanwhile; if DuckDB cannot evict down to the lower limit (a query on
        another cursor holding more), it refuses it and the cache stays."""
        cur.execute("COMMIT")
        try:
            cur.execute(f"SET memory_limit = '{CACHE_AFTER_COMMIT}'")
        except duckdb.Error:
            pass
        finally:  # the configured limit, or DuckDB's default (the text DuckDB shows for it rounds)
            limit = self.config.memory_limit
            cur.execute(f"SET memory_limit = '{limit}'" if limit else "RESET memory_limit")

    def rollback(self, cur: Any) -> None:
        cur.execute("ROLLBACK")

    def try_lease(self, source: str, stream: str) -> Lease | Holder:
        try:
            with self._lock:
                self.conn  # noqa: B018 - opening the file takes DuckDB's lock against other processes
        except DatabaseFileLocked as exc:
            return exc.holder
        return take_process_lease(f"{self.path.resolve()}\0{source}\0{stream}", self.lease_name(source, stream))

    def is_ddl_race(self, exc: Exception) -> bool:
        return isinstance(exc, duckdb.TransactionException) and "write-write conflict" in str(exc)

    def is_state_conflict(self, exc: Exception, job: LoadJob) -> bool:
        # The unique index is checked when the transaction commits: "... constraint violation: duplicate key
        # "<source>, <stream>, <version>"" (the only unique index floe creates).
        text = str(exc)
        return (isinstance(exc, (duckdb.TransactionException, duckdb.ConstraintException))
                and "duplicate key" in text and f"{job.source}, {job.stream}, " in text)

    def check(self) -> list[str]:
        where = f"destinations.{self.name}.path"
        if not self.path.exists():  # a check creates nothing: the first run creates the file
            return [f"DuckDB database {creatable(self.path)}"]
        if not self.path.is_file():
            raise DestinationError(f"{where}: {self.path} is not a file")
        try:
            duckdb.connect(str(self.path), read_only=True).close()
        except duckdb.Error as exc:
            if held := LOCK_HELD.search(str(exc)):
                return [f"DuckDB database {self.path} is open in {held['program']} (PID {held['pid']}): a run is going on"]
            raise DestinationError(f"{where}: cannot open {self.path}: {exc}") from None
        return [f"opened DuckDB database {self.path}"]

    def read_batches(self, sql: str, params: Any = (), batch_size: int = 50_000) -> Iterator[pa.RecordBatch]:
        """Stream a query's rows as Arrow batches from a separate cursor (loads are not blocked)."""
        import pyarrow as pa

        cur = self.conn.cursor()
        try:
            reader = cur.sql(sql, params=list(params) if params else None).to_arrow_reader(batch_size)
            empty = True
            for batch in reader:
                empty = False
                yield batch
            if empty:  # an empty result still tells the caller its columns
                yield pa.RecordBatch.from_pylist([], schema=reader.schema)
        finally:
            cur.close()

    def stage_rows(self, cur: Any, job: LoadJob, staging: str) -> str:
        import pyarrow as pa

        if not job.files:  # replace with nothing: an empty relation with the table's columns
            cols = ", ".join(
                f"CAST(NULL AS {t}) AS {self.quote(f.name)}"
                for f in job.table.columns if (t := self.column_type(f)) is not None
            )
            cur.execute(f"CREATE TEMP VIEW {staging} AS SELECT {cols or '1 AS _floe_empty'}, "
                        f"0 AS {SEQ} LIMIT 0")
            return SEQ
        paths = [f.path for f in job.files]
        self._append_threads = self.config.append_threads or insert_threads(job.files, self._threads)
        if any(p.suffix == SUFFIXES["arrow"] for p in paths):
            if job.table.disposition == "merge":  # stage_format() gives merges Parquet
                raise DestinationError(f"{self.name}: Arrow stage files cannot be merged (they are read once)")
            cur.register(staging, staged_arrow(paths, job.table.columns.append(pa.field(SEQ, pa.int64()))))
            return SEQ
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
        # A view, not a table: the merge streams from Parquet instead of first copying every staged
        # row into memory (a commit can be a whole export file).
        cur.execute(
            f"CREATE TEMP VIEW {staging} AS SELECT * FROM read_parquet([{files}], union_by_name = true, "
            "filename = true, file_row_number = true)"
        )
        return "filename, file_row_number"

    def disposition_sql(
        self, spec: TableSpec, staging: str, order: str, load_id: str, unique_keys: bool = False
    ) -> list[str]:
        # An append's or a replace's INSERT runs on every thread when rows need not keep their arrival
        # order (SQL promises none without ORDER BY; a SQL table of 1M rows: 1.8 CPU s instead of 2.2,
        # and half the time). A merge's keeps it: merges commit every checkpoint, and the partly
        # filled row groups each thread leaves per commit cost more to merge again at the next
        # checkpoint than the threads save (Twilio bench: 97,574 against 106,554 records/s).
        preserve = "true" if spec.disposition == "merge" else "false"
        # The checkpoint after an append or a replace does not vacuum: merging the partly filled row
        # groups of earlier commits recompresses them at every checkpoint. A merge's deletes are
        # vacuumed (DuckDB's default, 100 tasks). The setting is global:
        # concurrent streams of both kinds only change which checkpoint vacuums.
        vacuum = 100 if spec.disposition == "merge" else 0
        # An append inserts on `append_threads`, a merge's INSERT on `merge_insert_threads` (see
        # DuckDBConfig), the rest on every thread; the setting is global, so every load sets it first.
        statements = super().disposition_sql(spec, staging, order, load_id, unique_keys)  # connects first
        threads = (self._append_threads if spec.disposition == "append" else self._threads) or self._threads
        few = self.config.merge_insert_threads
        if spec.disposition == "merge" and few is not None and few < threads:
            insert = f"INSERT INTO {self.qualified(spec.schema_name, spec.table)} "
            at = next(i for i, sql in enumerate(statements) if sql.startswith(insert))
            statements[at:at + 1] = [f"SET threads = {few}", statements[at], f"SET threads = {threads}"]
        return [f"SET preserve_insertion_order = {preserve}", f"SET max_vacuum_tasks = {vacuum}",
                f"SET threads = {threads}", *statements]

    def drop_staging(self, cur: Any, staging: str) -> None:
        cur.unregister(staging)  # an append's Arrow stream (a no-op for a view)
        cur.execute(f"DROP VIEW IF EXISTS {staging}")


def staged_arrow(paths: list[Path], schema: pa.Schema) -> pa.RecordBatchReader:
    """The rows of Arrow stage files, in write order, as one stream of `schema` (whose last column
    is `SEQ`, the arrival order), one batch in memory at a time."""
    import pyarrow as pa

    def batches() -> Iterator[pa.RecordBatch]:
        seq = 0
        for path in paths:
            with pa.OSFile(str(path)) as f:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    yield conform(batch, schema, seq)
                    seq += batch.num_rows

    return pa.RecordBatchReader.from_batches(schema, batches())


def conform(batch: pa.RecordBatch, schema: pa.Schema, first_seq: int) -> pa.RecordBatch:
    """`batch` with `schema`'s columns: `SEQ` and any column it lacks (one that appeared in a later
    file) come from `staged_column`; one of another type (e.g. null while every value was missing) is
    cast. Nested values stay nested: DuckDB casts them to JSON itself."""
    import pyarrow as pa

    if batch.schema.equals(pa.schema(list(schema)[:-1])):  # the usual case: just number the rows
        return batch.append_column(schema.field(SEQ), staged_column(batch, schema.field(SEQ), first_seq)[0])
    columns = []
    for field in schema:
        i = batch.schema.get_field_index(field.name)
        column = staged_column(batch, field, first_seq)[0] if i < 0 or field.name == SEQ else batch.column(i)
        columns.append(column if column.type.equals(field.type) else column.cast(field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)
