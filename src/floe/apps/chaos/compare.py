"""Compare one stream's rows in two scratch warehouses: rows, distinct keys, an order-independent checksum.

A table is read back through the destination (`RowReader`) as Arrow, without floe's own `_floe_*`
columns and the columns a run stamps (`Stream.run_columns`). Both sides then go through one in-memory
DuckDB query: rows are grouped by key (the stream's primary key, or the whole row when it has none),
each group counted and checksummed (the sum of the rows' hashes, so row order never matters), and the
groups of the two sides joined. Extra copies of a key are duplicates, missing copies are losses, and a
key present as often on both sides with other values is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from floe.core.destination import Destination, RowReader, TableSpec
from floe.core.errors import FloeError
from floe.core.stream import Stream
from floe.destinations.sql import SqlDestination


@dataclass(frozen=True)
class Difference:
    rows: int  # in the reference (clean) table
    keys: int  # distinct keys in the reference table
    duplicates: int = 0
    losses: int = 0
    changed: int = 0
    note: str = ""  # a difference that is not about rows: a missing table, other columns

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.losses or self.changed or self.note)


def read_rows(destination: Destination, source: str, stream: Stream) -> pa.Table | None:
    """The stream's current rows in `destination` (its `current_view`, else its table); None: no table."""
    if not isinstance(destination, SqlDestination) or not isinstance(destination, RowReader):
        raise FloeError(f"{destination.name}: floe chaos reads tables back from SQL destinations only")
    spec = destination.located(TableSpec(source, stream.current_view or stream.name, pa.schema([])))
    with destination.transaction() as cur:
        if not destination.existing_columns(cur, spec.schema_name, spec.table):
            return None
    batches = list(destination.read_batches(f"SELECT * FROM {destination.qualified(spec.schema_name, spec.table)}"))
    if not batches:
        return pa.table({})  # no rows: an empty table
    table = pa.Table.from_batches(batches)
    drop = [c for c in table.column_names if c.startswith("_floe_") or c in stream.run_columns]
    return table.drop_columns(drop)


def compare(clean: pa.Table | None, chaos: pa.Table | None, key: tuple[str, ...]) -> Difference:
    """How `chaos` differs from `clean` (see the module docstring)."""
    if clean is None and chaos is None:
        return Difference(0, 0)
    if clean is None or chaos is None:
        present = clean if clean is not None else chaos
        assert present is not None
        return Difference(clean.num_rows if clean is not None else 0, 0,
                          duplicates=chaos.num_rows if chaos is not None else 0,
                          losses=clean.num_rows if clean is not None else 0,
                          note="the table exists only in the " + ("clean run" if clean is not None else "chaos run"))
    if clean.num_columns == 0 or chaos.num_columns == 0:  # a side without rows has no columns read back
        return Difference(clean.num_rows, clean.num_rows, duplicates=chaos.num_rows, losses=clean.num_rows) \
            if clean.num_rows != chaos.num_rows else Difference(clean.num_rows, clean.num_rows)
    columns = sorted(clean.column_names)
    note = ""
    if set(columns) != set(chaos.column_names):
        only = sorted(set(columns) ^ set(chaos.column_names))
        note = f"columns differ: {', '.join(only)}"
        columns = [c for c in columns if c in chaos.column_names]
    keys = [c for c in key if c in columns] or columns
    row_hash = f"hash({', '.join(_q(c) for c in columns)})"
    key_hash = f"hash({', '.join(_q(c) for c in keys)})"
    groups = (f"SELECT {key_hash} AS k, count(*) AS n, sum({row_hash}::HUGEINT) AS h FROM {{side}} GROUP BY 1")
    with duckdb.connect() as con:
        con.register("clean_rows", clean.select(columns))
        con.register("chaos_rows", chaos.select(columns))
        found = con.execute(
            f"WITH a AS ({groups.format(side='clean_rows')}), b AS ({groups.format(side='chaos_rows')}) "
            "SELECT coalesce(sum(a.n), 0), count(a.k), "
            "coalesce(sum(greatest(coalesce(b.n, 0) - coalesce(a.n, 0), 0)), 0), "
            "coalesce(sum(greatest(coalesce(a.n, 0) - coalesce(b.n, 0), 0)), 0), "
            "count(*) FILTER (WHERE a.n = b.n AND a.h <> b.h) "
            "FROM a FULL OUTER JOIN b ON a.k = b.k").fetchone()
    assert found is not None
    rows, distinct, duplicates, losses, changed = (int(v) for v in found)
    return Difference(rows, distinct, duplicates, losses, changed, note)


def _q(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'
