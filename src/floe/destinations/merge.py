"""The statements that move staged rows into a table by its disposition, for every SQL warehouse.

append: insert the staged rows. replace: delete every row, then insert. merge: keep the last staged
row of each primary key, delete the target's rows with those keys (with a parent key: every row of
each re-sent parent), then insert. Keys match null-safely: a NULL key replaces the NULL key's row.

What differs between warehouses is data, a `MergeStyle` (as sqlglot's dialects are): how duplicates
among the staged rows are dropped, how a delete joins the staged rows, whether one MERGE statement
does an upsert. The caller renders identifiers and values; this module only assembles statements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from floe.core.destination import TableSpec
from floe.core.errors import DestinationError

RANK = "_floe_rank"
NULL_SAFE_OR = "({a} = {b} OR ({a} IS NULL AND {b} IS NULL))"  # for warehouses without IS NOT DISTINCT FROM


@dataclass(frozen=True)
class MergeStyle:
    """How one warehouse writes the disposition statements.

    `latest_rows`: a query of the staged rows with one row per key, the last to arrive (placeholders
    {staging}, {keys}, {latest}: the arrival order, every part descending); with `dedupe="in_place"`
    the DELETE of the other rows from the staging table instead.
    `dedupe`: where the latest rows are read from: a temp table (`temp_table`, dropped at the end),
    the staging table itself once the other rows are gone (`in_place`, then ANALYZE of the joined columns), or the query
    inline (`inline`).
    `delete`: `using` (DELETE ... USING joined null-safely), `using_split_nulls` (one DELETE joined on
    `=`, which can use a hash join or an index, then a null-safe one over the staged keys holding
    NULL), or `exists` (DELETE ... WHERE EXISTS, for warehouses without DELETE ... USING).
    `upsert_statement`: a merge without a parent key is one MERGE statement (update or insert).
    `distinct_keys`: what the check that no key occurs twice among the staged rows groups them by
    ({keys}: the key columns). A hash of them holds less memory; a collision only costs the ranking.
    """

    latest_rows: str
    dedupe: Literal["temp_table", "in_place", "inline"]
    delete: Literal["using", "using_split_nulls", "exists"]
    null_safe_equals: str = "{a} IS NOT DISTINCT FROM {b}"
    alias: str = "s"  # of the incoming rows
    target_alias: str = "T"  # of the target, where a statement names it (`exists`, MERGE)
    delete_all: str = "DELETE FROM {target}"
    upsert_statement: bool = False
    distinct_keys: str = "{keys}"


RANKED = f"SELECT *, row_number() OVER (PARTITION BY {{keys}} ORDER BY {{latest}}) AS {RANK} FROM {{staging}}"
STANDARD = MergeStyle(latest_rows=f"SELECT * FROM ({RANKED}) AS ranked WHERE {RANK} = 1",
                      dedupe="temp_table", delete="using")


def disposition_sql(
    style: MergeStyle,
    spec: TableSpec,
    target: str,
    staging: str,
    *,
    columns: list[tuple[str, str]],
    order: str,
    load_id: str,
    now: str,
    quote: Callable[[str], str],
    unique_keys: bool = False,
) -> list[str]:
    """The statements, in order, that move the rows of `staging` into `target` (both rendered).

    `columns`: (quoted target column, value read from the incoming rows under `style.alias`);
    `order`: the staged rows' arrival order (a later row wins); `load_id`, `now`: SQL for the stamp
    columns. `unique_keys`: the caller checked that no primary key repeats among the staged rows, so
    a merge reads them directly instead of first ranking every row."""
    a = style.alias
    names = [*(name for name, _ in columns), "_floe_load_id", "_floe_loaded_at"]
    values = [*(value for _, value in columns), load_id, now]
    rows = staging  # what the INSERT reads
    statements: list[str] = []
    after: list[str] = []
    if spec.disposition == "replace":
        statements.append(style.delete_all.format(target=target))
    elif spec.disposition == "merge":
        if not spec.primary_key:
            raise DestinationError(f"{spec.schema_name}.{spec.table}: merge needs a primary key")
        if not unique_keys:
            latest = style.latest_rows.format(
                staging=staging, keys=", ".join(quote(k) for k in spec.primary_key),
                latest=", ".join(f"{part.strip()} DESC" for part in order.split(",")))
            if style.dedupe == "temp_table":  # ranked once, read by both the DELETE and the INSERT
                rows = f"{staging}_latest"
                statements.append(f"CREATE TEMP TABLE {rows} AS {latest}")
                after.append(f"DROP TABLE {rows}")
            elif style.dedupe == "in_place":  # only the (usually few) earlier rows of a repeated key go
                # Statistics of the columns the DELETE joins on (and the row count) are what its plan
                # needs; sampling every column (text, JSON) cost ~0.4 s a commit on PostgreSQL.
                joined = ", ".join(quote(k) for k in dict.fromkeys([*spec.parent_key, *spec.primary_key]))
                statements += [latest, f"ANALYZE {staging} ({joined})"]
            else:
                rows = f"({latest})"
        if style.upsert_statement and not spec.parent_key:
            t = style.target_alias
            match = " AND ".join(style.null_safe_equals.format(a=f"{t}.{quote(k)}", b=f"{a}.{quote(k)}")
                                 for k in spec.primary_key)
            updates = ", ".join(f"{n} = {v}" for n, v in zip(names, values, strict=True))
            return [f"MERGE {target} AS {t} USING {rows} AS {a} ON {match} WHEN MATCHED THEN UPDATE SET {updates} "
                    f"WHEN NOT MATCHED THEN INSERT ({', '.join(names)}) VALUES ({', '.join(values)})"]
        statements += _delete_sql(style, spec, target, staging if style.dedupe == "inline" else rows, quote)
    real_rows = spec.not_marker_sql(lambda k: f"{a}.{quote(k)}")
    statements.append(f"INSERT INTO {target} ({', '.join(names)}) SELECT {', '.join(values)} FROM {rows} AS {a}"
                      + (f" WHERE {real_rows}" if real_rows else ""))
    return statements + after


def _delete_sql(style: MergeStyle, spec: TableSpec, target: str, rows: str, quote: Callable[[str], str]) -> list[str]:
    """The target's rows that the staged keys replace (with a parent key: every row of each parent)."""
    a = style.alias
    keys = [quote(k) for k in spec.parent_key or spec.primary_key]
    if style.delete == "exists":
        t = style.target_alias
        match = " AND ".join(style.null_safe_equals.format(a=f"{t}.{k}", b=f"{a}.{k}") for k in keys)
        return [f"DELETE FROM {target} AS {t} WHERE EXISTS (SELECT 1 FROM {rows} AS {a} WHERE {match})"]
    deleted = rows
    if spec.parent_key:  # a parent's keys once, however many of its child rows were staged
        deleted = f"(SELECT DISTINCT {', '.join(keys)} FROM {rows})"
    null_safe = " AND ".join(style.null_safe_equals.format(a=f"{target}.{k}", b=f"{a}.{k}") for k in keys)
    if style.delete == "using":
        return [f"DELETE FROM {target} USING {deleted} AS {a} WHERE {null_safe}"]
    equal = " AND ".join(f"{target}.{k} = {a}.{k}" for k in keys)
    any_null = " OR ".join(f"{k} IS NULL" for k in keys)
    return [f"DELETE FROM {target} USING {deleted} AS {a} WHERE {equal}",
            f"DELETE FROM {target} USING (SELECT * FROM {deleted} AS d WHERE {any_null}) AS {a} WHERE {null_safe}"]
