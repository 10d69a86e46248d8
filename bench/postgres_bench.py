"""Benchmark: 1,000,000 rows of a 20-column table into PostgreSQL, end to end.

    .venv/bin/python bench/postgres_bench.py [--rows 1000000] [--disposition append|merge] [--checkpoint-rows 250000]

A throwaway PostgreSQL server is started with `floe.testing.postgres.PostgresServer` (fsync on, the
server's defaults otherwise). The load runs in a child process (its peak RSS is read with
getrusage(RUSAGE_CHILDREN)): a source yields Arrow batches of 50,000 rows with a checkpoint every
`--checkpoint-rows` (one generated batch re-used with fresh ids, so the generator costs nothing),
floe's pipeline stages them as Parquet and the PostgreSQL destination COPYs
them in, committing rows + state per checkpoint. The clock runs from the first batch to the last
commit. Target: >= 150,000 rows/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

BATCH = 50_000


def make_batch(start: int, n: int) -> pa.RecordBatch:
    """20 columns: 5 integers, 4 floats, 5 strings, 3 timestamps, 2 booleans, 1 JSON document."""
    ids = pa.array(range(start, start + n), pa.int64())
    base = datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1_000_000
    micros = pc.add(pc.multiply(ids, 1_000_003), int(base))
    columns: dict[str, pa.Array] = {"id": ids}
    for i in range(1, 5):
        columns[f"int_{i}"] = pc.multiply(ids, i * 7)
    for i in range(4):
        columns[f"float_{i}"] = pc.divide(pc.cast(ids, pa.float64()), 3.0 + i)
    for i in range(5):
        columns[f"text_{i}"] = pc.binary_join_element_wise(f"value-{i}-", pc.cast(ids, pa.string()), "")
    for i in range(3):
        columns[f"ts_{i}"] = pc.cast(pc.add(micros, i * 60_000_000), pa.timestamp("us", "UTC"))
    columns["flag_0"] = pc.equal(pc.bit_wise_and(ids, 1), 0)
    columns["flag_1"] = pc.equal(pc.bit_wise_and(ids, 2), 0)
    columns["doc"] = pc.binary_join_element_wise('{"k": ', pc.cast(ids, pa.string()), "}", "")
    fields = [pa.field(k, v.type) for k, v in columns.items()]
    fields[-1] = fields[-1].with_metadata({b"floe.json": b"1"})
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=pa.schema(fields))


def child(args: argparse.Namespace) -> None:
    """Load the rows through floe's pipeline; print one JSON line with the timing."""
    from floe.core.stream import Batch, Source, State, Stream
    from floe.destinations.postgres import PostgresConfig, PostgresDestination
    from floe.engine.pipeline import run_stream

    class Wide(Stream):
        name = "wide"
        schema = make_batch(0, 1).schema
        primary_key = ("id",)
        disposition = args.disposition

        async def read(self, state: State | None) -> AsyncIterator[Batch]:
            # One generated batch, re-used with fresh ids: the clock measures floe, not the generator.
            template = make_batch(0, BATCH)
            for start in range(0, args.rows, BATCH):
                n = min(BATCH, args.rows - start)
                end = start + n
                done = end % args.checkpoint_rows == 0 or end == args.rows
                batch = template.slice(0, n)
                batch = batch.set_column(0, "id", pc.add(batch.column(0), start))
                yield Batch(batch, {"next": end} if done else None)

    class Bench(Source):
        def streams(self) -> list[Stream]:
            return [Wide()]

    dest = PostgresDestination("pg", PostgresConfig.model_validate(json.loads(args.settings)))
    stream = Wide()
    started = time.monotonic()
    result = asyncio.run(run_stream(Bench("bench", None), stream, dest, Path(args.stage)))
    seconds = time.monotonic() - started
    count = dest.query("SELECT COUNT(*) FROM bench.wide")[0][0]
    dest.close()
    print(json.dumps({"seconds": seconds, "rows": result.rows, "commits": result.commits, "count": count,
                      "error": result.error}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--disposition", choices=["append", "merge"], default="append")
    parser.add_argument("--checkpoint-rows", type=int, default=250_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from floe.testing.postgres import PostgresServer

    with PostgresServer() as server, tempfile.TemporaryDirectory(prefix="floe-bench-") as stage:
        db = server.create_database("bench")
        cmd = [sys.executable, __file__, "--child", "--rows", str(args.rows), "--disposition", args.disposition,
               "--checkpoint-rows", str(args.checkpoint_rows), "--settings", json.dumps(db.config()),
               "--stage", stage]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        load = os.getloadavg()[0]
    if result["error"] or result["count"] != args.rows:
        raise SystemExit(f"load failed: {result}")
    rate = args.rows / result["seconds"]
    print(f"{args.rows:,} rows x 20 columns, {args.disposition}, {result['commits']} commits: "
          f"{result['seconds']:.2f} s = {rate:,.0f} rows/s; floe process: {cpu:.1f} CPU s, peak RSS {peak:.0f} MB; "
          f"load average {load:.1f} ({platform.machine()}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
