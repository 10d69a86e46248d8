"""The contracts sources implement: `Source` owns configuration, `Stream` yields data.

A stream's `read(state)` is an async iterator of `Batch`. A batch carries Arrow records, a
checkpoint, or both. A checkpoint is the stream state that is true once every record yielded
so far is durably loaded; the engine commits the records staged since the previous checkpoint
together with this state, in one transaction. Records after the last checkpoint are never
committed, so a source must end with a checkpoint. Sources never touch a database.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from floe.core.runs import new_run_id
from floe.core.settings import BadRows, SchemaChanges, SourceConfig

if TYPE_CHECKING:
    import pyarrow as pa

    MONEY: pa.Decimal128Type  # made on first use (see __getattr__): pyarrow loads only when needed

Disposition = Literal["append", "merge", "replace"]
State = dict[str, Any]
# MONEY, for amounts of money (prices, costs, revenue): an exact decimal with six places (a millionth of
# the currency unit) and twelve integer digits; DECIMAL(18,6) / NUMERIC(18,6) in every warehouse. Made by
# `__getattr__` below when first imported.
# A checkpoint's ledger entries (`{key: value}`, e.g. a file's name and checksum): what it ADDS to the
# stream's ledger. A stream reads the whole ledger back under this key of its state. Destinations that
# keep a ledger table (`Destination.keeps_ledger`) store the entries there, in the commit's transaction,
# so state versions stay small; others keep the whole ledger in each state version.
LEDGER = "_floe_files"


def __getattr__(name: str) -> Any:
    """`MONEY`, made (and kept) when first imported."""
    if name == "MONEY":
        import pyarrow as pa

        globals()["MONEY"] = money = pa.decimal128(18, 6)
        return money
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def merge_ledger(earlier: State | None, later: State | None) -> State | None:
    """`later` (a checkpoint, which supersedes `earlier`) with `earlier`'s ledger entries under its own."""
    if later is None or not earlier or not earlier.get(LEDGER):
        return later
    return {**later, LEDGER: {**earlier[LEDGER], **later.get(LEDGER, {})}}


@dataclass(frozen=True)
class Batch:
    """Records and/or a checkpoint. `checkpoint=None` means: not a commit point yet."""

    records: pa.RecordBatch | None = None
    checkpoint: State | None = None


@dataclass(frozen=True)
class RefreshScope:
    """The rows of a table that a re-read replaces: those whose `column` >= `start` (and < `end`, when
    set). A full refresh of an append stream has no end; a backfill has both."""

    column: str
    start: Any
    end: Any = None


@dataclass(frozen=True)
class DayRange:
    """The days `floe run --from FIRST --to LAST` backfills, both included (UTC)."""

    first: date
    last: date

    @property
    def start(self) -> datetime:
        """The first moment of the range (UTC midnight of `first`)."""
        return datetime.combine(self.first, time.min, UTC)

    @property
    def end(self) -> datetime:
        """The moment after the range (UTC midnight after `last`)."""
        return datetime.combine(self.last + timedelta(days=1), time.min, UTC)

    def __str__(self) -> str:
        return f"{self.first.isoformat()}..{self.last.isoformat()}"


@dataclass(frozen=True)
class DriftSpec:
    """How a stream that re-reads a lookback window measures late changes (kept in `_floe_drift`).

    A re-read row is one whose `key` is already in the table; it changed if any of `compare` differs
    from the row loaded before it, by the sum of the absolute differences of its `amounts` (numbers).
    Its age is the load's day minus its `day` column (a date or timestamp)."""

    key: tuple[str, ...]
    day: str
    compare: tuple[str, ...]
    amounts: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunOptions:
    """Options of one `floe run` that sources may honour."""

    reprocess: bool = False  # re-read inputs already recorded as processed (e.g. changed files)
    full_refresh: bool = False  # read from the configured beginning; the rows replace the table's (pipeline)
    backfill: DayRange | None = None  # re-read only these days; their rows replace the table's (pipeline)


