"""Benchmark: a PostgreSQL table of 1,000,000 rows x 12 columns into DuckDB with `floe run`.

    .venv/bin/python bench/sql_source_bench.py [--rows 1000000] [--repeat 2] [--read-with copy cursor unload] [--dlt]

A throwaway PostgreSQL server is started with `floe.testing.postgres.PostgresServer` and the table
is built in it by `generate_series`: integer ids and counters, three text columns (one of them
NULL in a third of the rows), two doubles (one NULL in a tenth), a boolean, a timestamptz, a
date and a smallint. Each run is the real `floe run` CLI in a child process, with the default
config (`type: sql`, the table listed by name, a DuckDB destination) and, per `--read-with`, the
source's `read_with` set to `copy` or `cursor`; the runs of the two alternate (A/B in the same
minutes). Wall time, CPU seconds (user + sys) and peak RSS are the child's (wait4's rusage); the
server's own CPU is not in them. The DuckDB table is checked to hold every row.
`unload` is Redshift's UNLOAD path REPLAYED (Redshift cannot be reached from here): the same CLI
run, with `type: sql` pointing at the test double `tests/fixtures/redshift_unload.UnloadOnPostgres`
(a `redshift://` URL to the same server, `unload:` settings on a moto S3 server run by this
script, so the S3 server's CPU is not the child's either). The replay's UNLOAD reads the table
through a cursor and writes 32 Parquet parts (4 slices) to S3, in the child: its seconds are
printed apart (`replay s`, and the CPU seconds of the thread it runs on), and the figures without
them are floe's side (reading the parts back, converting, loading) -- on Redshift the UNLOAD runs
on the cluster instead, in its own time. Peak RSS still holds the replay's buffers (a part's rows).
`--dlt` also loads the table with dlt's `sql_database` source (pyarrow backend) from `.venv-bench`
(`make bench-deps`; needs `sqlalchemy` and `psycopg2-binary` there too).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg

ROOT = Path(__file__).resolve().parents[1]
FLOE = Path(sys.executable).parent / "floe"
DLT_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

TABLE = """
CREATE TABLE public.events (
  id bigint PRIMARY KEY, account_id integer NOT NULL, quantity integer, name text, email text, note text,
  amount double precision, score double precision, active boolean, created_at timestamptz, birthday date,
  priority smallint);
INSERT INTO public.events
SELECT i, i % 5000, (i * 7) % 1000, 'customer name ' || i, 'user' || i || '@example.com',
       CASE WHEN i % 3 = 0 THEN NULL ELSE (ARRAY['open', 'closed, for now', 'pending "review"'])[1 + i % 3] END,
       i * 1.25, CASE WHEN i % 10 = 0 THEN NULL ELSE sqrt(i) END, i % 2 = 0,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second 7 ms', date '1970-01-01' + (i % 20000),
       (i % 100)::smallint
FROM generate_series(1, {rows}) AS i;
"""

DLT_SCRIPT = """
import sys, dlt
from dlt.sources.sql_database import sql_database
url, db_path, pipelines_dir = sys.argv[1:4]
source = sql_database(url.replace("postgresql://", "postgresql+psycopg2://"), schema="public", table_names=["events"],
                      backend="pyarrow")
pipeline = dlt.pipeline(pipeline_name="sql_bench", destination=dlt.destinations.duckdb(db_path),
                        dataset_name="db", pipelines_dir=pipelines_dir)
pipeline.run(source)
"""


UNLOAD_REPLAY = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, os.environ["FLOE_ROOT"])
from floe.core.plugins import source_registry
from tests.fixtures.redshift_unload import UnloadOnPostgres


class TimedReplay(UnloadOnPostgres):
    rows_per_file = int(os.environ["FLOE_ROWS_PER_PART"])

    def run_unload(self, statement: str) -> int:
        started, cpu = time.perf_counter(), time.thread_time()  # (the replay runs on this thread only)
        rows = super().run_unload(statement)
        Path("replay-seconds").write_text(f"{time.perf_counter() - started} {time.thread_time() - cpu}")
        return rows


source_registry._entries["sql"] = "__main__:TimedReplay"  # type: sql is the replay in this process only
from floe.__main__ import main
sys.argv = ["floe", "run", "-c", "floe.yml"]
main()
"""


