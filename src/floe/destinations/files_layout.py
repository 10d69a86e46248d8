"""The files destination's objects: their names, formats and readers (see floe.destinations.files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from floe.core.destination import SEQ

EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl", "csv": "csv"}
READERS = {"parquet": "read_parquet", "jsonl": "read_json_auto", "csv": "read_csv_auto"}  # DuckDB's, by format


def load_id_of(key: str) -> str:
    """The load id of a data object (its name is `<load_id>-<n>.<extension>`)."""
    return key.rsplit("/", 1)[-1].rsplit("-", 1)[0]


def own_load_ids(record: dict[str, Any]) -> set[str]:
    """The load ids of the data objects a state object's commit wrote (a full refresh lists the older
    objects it kept too: the caller tells those apart)."""
    return {record["load_id"], *(load_id_of(key) for key in record.get("files", []))}


def last_per_key(tables: list[pa.Table], key: Sequence[str]) -> list[pa.Table]:
    """`tables` (a load's staged files, in arrival order) less each row whose key comes again later
    (NULL key values match each other)."""
    keys = pa.concat_tables([t.select(list(key)) for t in tables], promote_options="permissive")
    position = pa.array(np.arange(keys.num_rows, dtype=np.int64))
    last = keys.append_column(SEQ, position).group_by(list(key), use_threads=False).aggregate([(SEQ, "max")])
    keep = pc.is_in(position, value_set=last[f"{SEQ}_max"].combine_chunks())
    out, start = [], 0
    for table in tables:
        out.append(table.filter(keep.slice(start, table.num_rows)))
        start += table.num_rows
    return out


def write_rows(table: pa.Table, path: Path, fmt: str, gzip: bool) -> None:
    """`table` as one data file at `path`: Parquet (zstd), JSON Lines or CSV with a header (gzipped if `gzip`)."""
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd")
        return
    con = duckdb.connect()
    try:
        con.register("rows", table)
        options = "FORMAT json" if fmt == "jsonl" else "FORMAT csv, HEADER true"
        if gzip:
            options += ", COMPRESSION gzip"
        target = str(path).replace("'", "''")
        con.execute(f"COPY rows TO '{target}' ({options})")
    finally:
        con.close()


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
