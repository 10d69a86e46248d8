"""The contract every destination implements.

`load(job)` is the exactly-once point: in ONE transaction it creates or evolves the target table,
moves the staged rows in by the write disposition, writes the stream's new state version into
`_floe_state` and a row into `_floe_loads`. A crash anywhere leaves either the old data and old
state, or the new data and new state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import pyarrow as pa

from floe.config import DestinationConfig
from floe.engine.stage import StagedFile
from floe.engine.stream import Context, Disposition, State

META_JSON = b"floe.json"  # field metadata key: the column holds a JSON document (jsonb, SUPER, JSON)


def json_field(name: str) -> pa.Field:
    """An Arrow field for a JSON document stored as text; warehouses give it their JSON type."""
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
    parent_key: tuple[str, ...] = ()
    # Optional views recreated with every load, in the same transaction: (name, SELECT template).
    # The template may use {table} (the qualified target) and {columns} (its quoted column list);
    # keep it portable SQL with double-quoted identifiers. Destinations without views ignore it.
    views: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoadJob:
    """One commit: the staged files since the previous checkpoint plus the checkpoint itself."""

    load_id: str
    source: str
    stream: str
    table: TableSpec
    files: list[StagedFile]
    checkpoint: State
    started_at: datetime
    details: dict[str, Any] = field(default_factory=dict)  # extra counts kept in _floe_loads.details

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


class Destination(ABC):
    """A configured destination. `name` is its key in floe.yml; it owns its connection."""

    Config: ClassVar[type[DestinationConfig]]
    # Checkpoints that arrive sooner than this many seconds after the previous commit are folded
    # into the next commit (the later checkpoint supersedes the earlier). 0: commit every checkpoint.
    commit_interval: float = 0.0
    # Parquet codec of the stage files this destination loads ("zstd", "lz4", "snappy", "none"):
    # small files for a remote stage, cheap CPU for a local one read at once.
    stage_compression: str = "zstd"

    def __init__(self, name: str, config: Any, context: Context | None = None) -> None:
        self.name = name
        self.config = config
        self.context = context or Context()

    @abstractmethod
    def check(self) -> list[str]:
        """Reach the destination (and its stage); return what was verified. Raise DestinationError saying exactly what is wrong."""

    @abstractmethod
    def get_state(self, source: str, stream: str) -> State | None:
        """The latest committed state of (source, stream), or None if never loaded."""

    @abstractmethod
    def load(self, job: LoadJob) -> None:
        """Commit `job` atomically (data + state + load row), or raise and commit nothing."""

    def record_failure(self, job: LoadJob, error: str) -> None:  # noqa: B027 - optional hook
        """Best effort: note a failed load in `_floe_loads` (outside the failed transaction)."""

    def states(self) -> list[dict[str, Any]]:
        """Every (source, stream) latest state, for `floe state show`."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""
