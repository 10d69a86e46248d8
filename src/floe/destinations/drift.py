"""`_floe_drift`: what a lookback re-read changed, by the rows' age in days, recorded in the load's transaction.

One statement per load compares the re-read rows with the rows loaded before them, by key, in the
warehouse (nothing goes through Python), and inserts one row per age in days: rows re-read, rows
changed, the sum of the absolute changes of the stream's amounts and the sum of those amounts before.

- An append stream (each retrieval kept, e.g. Singular) is compared after its insert: the load's rows
  (`_floe_load_id`) against the latest earlier row of each key on the days the load covers.
- A merge stream (e.g. Twilio) is compared before its merge: the staged rows against the table.

The SQL is the portable subset every SQL destination here speaks (DuckDB, PostgreSQL, Redshift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from floe.core.destination import LoadJob

DRIFT_TABLE = "_floe_drift"


class SqlDialect(Protocol):
    """What the statements need of a SQL destination."""

    @property
    def meta_schema(self) -> str: ...

    @property
    def placeholder(self) -> str: ...

    @property
    def text_type(self) -> str: ...

    def quote(self, identifier: str) -> str: ...

    def qualified(self, schema: str, table: str) -> str: ...


@dataclass(frozen=True)
class DriftStatement:
    sql: str
    params: tuple[Any, ...]
    before_rows: bool  # run it before the disposition's statements (a merge overwrites the old rows)


def drift_ddl(dialect: SqlDialect) -> str:
    t = dialect.text_type
    return (f"CREATE TABLE IF NOT EXISTS {dialect.qualified(dialect.meta_schema, DRIFT_TABLE)} ("
            f"source {t}, stream {t}, load_id {t}, loaded_on DATE, age_days BIGINT, rows_reread BIGINT, "
            "rows_changed BIGINT, amount_changed DOUBLE PRECISION, amount_before DOUBLE PRECISION)")


def drift_statement(dialect: SqlDialect, job: LoadJob, staging: str) -> DriftStatement | None:
    """The INSERT recording `job`'s late changes (None: the table records none)."""
    spec, drift = job.table, job.table.drift
    if drift is None or spec.disposition not in ("append", "merge"):
        return None
    q = dialect.quote
    target = dialect.qualified(spec.schema_name, spec.table)
    load = job.load_id.replace("'", "''")
    day = job.started_at.date().isoformat()
    if spec.disposition == "append":
        keys = ", ".join(q(k) for k in drift.key)
        new = f"(SELECT * FROM {target} WHERE _floe_load_id = '{load}')"
        window = f"(SELECT MIN({q(drift.day)}) FROM {target} WHERE _floe_load_id = '{load}')"
        old = (f"(SELECT * FROM (SELECT t.*, ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY _floe_loaded_at DESC) "
               f"AS _floe_rank FROM {target} t WHERE _floe_load_id <> '{load}' AND {q(drift.day)} >= {window}) r "
               "WHERE _floe_rank = 1)")
    else:
        new, old = staging, target

    def same(column: str) -> str:
        a, b = f"n.{q(column)}", f"o.{q(column)}"
        return f"({a} = {b} OR ({a} IS NULL AND {b} IS NULL))"

    def same_key(column: str) -> str:
        # Null-safe like same(), but made of `=` alone, which a hash join can use: with the OR,
        # PostgreSQL and Redshift join by a nested loop over the whole table (hours for a large one).
        a, b = f"n.{q(column)}", f"o.{q(column)}"
        return (f"COALESCE(CAST({a} AS {dialect.text_type}), '') = COALESCE(CAST({b} AS {dialect.text_type}), '') "
                f"AND ({a} IS NULL) = ({b} IS NULL)")

    def number(side: str, column: str) -> str:
        return f"COALESCE(CAST({side}.{q(column)} AS DOUBLE PRECISION), 0)"

    changed = " OR ".join(f"NOT {same(c)}" for c in drift.compare) or "1 = 0"
    delta = " + ".join(f"ABS({number('n', c)} - {number('o', c)})" for c in drift.amounts) or "0"
    before = " + ".join(f"ABS({number('o', c)})" for c in drift.amounts) or "0"
    p = dialect.placeholder
    sql = (
        f"INSERT INTO {dialect.qualified(dialect.meta_schema, DRIFT_TABLE)} (source, stream, load_id, loaded_on, "
        "age_days, rows_reread, rows_changed, amount_changed, amount_before) "
        f"SELECT {p}, {p}, {p}, DATE '{day}', age_days, COUNT(*), SUM(changed), SUM(changed * delta), SUM(before) "
        f"FROM (SELECT DATE '{day}' - CAST(n.{q(drift.day)} AS DATE) AS age_days, "
        f"CASE WHEN {changed} THEN 1 ELSE 0 END AS changed, {delta} AS delta, {before} AS before "
        f"FROM {new} n JOIN {old} o ON {' AND '.join(same_key(k) for k in drift.key)}) d GROUP BY age_days"
    )
    return DriftStatement(sql, (job.source, job.stream, job.load_id), spec.disposition == "merge")
