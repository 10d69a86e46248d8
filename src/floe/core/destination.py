"""The contract every destination implements.

`load(job)` is the exactly-once point: in ONE transaction it creates or evolves the target table,
moves the staged rows in by the write disposition, writes the stream's new state version into
`_floe_state` and a row into `_floe_loads`. A crash anywhere leaves either the old data and old
state, or the new data and new state. `load_group(jobs)` commits several streams' jobs; up to
`group_size` of them share that one transaction.

Overlapping runs: a run first takes the stream's lease in the destination (`acquire_lease`), so
that two runs never load one stream at once, and every commit names the state version it builds
on (`LoadJob.base_version`): if another run committed since, the commit is refused whole
(`StateConflictError`), so state versions stay unique and no rows are loaded twice.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import orjson

from floe.core.errors import StateConflictError
from floe.core.leases import Holder, Lease, wait_for_lease
from floe.core.runs import RunRecord
from floe.core.settings import BadRows, DestinationConfig, SchemaChanges
from floe.core.stream import Context, Disposition, DriftSpec, RefreshScope, State, Stream

if TYPE_CHECKING:
    import pyarrow as pa

SEQ = "_floe_seq"  # arrival order of staged rows: a later row wins a merge
META_JSON = b"floe.json"  # field metadata key: the column holds a JSON document (jsonb, SUPER, JSON)


@dataclass
class StagedFile:
    """A stage file a load reads: its path, row count and Arrow schema."""

    path: Path
    rows: int
    schema: pa.Schema


def json_field(name: str) -> pa.Field:
    """An Arrow field for a JSON document stored as text; warehouses give it their JSON type."""
    import pyarrow as pa

    return pa.field(name, pa.string(), metadata={META_JSON: b"1"})


def is_json(f: pa.Field) -> bool:
    return bool(f.metadata and f.metadata.get(META_JSON))


@dataclass(frozen=True)
class TableSpec:
    """Where and how a stream's rows land. `columns` never includes floe's own `_floe_*` columns."""

    schema_name: str  # the source's name
    table: str  # the stream's name
    columns: pa.Schema
    primary_key: tuple[str, ...] = ()
    disposition: Disposition = "append"
    # merge only: target rows whose parent_key matches a staged row are all deleted first, so a
    # child table (e.g. one row per profile var) is replaced as a set when its parent is re-sent.
    # With `parent_markers`, a staged row whose other key columns (`marker_columns`) are all NULL
    # is a parent marker: it empties its parent's set and is not inserted itself (a parent re-sent
    # with no children). Without, such a row is an ordinary row (a Sailthru message without actions).
    parent_key: tuple[str, ...] = ()
    parent_markers: bool = True
    # Optional views recreated with every load, in the same transaction: (name, SELECT template).
    # The template may use {table} (the qualified target) and {columns} (its quoted column list);
    # keep it portable SQL with double-quoted identifiers. Destinations without views ignore it.
    views: tuple[tuple[str, str], ...] = ()
    # What a load does when staged values need a column of another type (docs/destinations.md, "Column
    # type changes"): "evolve" widens the column, or keeps the values in a variant column; "freeze" fails.
    # `widen_to_text`: a column may become text to hold values of another type (else a variant column).
    schema_changes: SchemaChanges = "evolve"
    widen_to_text: bool = False
    # What a load does with a row the destination cannot store (see floe.destinations.rejected): "fail"
    # the load, or "quarantine" the row in `_floe_rejected` (failing only over `bad_rows_max` rows).
    bad_rows: BadRows = "fail"
    bad_rows_max: int | None = None
    # Late changes a re-read finds are recorded in `_floe_drift` in the load's transaction, by
    # destinations that declare `records_drift`.
    drift: DriftSpec | None = None

    @property
    def marker_columns(self) -> tuple[str, ...]:
        """The primary-key columns that are not the parent key; all NULL in a parent marker row."""
        if not (self.parent_key and self.parent_markers):
            return ()
        return tuple(k for k in self.primary_key if k not in self.parent_key)

    def not_marker_sql(self, column: Callable[[str], str]) -> str | None:
        """SQL true for every row that is not a parent marker (None when there are no markers);
        `column(name)` renders a column reference."""
        if not self.marker_columns:
            return None
        return "NOT (" + " AND ".join(f"{column(k)} IS NULL" for k in self.marker_columns) + ")"


@dataclass(frozen=True)
class Rejected:
    """The rows a load leaves out (`bad_rows: quarantine`): each one's reason, and the row as JSON."""

    reasons: list[str]
    rows: list[str]

    def __len__(self) -> int:
        return len(self.reasons)