def run_child(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (MB) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stderr = child.stderr.read().decode() if child.stderr else ""
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed ({status}):\n{stderr[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def floe_run(url: str, work: Path, read_with: str) -> tuple[float, float, float, Path]:
    run = work / f"floe-{read_with}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "floe.yml").write_text(
        f"sources:\n  db:\n    type: sql\n    url: {url}\n    schema: public\n    tables: [events]\n"
        f"    read_with: {read_with}\n"
        "destinations:\n  warehouse:\n    type: duckdb\n    path: bench.duckdb\nstage: stage\n"
    )
    return (*run_child([str(FLOE), "run", "-c", "floe.yml"], run), run / "bench.duckdb")


def unload_run(url: str, work: Path, s3: dict[str, str], rows: int) -> tuple[float, float, float, Path, list[float]]:
    run = work / "floe-unload"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    redshift = url.replace("postgresql://", "redshift://")
    (run / "floe.yml").write_text(
        f"sources:\n  db:\n    type: sql\n    url: {redshift}\n    schema: public\n    tables: [events]\n"
        f"    unload: {{stage: 's3://{s3['bucket']}/unload', aws_access_key_id: testing, "
        f"aws_secret_access_key: testing, endpoint_url: '{s3['endpoint']}', region: us-east-1}}\n"
        "destinations:\n  warehouse:\n    type: duckdb\n    path: bench.duckdb\nstage: stage\n"
    )
    env = {**os.environ, "FLOE_ROOT": str(ROOT), "FLOE_ROWS_PER_PART": str(max(1, -(-rows // 32)))}
    seconds, cpu, peak = run_child([sys.executable, "-c", UNLOAD_REPLAY], run, env)
    return seconds, cpu, peak, run / "bench.duckdb", [float(v) for v in (run / "replay-seconds").read_text().split()]


def dlt_run(url: str, work: Path) -> tuple[float, float, float, Path]:
    run = work / "dlt"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "load.py").write_text(DLT_SCRIPT)
    db_path = run / "bench.duckdb"
    return (*run_child([str(DLT_PYTHON), "load.py", url, str(db_path), str(run / "pipelines")], run), db_path)


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server in this process, with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, str(ROOT / "src"))
    from floe.testing.postgres import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="bench")
        yield {"bucket": "bench", "endpoint": endpoint}
    finally:
        server.stop()


def count(db_path: Path) -> int:
    with duckdb.connect(str(db_path), read_only=True) as conn:
        return int(conn.execute("SELECT count(*) FROM db.events").fetchall()[0][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=2, help="rounds; each runs every reader once")
    parser.add_argument("--read-with", nargs="+", choices=["copy", "cursor", "unload"], default=["copy", "cursor"],
                        help="unload: Redshift's UNLOAD path replayed on PostgreSQL and a local S3 server")
    parser.add_argument("--dlt", action="store_true", help="also run dlt's sql_database (pyarrow backend)")
    args = parser.parse_args()
    if args.dlt and not DLT_PYTHON.exists():
        raise SystemExit(f"--dlt needs {DLT_PYTHON} (make bench-deps)")

    sys.path.insert(0, str(ROOT / "src"))
    from floe.testing.postgres import PostgresServer

    with PostgresServer() as server, tempfile.TemporaryDirectory(prefix="floe-bench-sql-") as tmp, \
            contextlib.ExitStack() as stack:
        s3 = stack.enter_context(s3_server()) if "unload" in args.read_with else {}
        db = server.create_database("bench")
        started = time.perf_counter()
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(TABLE.format(rows=args.rows))
            conn.execute("VACUUM ANALYZE public.events")
        print(f"table: {args.rows:,} rows x 12 columns built in {time.perf_counter() - started:.1f} s; "
              f"{platform.machine()}, {os.cpu_count()} cores")
        print(f"{'reader':>10} {'seconds':>8} {'rows/s':>9} {'CPU s':>6} {'peak RSS MB':>12} {'load':>5} "
              f"{'replay s':>8} {'replay CPU s':>12} {'w/o replay: rows/s':>18} {'CPU s':>6}")
        runners: list[tuple[str, Any]] = [
            (name, lambda name=name: (*floe_run(db.url, Path(tmp), name), None)) for name in args.read_with
            if name != "unload"]
        if "unload" in args.read_with:
            runners.append(("unload*", lambda: unload_run(db.url, Path(tmp), s3, args.rows)))
        if args.dlt:
            runners.append(("dlt", lambda: (*dlt_run(db.url, Path(tmp)), None)))
        for _ in range(args.repeat):
            for name, runner in runners:
                seconds, cpu, peak, db_path, replay = runner()
                rows = count(db_path)
                if rows != args.rows:
                    raise SystemExit(f"{name}: expected {args.rows} rows in db.events, found {rows}")
                extra = "" if replay is None else (f" {replay[0]:>8.2f} {replay[1]:>12.1f} "
                                                   f"{rows / (seconds - replay[0]):>18,.0f} {cpu - replay[1]:>6.1f}")
                print(f"{name:>10} {seconds:>8.2f} {rows / seconds:>9,.0f} {cpu:>6.1f} {peak:>12.0f} "
                      f"{os.getloadavg()[0]:>5.1f}{extra}", flush=True)
        if "unload" in args.read_with:
            print("unload*: Redshift's UNLOAD replayed on PostgreSQL + moto S3 (not Redshift)")


if __name__ == "__main__":
    main()
