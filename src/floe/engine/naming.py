"""A source's `naming:`: the column names its tables get (docs/types.md).

`as_is` (the default) keeps each name as the service sends it (FullStory's `EventStart`);
`snake_case` writes it in lower case with words split by `_` (`event_start`, `custom_vars`,
`PageURL` -> `page_url`). Only top-level column names change, never the keys inside a JSON value.
Two columns of one stream that become the same name are an error naming both: before anything
loads for the declared columns, at the batch that carries them for columns a service adds later.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from floe.core.errors import ConfigError, SourceError
from floe.core.settings import Naming
from floe.core.stream import Batch, DayRange, DriftSpec, RefreshScope, State, Stream

if TYPE_CHECKING:
    import pyarrow as pa


def snake_case(name: str) -> str:
    """`EventStart` -> `event_start`, `PageURL` -> `page_url`, `user.Name` -> `user_name`; snake_case stays."""
    words = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", words)
    return re.sub(r"[^0-9A-Za-z_]+", "_", words).lower()


def renames(names: Iterable[str], where: str) -> dict[str, str]:
    """Each name's snake_case form; a ValueError naming both columns when two end up the same."""
    out: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in names:
        new = snake_case(name)
        if new in taken and taken[new] != name:
            raise ValueError(f"{where}: columns {taken[new]!r} and {name!r} both become {new!r} with "
                             "naming: snake_case; rename one at the service, or use naming: as_is")
        taken[new] = name
        out[name] = new
    return out


class SnakeCaseStream(Stream):
    """`stream` with every column name (schema, keys, cursor, batches) in snake_case."""

    def __init__(self, stream: Stream, source: str) -> None:
        import pyarrow as pa

        self.inner, self.where = stream, f"sources.{source}.naming ({source}.{stream.name})"
        try:
            self.names = renames(stream.schema.names, self.where)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.name, self.disposition, self.views = stream.name, stream.disposition, stream.views
        self.parent_markers = stream.parent_markers
        self.schema = pa.schema([f.with_name(self.names[f.name]) for f in stream.schema])
        self.primary_key = tuple(self.rename(k) for k in stream.primary_key)
        self.parent_key = tuple(self.rename(k) for k in stream.parent_key)
        self.cursor_field = None if stream.cursor_field is None else self.rename(stream.cursor_field)
        self.schema_changes, self.widen_to_text = stream.schema_changes, stream.widen_to_text
        self.bad_rows, self.bad_rows_max = stream.bad_rows, stream.bad_rows_max
        self.range_column = None if stream.range_column is None else self.rename(stream.range_column)
        self.current_view, self.run_columns = stream.current_view, tuple(map(self.rename, stream.run_columns))
        drift = stream.drift
        self.drift = None if drift is None else DriftSpec(
            tuple(map(self.rename, drift.key)), self.rename(drift.day), tuple(map(self.rename, drift.compare)),
            tuple(map(self.rename, drift.amounts)))

    def rename(self, column: str) -> str:
        return self.names.get(column) or snake_case(column)

    def batch_names(self, schema: pa.Schema) -> list[str]:
        """The batch's column names in snake_case (a column the declared schema lacks: checked for collisions)."""
        unknown = [n for n in schema.names if n not in self.names]
        if unknown:
            try:
                self.names |= renames([*self.names, *unknown], self.where)
            except ValueError as exc:
                raise SourceError(str(exc)) from None
        return [self.names[n] for n in schema.names]

    def renamed(self, batch: Batch) -> Batch:
        records = batch.records
        if records is None:
            return batch
        return Batch(records.rename_columns(self.batch_names(records.schema)), batch.checkpoint)  # no copy

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        async for batch in self.inner.read(state):
            yield self.renamed(batch)

    def backfill_scope(self, days: DayRange, state: State | None) -> RefreshScope:
        scope = self.inner.backfill_scope(days, state)
        return RefreshScope(self.rename(scope.column), scope.start, scope.end)

    async def read_range(self, scope: RefreshScope) -> AsyncIterator[Batch]:
        original = next((name for name, new in self.names.items() if new == scope.column), scope.column)
        async for batch in self.inner.read_range(RefreshScope(original, scope.start, scope.end)):
            yield self.renamed(batch)

    def refresh_scope(self) -> RefreshScope | None:
        scope = self.inner.refresh_scope()
        return None if scope is None else RefreshScope(self.rename(scope.column), scope.start)

    def describe(self) -> str:
        return self.inner.describe()

    def __getattr__(self, name: str) -> Any:  # what else the source's own code asks of its stream
        return getattr(self.inner, name)


def named(stream: Stream, source: str, naming: Naming) -> Stream:
    """`stream` with the column names `naming` asks for."""
    return SnakeCaseStream(stream, source) if naming == "snake_case" else stream
