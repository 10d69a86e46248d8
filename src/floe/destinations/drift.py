"""`_floe_drift`: what a lookback re-read changed, by the rows' age in days, recorded in the load's transaction.

One statement per load compares the re-read rows with the rows loaded before them, by key, in the
warehouse (nothing goes through Python), and inserts one row per age in days: rows re-read, rows
changed, the sum of the absolute changes of the stream's amounts and the sum of those amounts before.

- An append stream (each retrieval kept, e.g. Singular) is compared after its insert: the load's rows
  (`_floe_load_id`) against the latest earlier row of each key on the days the load covers.
- A merge stream (e.g. Twilio) is compared before its merge: the staged rows against the table.

The SQL is the portable subset the SQL destinations speak (DuckDB, PostgreSQL, Redshift); BigQuery's
differences are data (`BIGQUERY`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from floe.core.destination import LoadJob

DRIFT_TABLE = "_floe_drift"


@dataclass(frozen=True)
class DriftSql:
    """What differs between warehouses in these statements, as data."""

    text_type: str = "TEXT"
    int_type: str = "BIGINT"
    float_type: str = "DOUBLE PRECISION"
    date_type: str = "DATE"
    age_days: str = "{day} - {date}"  # whole days from DATE {date} to DATE {day}


BIGQUERY = DriftSql(text_type="STRING", int_type="INT64", float_type="FLOAT64", age_days="DATE_DIFF({day}, {date}, DAY)")


@dataclass(frozen=True)
class DriftStatement:
    sql: str
    params: tuple[Any, ...]  # for the three `values` placeholders: source, stream, load id
    before_rows: bool  # run it before the disposition's statements (a merge overwrites the old rows)


def drift_ddl(table: str, style: DriftSql) -> str:
    t, i, f = style.text_type, style.int_type, style.float_type
    return (f"CREATE TABLE IF NOT EXISTS {table} (source {t}, stream {t}, load_id {t}, loaded_on DATE, "
            f"age_days {i}, rows_reread {i}, rows_changed {i}, amount_changed {f}, amount_before {f})")


def ages_query(table: str, source: str, stream: str) -> str:
    """Per age in days, over every recorded re-read of one stream (`source`, `stream`: rendered values):
    age, re-reads, rows re-read, rows changed, sum of amount changes, sum of amounts before."""
    return (f"SELECT age_days, COUNT(DISTINCT load_id), SUM(rows_reread), SUM(rows_changed), SUM(amount_changed), "
            f"SUM(amount_before) FROM {table} WHERE source = {source} AND stream = {stream} "
            "GROUP BY age_days ORDER BY age_days")


def drift_statement(job: LoadJob, style: DriftSql, *, target: str, staging: str, drift_table: str,
                    quote: Callable[[str], str], values: tuple[str, str, str]) -> DriftStatement | None:
    """The INSERT into `drift_table` recording `job`'s late changes (None: the table records none).
    `target`, `staging`: the rendered table names; `values`: how the statement names the source,
    stream and load id (placeholders bound to `params`)."""
    spec, drift = job.table, job.table.drift
    if drift is None or spec.disposition not in ("append", "merge"):
        return None
    q = quote
    load = job.load_id.replace("'", "''")
    day = f"DATE '{job.started_at.date().isoformat()}'"
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
        a, b, t = f"n.{q(column)}", f"o.{q(column)}", style.text_type
        return f"COALESCE(CAST({a} AS {t}), '') = COALESCE(CAST({b} AS {t}), '') AND ({a} IS NULL) = ({b} IS NULL)"

    def number(side: str, column: str) -> str:
        return f"COALESCE(CAST({side}.{q(column)} AS {style.float_type}), 0)"

    changed = " OR ".join(f"NOT {same(c)}" for c in drift.compare) or "1 = 0"
    delta = " + ".join(f"ABS({number('n', c)} - {number('o', c)})" for c in drift.amounts) or "0"
    before = " + ".join(f"ABS({number('o', c)})" for c in drift.amounts) or "0"
    age = style.age_days.format(day=day, date=f"CAST(n.{q(drift.day)} AS {style.date_type})")
    source, stream, load_id = values
    sql = (
        f"INSERT INTO {drift_table} (source, stream, load_id, loaded_on, "
        "age_days, rows_reread, rows_changed, amount_changed, amount_before) "
        f"SELECT {source}, {stream}, {load_id}, {day}, age_days, COUNT(*), SUM(changed), SUM(changed * delta), "
        f"SUM(before) FROM (SELECT {age} AS age_days, "
        f"CASE WHEN {changed} THEN 1 ELSE 0 END AS changed, {delta} AS delta, {before} AS before "
        f"FROM {new} n JOIN {old} o ON {' AND '.join(same_key(k) for k in drift.key)}) d GROUP BY age_days"
    )
    return DriftStatement(sql, (job.source, job.stream, job.load_id), spec.disposition == "merge")