@dataclass(frozen=True)
class LoadJob:
    """One commit: the staged files since the previous checkpoint plus the checkpoint itself."""

    load_id: str
    source: str
    stream: str
    table: TableSpec
    files: list[StagedFile]
    checkpoint: State | None  # None: the state of a stream never loaded (after `floe state reset`)
    started_at: datetime
    details: dict[str, Any] = field(default_factory=dict)  # extra counts kept in _floe_loads.details
    # A commit of a full refresh: the rows go into the table's refresh copy, the state stays as it is
    # (see Destination.finish_refresh).
    refresh: bool = False
    # The state version this commit builds on (the stream's latest when its run read the state, plus
    # the run's own commits since). The commit is refused (StateConflictError) unless that is still the
    # latest version. None: not checked (the commit goes on top of whatever is latest).
    base_version: int | None = None
    lease: Lease | None = None  # the run's lease of the stream, checked right before the commit point
    # A backfill of an append stream: the table's rows in this scope are deleted in the commit's
    # transaction, before its rows go in (the range's rows are replaced; NULLs in the column stay).
    replaces: RefreshScope | None = None
    rejected: Rejected | None = None  # the rows quarantine left out of `files` (None: not checked)
    run_id: str | None = None  # the run that made the commit (None: a state command's change)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def check_lease(self) -> None:
        """Raise LeaseLostError if the run lost its lease (called right before the commit point)."""
        if self.lease is not None:
            self.lease.check()


def state_conflict(destination: str, job: LoadJob, latest: int | None) -> StateConflictError:
    """The error of a commit whose base version is no longer the latest (`latest`, when known)."""
    newer = f"version {latest}" if latest is not None else f"version {(job.base_version or 0) + 1}"
    return StateConflictError(
        f"{job.source}.{job.stream} -> {destination}: another run committed state {newer} after this run "
        f"started from version {job.base_version}; this commit was rolled back and nothing of it is kept "
        "(the next run goes on from the newer state)"
    )


@dataclass(frozen=True)
class CommittedState:
    """A stream's latest committed state and its version (0 and None: never loaded)."""

    version: int = 0
    state: State | None = None


@dataclass(frozen=True)
class StateVersion:
    """One committed state version of a stream, as `floe state log` shows it.

    `action`: "load" (a load's commit), "full refresh", "revert" or "reset" (`Destination.change_state`);
    `details` what the commit noted (a revert's `to_version`, the `deleted_rows` of a revert or reset)."""

    version: int
    committed_at: datetime | None
    load_id: str
    rows: int | None  # rows the commit loaded (None: not recorded)
    state: State | None
    action: str = "load"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StateChange:
    """A stream's state set back, by `Destination.change_state`, in ONE commit: the rows of every load
    committed after version `delete_after` are deleted (0: every row of the table; None: no rows), and
    `state` becomes the latest state as a new version (None: never loaded). The commit is refused
    (StateConflictError) unless `base_version` is still the stream's latest version."""

    change_id: str  # a load id: the new version's load_id and the `_floe_loads` row's
    table: TableSpec
    source: str
    stream: str
    state: State | None
    base_version: int
    delete_after: int | None
    action: str  # "revert" | "reset"
    details: dict[str, Any] = field(default_factory=dict)
    lease: Lease | None = None  # the command's lease of the stream, checked right before the commit

    def job(self, deleted_rows: int) -> LoadJob:
        """The change as a commit without files, for the state and load-row bookkeeping loads use."""
        return LoadJob(self.change_id, self.source, self.stream, self.table, [], self.state, datetime.now(UTC),
                       details={"action": self.action, **self.details, "deleted_rows": deleted_rows},
                       base_version=self.base_version, lease=self.lease)


@runtime_checkable
class RowReader(Protocol):
    """A destination whose query results can be read back as Arrow batches (reverse ETL reads through it)."""

    def read_batches(self, sql: str, params: Any = (), batch_size: int = 50_000) -> Iterator[pa.RecordBatch]: ...


