"""Pendo reverse ETL throughput and memory: 1,000,000 account rows in DuckDB -> `floe sync` -> the Pendo emulator.

Usage: .venv/bin/python bench/pendo_bench.py [--rows 1000000] [--batch-rows 1000] [--concurrency 4]

The emulator runs in its own process (serve_in_process), the real `floe sync` in a child process
whose wall time and peak RSS (wait4's rusage) are reported. Three runs: the first sends every row
(mode upsert: Pendo creates the accounts), the second finds nothing changed, the third follows an
UPDATE of 1% of the rows. The emulator's record count and a sample of values are checked.
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
import httpx

from floe.sandbox.pendo import create_app
from floe.sandbox.server import serve_in_process

ROOT = Path(__file__).resolve().parent
FLOE = Path(sys.executable).parent / "floe"
KEY = "bench-pendo-key"


def prepare(work: Path, rows: int) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with duckdb.connect(str(work / "warehouse.duckdb")) as conn:
        conn.execute("CREATE SCHEMA analytics")
        conn.execute(
            "CREATE TABLE analytics.accounts AS SELECT 'acct-' || lpad(CAST(i AS VARCHAR), 7, '0') AS account_id, "
            "['free', 'pro', 'enterprise'][1 + i % 3] AS plan, CAST(i % 500 AS INTEGER) AS seats, "
            "round(i * 0.37, 2) AS mrr, i % 2 = 0 AS active, DATE '2025-01-01' + CAST(i % 365 AS INTEGER) "
            f"AS renewal_date FROM range({rows}) t(i)"
        )


def write_config(work: Path, url: str, batch_rows: int, concurrency: int) -> Path:
    path = work / "floe.yml"
    path.write_text(
        "destinations:\n  warehouse:\n    type: duckdb\n    path: warehouse.duckdb\nstage: stage\n"
        "syncs:\n  accounts:\n    from: warehouse\n    table: analytics.accounts\n"
        f"    to: {{type: pendo, integration_key: {KEY}, kind: account, base_url: '{url}', "
        f"batch_rows: {batch_rows}, concurrency: {concurrency}}}\n"
        "    key: {account_id: accountId}\n"
        "    fields: {plan: plan, seats: seats, mrr: mrr, active: active, renewal_date: renewal_date}\n"
        "    mode: upsert\n"
    )
    return path


def run_sync(config: Path) -> dict[str, float]:
    started = time.perf_counter()
    child = subprocess.Popen([str(FLOE), "sync", "-c", str(config)], cwd=config.parent,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    out = (child.stdout.read() if child.stdout else b"").decode()
    err = (child.stderr.read() if child.stderr else b"").decode()
    if status != 0:
        raise SystemExit(f"floe sync failed ({status}):\n{out[-2000:]}\n{err[-2000:]}")
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "cpu": usage.ru_utime + usage.ru_stime}


def stats(url: str) -> dict[str, object]:
    return httpx.get(f"{url}/_sandbox/pendo/stats", timeout=60).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    work = ROOT / "out" / "pendo"
    prepare(work, args.rows)
    server = serve_in_process(create_app, integration_key=KEY)
    try:
        config = write_config(work, server.url, args.batch_rows, args.concurrency)
        print(f"{'run':<22} {'sent':>10} {'seconds':>8} {'records/s':>10} {'floe CPU s':>10} {'peak RSS MB':>12}")
        for label in ("first (all rows)", "second (no change)", "third (1% changed)"):
            before = int(stats(server.url)["records_received"])  # type: ignore[call-overload]
            result = run_sync(config)
            sent = int(stats(server.url)["records_received"]) - before  # type: ignore[call-overload]
            rate = sent / result["seconds"] if sent else 0.0
            print(f"{label:<22} {sent:>10,} {result['seconds']:>8.2f} {rate:>10,.0f} {result['cpu']:>10.1f} "
                  f"{result['peak_mb']:>12.0f}")
            if label.startswith("first"):
                held = stats(server.url)["counts"]["account"]  # type: ignore[index]
                if held != args.rows:
                    raise SystemExit(f"emulator holds {held} accounts, expected {args.rows}")
            elif label.startswith("second"):
                if sent:
                    raise SystemExit(f"second run sent {sent} records, expected none")
                with duckdb.connect(str(work / "warehouse.duckdb")) as conn:
                    conn.execute("UPDATE analytics.accounts SET seats = seats + 1 "
                                 "WHERE CAST(substr(account_id, 6) AS INTEGER) % 100 = 0")
            elif sent != (args.rows + 99) // 100:
                raise SystemExit(f"third run sent {sent} records, expected {(args.rows + 99) // 100}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
