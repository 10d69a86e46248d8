"""Row quarantine (`bad_rows: quarantine`): the rows a warehouse cannot hold go to `_floe_rejected`.

Before a load, each staged file of a quarantining stream is checked column by column with Arrow
compute (and DuckDB's `json_valid`, vectorised) against the destination's `RowRules`: text longer
than the warehouse stores (Redshift's 65,535-byte VARCHAR), JSON columns that do not hold a JSON
document, JSON that PostgreSQL's jsonb refuses (the `\\u0000` escape). A file without such rows is
loaded as it is; a file with some is loaded through a copy without them (written beside it in the
stage, deleted after the load), and the rows themselves, as JSON with their reason, are inserted
into `_floe_rejected` in the load's transaction. Only rejected rows are ever turned into Python
values. More than `bad_rows_max` rejected rows in one commit fail it whole, as `bad_rows: fail`
fails on the first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from floe.core.destination import LoadJob, Rejected, StagedFile, is_json
from floe.core.errors import DestinationError

if TYPE_CHECKING:
    import pyarrow as pa

    from floe.destinations.sql import SqlDestination

REJECTED_TABLE = "_floe_rejected"
# A `\u0000` escape not itself escaped (`\\u0000` is a backslash and text): PostgreSQL's jsonb refuses it.
NUL_ESCAPE = r"(?:^|[^\\])(?:\\\\)*\\u0000"


@dataclass(frozen=True)
class RowRules:
    """The values a destination cannot store, as data."""

    max_text_bytes: int | None = None  # text longer than this many bytes
    max_json_bytes: int | None = None  # a JSON document longer than this many bytes
    json_documents: bool = True  # a JSON column's value must be one JSON document
    json_nul_escape: bool = False  # a JSON document may not hold the `\u0000` escape


def row_reasons(table: pa.Table, rules: RowRules) -> pa.ChunkedArray | pa.Array:
    """Per row, why the destination cannot store it (NULL: it can), from its first bad column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reason: pa.Array | pa.ChunkedArray = pa.nulls(table.num_rows, pa.string())
    for f in table.schema:
        if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
            continue
        column = table.column(f.name)
        checks: list[tuple[pa.Array | pa.ChunkedArray, str]] = []
        limit = rules.max_json_bytes if is_json(f) else rules.max_text_bytes
        if limit is not None:
            checks.append((pc.greater(pc.binary_length(column), limit),
                           f"column {f.name!r}: {'JSON' if is_json(f) else 'text'} over the {limit:,}-byte limit"))
        if is_json(f) and rules.json_documents:
            checks.append((pc.invert(json_valid(column)), f"column {f.name!r}: not a JSON document"))
        if is_json(f) and rules.json_nul_escape and pc.any(pc.match_substring(column, "\\u0000")).as_py():
            checks.append((pc.match_substring_regex(column, NUL_ESCAPE),  # the rare column holding one
                           f"column {f.name!r}: JSON holding \\u0000, which PostgreSQL's jsonb refuses"))
        for bad, why in checks:
            bad = pc.fill_null(bad, False)
            reason = pc.if_else(pc.and_(bad, pc.is_null(reason)), pa.scalar(why), reason)
    return reason


def json_valid(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Whether each value is one JSON document (NULL stays NULL), by DuckDB's `json_valid`, vectorised."""
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    try:
        values = pa.table({"v": column})
        con.register("t", values)
        result = con.sql("SELECT json_valid(v) FROM t").to_arrow_table()
        return result.column(0).combine_chunks()
    finally:
        con.close()


def read_file(staged: StagedFile) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if staged.path.suffix == ".parquet":
        return pq.read_table(staged.path)
    with pa.memory_map(str(staged.path)) as source:
        return pa.ipc.open_file(source).read_all()


def write_like(table: pa.Table, staged: StagedFile) -> Path:
    """`table` in the format of `staged`, beside it (the name says it is quarantine's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = staged.path.with_name(f"{staged.path.stem}.kept{staged.path.suffix}")
    if staged.path.suffix == ".parquet":
        pq.write_table(table, path, compression="zstd")
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return path


@contextmanager
def quarantined(jobs: Sequence[LoadJob], rules: RowRules, destination: str) -> Iterator[list[LoadJob]]:
    """The jobs with the rows the destination cannot store left out (and listed in `job.rejected`), for
    the streams that quarantine; the copies of the files are deleted on exit. A job already checked,
    or of a stream that does not quarantine, is as it was. Raises DestinationError over `bad_rows_max`."""
    import pyarrow.compute as pc

    written: list[Path] = []
    try:
        out = []
        for job in jobs:
            if job.table.bad_rows != "quarantine" or job.rejected is not None:
                out.append(job)
                continue
            files, reasons, rows = [], [], []
            for staged in job.files:
                table = read_file(staged)
                reason = row_reasons(table, rules)
                bad = pc.is_valid(reason)
                if not pc.any(bad).as_py():
                    files.append(staged)
                    continue
                rejected = table.filter(bad)
                reasons += pc.filter(reason, bad).to_pylist()
                rows += [orjson.dumps(r, default=str).decode() for r in rejected.to_pylist()]
                kept = table.filter(pc.invert(bad))
                written.append(write_like(kept, staged))
                files.append(StagedFile(written[-1], kept.num_rows, staged.schema))
            limit = job.table.bad_rows_max
            if limit is not None and len(reasons) > limit:
                raise DestinationError(
                    f"{destination}: {job.source}.{job.stream}: {len(reasons)} rows cannot be loaded, over "
                    f"bad_rows_max {limit}; nothing committed. The first: {reasons[0]}")
            if reasons:
                job.details["rejected_rows"] = len(reasons)  # the caller's job reports it too
            out.append(dataclasses.replace(job, files=files, rejected=Rejected(reasons, rows)))
        yield out
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def insert_rejected(destination: SqlDestination, cur: Any, job: LoadJob) -> None:
    """Insert `job.rejected` into `_floe_rejected` (created if missing), inside the load's transaction.
    A row's JSON is cut to `max_text_bytes` where the warehouse has such a limit (the reason says why)."""
    if not job.rejected:
        return
    t, ts, p = destination.text_type, destination.timestamp_tz_type, destination.placeholder
    table = destination.qualified(destination.meta_schema, REJECTED_TABLE)
    cur.execute(f"CREATE TABLE IF NOT EXISTS {table} (source {t}, stream {t}, load_id {t}, reason {t}, "
                f"record {t}, rejected_at {ts})")
    limit = destination.row_rules().max_text_bytes
    now = datetime.now(UTC)
    rows = [(job.source, job.stream, job.load_id, reason,
             row if limit is None else row.encode()[:limit].decode(errors="ignore"), now)
            for reason, row in zip(job.rejected.reasons, job.rejected.rows, strict=True)]
    cur.executemany(f"INSERT INTO {table} (source, stream, load_id, reason, record, rejected_at) "
                    f"VALUES ({', '.join([p] * 6)})", rows)
