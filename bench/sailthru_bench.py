"""Sailthru throughput and memory: gzipped message_blast exports -> DuckDB with `floe run`.

Usage: .venv/bin/python bench/sailthru_bench.py [--sizes 1000000 5000000] [--files 5]

For each size it generates (once, cached under bench/out/) gzipped `message_blast` files that
explode to that many rows (one per open/click, or one per message without actions), runs the
real `floe run` in a child process on a fresh DuckDB file, and reports wall time, rows/s and the
child's CPU seconds and peak RSS (from wait4's rusage). The rows in the table are checked against the
expected count. `BENCH_DUCKDB_EXTRA="    memory_limit: 128MB\n"` adds keys to the DuckDB destination.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from floe.sandbox.sailthru import write_message_blast

ROOT = Path(__file__).resolve().parent
FLOE = Path(sys.executable).parent / "floe"
EXTRA = os.environ.get("BENCH_DUCKDB_EXTRA", "")


def prepare(size: int, files: int) -> tuple[Path, int]:
    data = ROOT / "out" / f"sailthru-{size}-{files}files"
    marker = data / "ROWS"
    if not marker.exists():
        shutil.rmtree(data, ignore_errors=True)
        rows = write_message_blast(data / "export", size, files=files)
        marker.write_text(str(rows))
    return data, int(marker.read_text())


def run_once(data: Path, expected: int) -> dict[str, float]:
    work = data / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "floe.yml").write_text(
        "sources:\n  sailthru:\n    type: sailthru\n    path: ../export\n    pii: hash\n    salt: bench-salt\n"
        "destinations:\n  warehouse:\n    type: duckdb\n    path: bench.duckdb\n" + EXTRA + "stage: stage\n"
    )
    started = time.perf_counter()
    child = subprocess.Popen([str(FLOE), "run", "-c", str(work / "floe.yml")], cwd=work,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stderr = child.stderr.read().decode() if child.stderr else ""
    if status != 0:
        raise SystemExit(f"floe run failed ({status}):\n{stderr[-2000:]}")
    with duckdb.connect(str(work / "bench.duckdb"), read_only=True) as conn:
        rows = conn.execute("SELECT count(*) FROM sailthru.message_blast").fetchall()[0][0]
    if rows != expected:
        raise SystemExit(f"expected {expected} rows in sailthru.message_blast, found {rows}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"rows": rows, "seconds": seconds, "rate": rows / seconds, "cpu": cpu, "peak_mb": usage.ru_maxrss / 1024,
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--files", type=int, default=5, help="files per export (gzipped JSON Lines)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (each is printed)")
    args = parser.parse_args()
    print(f"{'rows':>10} {'gz MB':>7} {'seconds':>8} {'rows/s':>9} {'CPU s':>6} {'rows/CPU s':>10} "
          f"{'peak RSS MB':>12} {'load':>5}")
    for size in args.sizes:
        data, expected = prepare(size, args.files)
        gz_mb = sum(p.stat().st_size for p in (data / "export").iterdir()) / 1e6
        for _ in range(args.repeat):
            r = run_once(data, expected)
            print(f"{r['rows']:>10,} {gz_mb:>7.1f} {r['seconds']:>8.2f} {r['rate']:>9,.0f} {r['cpu']:>6.1f} "
                  f"{r['rows'] / r['cpu']:>10,.0f} {r['peak_mb']:>12.0f} {r['load']:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