@dataclass
class Context:
    """What a plugin needs from the run besides its own config."""

    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in the config resolve here
    options: RunOptions = field(default_factory=RunOptions)
    # What time it is for sources that decide what is ready (`floe serve` passes its own clock).
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # True once the run should stop at the next commit point (`floe serve` on SIGTERM).
    should_stop: Callable[[], bool] = field(default=lambda: False)
    run_id: str = field(default_factory=new_run_id)  # the run's id in `_floe_loads` and `_floe_runs`

    def path(self, value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


class PersonalData(Protocol):
    """Rules applied to a stream's batches by column name (the `pii:` policy, `infra.pii.ColumnPolicy`)."""

    def apply(self, records: pa.RecordBatch) -> pa.RecordBatch: ...

    def schema(self, schema: pa.Schema) -> pa.Schema: ...


class Stream(ABC):
    """One table's worth of data from a source.

    `schema` declares the columns the stream knows about; batches may carry a subset or extra
    columns (the destination adds columns it has not seen, never drops any).
    """

    name: str
    schema: pa.Schema
    primary_key: tuple[str, ...] = ()
    cursor_field: str | None = None
    disposition: Disposition = "append"
    parent_key: tuple[str, ...] = ()  # merge: replace all rows of a parent (see TableSpec.parent_key)
    parent_markers: bool = True  # see TableSpec.parent_markers
    views: tuple[tuple[str, str], ...] = ()  # (view name, SQL template) kept beside the table (see TableSpec.views)
    # The view holding the stream's current rows when its table keeps every retrieval (one of `views`;
    # None: the table itself), and the columns a run stamps rather than reads (its retrieval time).
    # `floe chaos` compares those rows, without those columns, between runs.
    current_view: str | None = None
    run_columns: tuple[str, ...] = ()
    drift: DriftSpec | None = None  # a lookback re-read whose late changes are recorded (see DriftSpec)
    # Set from the source's `schema_changes` / `widen_to_text` keys (see TableSpec.schema_changes).
    schema_changes: SchemaChanges = "evolve"
    widen_to_text: bool = False
    # Set from the source's `bad_rows` / `bad_rows_max` keys (see TableSpec.bad_rows).
    bad_rows: BadRows = "fail"
    bad_rows_max: int | None = None
    # Set by the engine from the source's `pii:` key: applied to every batch before it is staged or sent.
    personal_data: PersonalData | None = None

    def protected(self, records: pa.RecordBatch) -> pa.RecordBatch:
        """`records` as they may leave the source: the `pii:` policy applied."""
        return self.personal_data.apply(records) if self.personal_data is not None else records

    @property
    def landed_schema(self) -> pa.Schema:
        """The declared columns as they land (`schema` with the `pii:` policy applied)."""
        return self.personal_data.schema(self.schema) if self.personal_data is not None else self.schema

    @abstractmethod
    def read(self, state: State | None) -> AsyncIterator[Batch]:
        """Yield batches starting from `state` (None: never loaded before).

        Write it as an async generator: the engine closes it (`aclose`) as soon as it stops
        reading, done or failed, so its `finally` blocks release threads, tasks and files at once."""

    # The column whose value places a row in a day range: a stream that declares it can be backfilled
    # (`backfill_scope`, `read_range`). None: it cannot.
    range_column: str | None = None

    def backfill_scope(self, days: DayRange, state: State | None) -> RefreshScope:
        """The rows of the table a backfill of `days` replaces (an append stream; a merge stream upserts
        what `read_range` reads). `state` is the committed state the backfill leaves as it is: raise a
        ConfigError when the range cannot be re-read from it (e.g. it reaches past the bookmark, so that
        the next run would load those rows again)."""
        assert self.range_column is not None, f"{self.name} declares no range_column"
        return RefreshScope(self.range_column, days.start, days.end)

    def read_range(self, scope: RefreshScope) -> AsyncIterator[Batch]:
        """Yield exactly the rows of `scope` (a stream with a `range_column`). It ends with a checkpoint,
        as `read` does; the engine keeps the committed state instead of any checkpoint's."""
        raise NotImplementedError(f"{self.name} cannot read a range")

    def refresh_scope(self) -> RefreshScope | None:
        """What `read(None)` reads of the table, when a full refresh must keep the rows before it
        (an append stream read from a configured start time). None: the whole table."""
        return None

    def describe(self) -> str:
        return self.name


class RequestMetrics(Protocol):
    """Counts of a client's requests (the HTTP layer's `HttpMetrics`)."""

    requests: int
    retries: int
    seconds: float


class Source(ABC):
    """A configured source. `name` is its key in floe.yml: its warehouse schema and state key."""

    Config: ClassVar[type[SourceConfig]]

    def __init__(self, name: str, config: Any, context: Context | None = None) -> None:
        self.name = name
        self.config = config
        self.context = context or Context()

    @abstractmethod
    def streams(self) -> list[Stream]:
        """Every stream this source can produce (narrowed by `floe run --stream`)."""

    async def check(self) -> list[str]:
        """For `floe check`: verify what a run needs (paths, secrets, credentials by one cheap
        authenticated request) without loading or creating anything. Return what was verified;
        raise a FloeError saying what is wrong. By default: nothing beyond the validated config."""
        return []

    def next_due(self, states: dict[str, State | None], now: datetime) -> datetime | None:
        """For `floe serve`: when new data will next be available (None: use the `schedule:` key)."""
        return None

    def request_metrics(self) -> list[RequestMetrics]:
        """The metrics of every API client the source holds (for Singer's METRIC lines); none by default."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network clients and other resources the source owns."""