class Destination(ABC):
    """A configured destination. `name` is its key in floe.yml; it owns its connection."""

    Config: ClassVar[type[DestinationConfig]]
    # A checkpoint is folded into the next commit (the later checkpoint supersedes the earlier)
    # while it comes sooner than `commit_interval` seconds after the previous commit, or while
    # fewer than `commit_rows` rows wait, for at most `commit_wait` seconds after the previous
    # commit. The defaults commit every checkpoint.
    commit_interval: float = 0.0
    commit_rows: int = 0
    commit_wait: float = 10.0
    # True: a load of a table with `drift` records its late changes in `_floe_drift`, in its transaction.
    records_drift: ClassVar[bool] = False
    # Parquet codec of the stage files ("zstd", "lz4", "snappy", "none"): small files for a
    # remote stage, cheap CPU for a local one read at once.
    stage_compression: str = "zstd"
    # How many jobs `load_group` commits in ONE transaction (1: each job in its own).
    group_size: ClassVar[int] = 1
    # True: the destination keeps each stream's ledger (`stream.LEDGER`) in a table of its own, written in
    # the commit's transaction: a job's checkpoint holds only the entries it adds (a full refresh's
    # finishing job: all of them, replacing the ledger), `read_state` returns the whole ledger under
    # LEDGER, and `change_state` removes the entries of the versions it undoes. False: the engine puts
    # the whole ledger into every checkpoint it commits.
    keeps_ledger: ClassVar[bool] = False

    def __init__(self, name: str, config: Any, context: Context | None = None) -> None:
        self.name = name
        self.config = config
        self.context = context or Context()

    def commit_due(self, stream: Stream, rows: int, seconds: float) -> bool:
        """Whether a stream's checkpoints staged since its previous commit (`rows` rows; the commit
        was `seconds` ago) are committed now rather than folded into the next commit."""
        if stream.parent_key:  # a child table's commit replaces each staged parent's rows: folded into
            return True  # one commit, a parent staged in two checkpoints would keep both sets
        return seconds >= self.commit_interval and (rows >= self.commit_rows or seconds >= self.commit_wait)

    def stage_format(self, disposition: Disposition) -> str:
        """The format of a stream's stage files: "parquet", which bulk loaders read, or "arrow"
        (Arrow IPC) for a loader in this process."""
        return "parquet"

    @abstractmethod
    def check(self) -> list[str]:
        """Reach the destination (and its stage); return what was verified. Raise DestinationError saying exactly what is wrong."""

    @abstractmethod
    def read_state(self, source: str, stream: str) -> CommittedState:
        """The latest committed state of (source, stream) and its version."""

    def get_state(self, source: str, stream: str) -> State | None:
        """The latest committed state of (source, stream), or None if never loaded."""
        return self.read_state(source, stream).state

    def lease_name(self, source: str, stream: str) -> str:
        return f"{source}.{stream} -> {self.name}"

    @abstractmethod
    def try_lease(self, source: str, stream: str) -> Lease | Holder:
        """Take the lease of (source, stream) in this destination now, or say who holds it; never waits."""

    def acquire_lease(self, source: str, stream: str) -> Lease:
        """The lease of (source, stream), waiting up to `lease_wait_seconds` for a holder to finish;
        renewed in the background until released. Raises LeaseHeldError naming the holder."""
        lease = wait_for_lease(lambda: self.try_lease(source, stream), self.lease_name(source, stream),
                               self.config.lease_wait_seconds, f"destinations.{self.name}.lease_wait_seconds")
        lease.start()
        return lease

    @abstractmethod
    def load(self, job: LoadJob) -> None:
        """Commit `job` atomically (data + state + load row), or raise and commit nothing."""

    def load_group(self, jobs: list[LoadJob]) -> None:
        """Commit the jobs of several streams (one job per stream, at most `group_size` of them) in
        ONE transaction: all of them, or raise and commit none. With a `group_size` of 1, one after
        the other in order: a failure leaves the jobs before it committed."""
        for job in jobs:
            self.load(job)

    @abstractmethod
    def begin_refresh(self, table: TableSpec) -> None:
        """Before a full refresh of `table`: discard what an interrupted refresh of it left behind."""

    @abstractmethod
    def finish_refresh(self, job: LoadJob, scope: RefreshScope | None = None) -> None:
        """Commit a full refresh atomically: the rows its `refresh` jobs loaded replace the table's rows
        (only those whose `scope.column` >= `scope.start`, with a scope), and `job.checkpoint` becomes the
        state. `job.files` are every file the refresh staged (already loaded, gone from the stage):
        `job.rows` counts them, their schemas are the columns' types. Raise and commit nothing on failure."""

    # --- the load log (`_floe_loads`): notices of failure and recovery read it ---------------------
    @abstractmethod
    def record_failure(self, job: LoadJob, error: str) -> None:
        """Best effort: note a failed load in the load log (outside the failed transaction)."""

    @abstractmethod
    def record_recovery(self, job: LoadJob) -> None:
        """Note in the load log that (job.source, job.stream) loads again after a failure (status
        `recovered`), so that the next run does not report the recovery again."""

    @abstractmethod
    def last_load_status(self, source: str, stream: str, before: datetime) -> str | None:
        """The status (`committed`, `failed`, `recovered`, ...) of the stream's last load-log entry
        started before `before`; None when there is none (or no load log yet)."""

    # --- the run log (`_floe_runs`, see floe.core.runs): `floe runs` reads it ----------------------
    @abstractmethod
    def record_run(self, run: RunRecord) -> None:
        """Write the run's row in the run log, replacing the row of the same run id, in a transaction of
        its own (creating the run log if needed). Raise on failure (callers treat it as best effort)."""

    @abstractmethod
    def runs(self, limit: int = 20) -> list[RunRecord]:
        """The last `limit` runs in the run log, newest first (none: no run log yet); creates nothing."""

    def states(self) -> list[dict[str, Any]]:
        """Every (source, stream) latest state, for `floe state show`."""
        return []

    def drift_ages(self, source: str, stream: str) -> list[tuple[Any, ...]]:
        """Of a destination that `records_drift`: per age in days of the stream's recorded re-reads (see
        floe.destinations.drift.ages_query), (age, re-reads, rows re-read, rows changed, sum of amount
        changes, sum of amounts before), by age; none before the first re-read."""
        raise NotImplementedError(f"{type(self).__name__} does not record drift")

    @abstractmethod
    def state_log(self, source: str, stream: str, limit: int | None = None) -> list[StateVersion]:
        """The stream's committed state versions that the destination keeps, newest first (at most `limit`)."""

    @abstractmethod
    def change_state(self, change: StateChange) -> int:
        """Commit `change` atomically (its rows deleted, its state as the new latest version, a row in the
        load log) and return how many rows were deleted; or raise and change nothing. The caller holds
        the stream's lease (`change.lease`)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""


REFRESH_PREFIX = "_floe_refresh_"


def refresh_copy(spec: TableSpec) -> TableSpec:
    """The table a full refresh of `spec` fills before it replaces `spec`'s rows: same columns, no views."""
    return dataclasses.replace(spec, table=REFRESH_PREFIX + spec.table, views=())


