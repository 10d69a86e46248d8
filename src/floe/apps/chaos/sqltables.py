"""Scratch tables standing in for a `sql` source's tables in `floe chaos`, on the `--postgres-url` server.

floe chaos never connects to the user's database, so it cannot copy their tables' columns. Each table
the source lists gets a scratch table of the same name, in a schema of its own
(`floe_chaos_<id>_src_<source>`, dropped with the experiment's other schemas), holding `SQL_ROWS`
generated rows: the table's `primary_key` columns (default `id`) and its `replication_key` column (as
configured; a timestamp unless it is a key column) and a few columns of common types. A source
without `tables` reads one table, `chaos_rows`. The rows are made once per experiment and only read.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psycopg

from floe.sources.sql import SqlSourceConfig, SqlTable

SQL_ROWS = 1200
SQL_BATCH_ROWS = 300  # the scratch source reads in batches this small (at most), so runs commit often
DEFAULT_TABLE = "chaos_rows"


def source_schema(token: str, source: str) -> str:
    return f"floe_chaos_{token}_src_{source}"


def tables_of(config: SqlSourceConfig) -> list[SqlTable]:
    listed = config.tables or [DEFAULT_TABLE]
    return [SqlTable(name=t) if isinstance(t, str) else t for t in listed]


def fill(url: str, schema: str, config: SqlSourceConfig, now: datetime, seed: int) -> None:
    """Create `schema` with a generated table for every table `config` reads (rows of the 30 days to `now`)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {_q(schema)}")
        for table in tables_of(config):
            keys = table.primary_key or ["id"]
            columns = [f"{_q(k)} BIGINT NOT NULL" for k in keys]
            values = ["g" for _ in keys]
            if table.replication_key and table.replication_key not in keys:
                columns.append(f"{_q(table.replication_key)} TIMESTAMPTZ NOT NULL")
                values.append("%(start)s::timestamptz + g * interval '1 minute'")
            columns += ["name TEXT", "amount NUMERIC(12, 2)", "attrs JSONB", "active BOOLEAN", "seen_on DATE"]
            values += ["'row ' || g",
                       "((g * 7919 + %(seed)s) %% 100000) / 100.0",
                       "jsonb_build_object('k', (g + %(seed)s) %% 7, 'tags', jsonb_build_array(g %% 3, 'x'))",
                       "CASE WHEN g %% 11 = 0 THEN NULL ELSE g %% 3 = 0 END",
                       "%(start)s::date + (g %% 30)"]
            name = f"{_q(schema)}.{_q(table.name)}"
            conn.execute(f"CREATE TABLE {name} ({', '.join(columns)}, "
                         f"PRIMARY KEY ({', '.join(_q(k) for k in keys)}))")
            params: dict[str, Any] = {"start": (now - timedelta(days=30)).isoformat(), "seed": seed, "rows": SQL_ROWS}
            conn.execute(f"INSERT INTO {name} SELECT {', '.join(values)} FROM generate_series(1, %(rows)s) g", params)


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