def staged_column(batch: pa.RecordBatch, target: pa.Field, first_seq: int) -> tuple[pa.Array, pa.Field | None]:
    """The column of `batch` that feeds `target` in a staged part file, before the warehouse's own casts.

    `SEQ` becomes the arrival order starting at `first_seq`; a column the batch lacks becomes NULLs;
    nested values (lists, structs, maps) become JSON text. Returns the column and the batch's own field
    (None when the column was made up here)."""
    import numpy as np
    import pyarrow as pa

    if target.name == SEQ:
        return pa.array(np.arange(first_seq, first_seq + batch.num_rows, dtype=np.int64)), None
    idx = batch.schema.get_field_index(target.name)
    if idx < 0:
        return pa.nulls(batch.num_rows, target.type), None
    column, source = batch.column(idx), batch.schema.field(idx)
    if arrow_type_key(source.type) == "nested":
        column = nested_as_json(column)
    return column, source


def nested_as_json(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Lists, structs and maps as JSON text (NULL stays NULL): what warehouses load into JSON columns."""
    import pyarrow as pa

    return pa.array([None if v is None else orjson.dumps(v, default=str).decode() for v in column.to_pylist()],
                    pa.string())


def arrow_type_key(t: pa.DataType) -> str:
    """A stable name for an Arrow type, used as the key of every warehouse's type map."""
    import pyarrow as pa

    if pa.types.is_timestamp(t):
        return "timestamp_tz" if t.tz else "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int64" if t.bit_width == 64 or pa.types.is_unsigned_integer(t) else "int32"
    if pa.types.is_floating(t):
        return "float64"
    if pa.types.is_decimal(t):
        return "decimal"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
        return "nested"
    return "string"
