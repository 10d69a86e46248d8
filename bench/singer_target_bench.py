"""Benchmark: `floe target duckdb` consuming N Singer RECORD messages from a file.

The same input also goes through a published Meltano SDK target (meltanolabs-target-csv, installed
by scripts/test-deps.sh into .venv-singer/target-csv) for comparison. Each target runs as a child
process reading the file on stdin; we report wall time, records/s and the child's peak RSS.

    .venv/bin/python bench/singer_target_bench.py [--records 1000000] [--skip-sdk] [--append]

`--append` sends the stream without key properties (appended, not merged).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
SDK_TARGET = ROOT / ".venv-singer" / "target-csv" / "bin" / "target-csv"

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "email": {"type": ["string", "null"]},
        "name": {"type": ["string", "null"]},
        "plan": {"type": ["string", "null"]},
        "seats": {"type": ["integer", "null"]},
        "mrr": {"type": ["number", "null"]},
        "active": {"type": ["boolean", "null"]},
        "created_at": {"type": ["string", "null"], "format": "date-time"},
        "signup_date": {"type": ["string", "null"], "format": "date"},
        "attributes": {"type": ["object", "null"]},
    },
    "required": ["id"],
}


def write_input(path: Path, records: int, append: bool = False) -> None:
    plans = ["free", "team", "business", "enterprise"]
    keys = [] if append else ["id"]
    with path.open("wb") as out:
        out.write(orjson.dumps({"type": "SCHEMA", "stream": "accounts", "schema": SCHEMA, "key_properties": keys}) + b"\n")
        for i in range(records):
            record = {
                "id": i, "email": f"user{i}@example.com", "name": f"User {i}", "plan": plans[i % 4],
                "seats": i % 250, "mrr": round(i * 0.37, 2), "active": i % 3 != 0,
                "created_at": f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{i % 60:02d}Z",
                "signup_date": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}",
                "attributes": {"source": "bench", "score": i % 100},
            }
            out.write(orjson.dumps({"type": "RECORD", "stream": "accounts", "record": record}) + b"\n")
            if (i + 1) % 100_000 == 0:
                out.write(orjson.dumps({"type": "STATE", "value": {"bookmarks": {"accounts": {"id": i}}}}) + b"\n")


def run_child(cmd: list[str], stdin: Path, cwd: Path) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user+sys), peak RSS (KiB) of the child, last stdout line."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    with stdin.open("rb") as handle:
        proc = subprocess.run(cmd, stdin=handle, capture_output=True, cwd=cwd, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, cpu = max(usage.ru_maxrss, before), usage.ru_utime + usage.ru_stime - cpu_before
    lines = proc.stdout.decode().strip().splitlines()
    return seconds, cpu, peak, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--skip-sdk", action="store_true")
    parser.add_argument("--append", action="store_true", help="no key properties: the table is appended to")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="floe-singer-bench-"))
    data = work / "records.jsonl"
    write_input(data, args.records, args.append)
    print(f"input: {args.records:,} RECORD messages, {data.stat().st_size / 1e6:.0f} MB")
    floe = ROOT / ".venv" / "bin" / "floe"
    (work / "target.json").write_text(json.dumps({"path": str(work / "bench.duckdb")}))
    seconds, cpu, peak, last = run_child([str(floe), "target", "duckdb", "--config", str(work / "target.json")], data, work)
    import duckdb

    count = duckdb.connect(str(work / "bench.duckdb")).execute("SELECT count(*) FROM singer.accounts").fetchall()[0][0]
    assert count == args.records, count
    print(f"floe target duckdb: {seconds:.2f} s wall ({cpu:.2f} s CPU), {args.records / seconds:,.0f} records/s, peak RSS "
          f"{peak / 1024:.0f} MiB, rows {count:,}, final state {last}")
    if not args.skip_sdk:
        if not SDK_TARGET.exists():
            sys.exit(f"{SDK_TARGET} missing: run scripts/test-deps.sh")
        out_dir = work / "csv"
        out_dir.mkdir()
        (work / "csv.json").write_text(json.dumps({"output_path": str(out_dir)}))
        seconds_sdk, cpu_sdk, _, _ = run_child([str(SDK_TARGET), "--config", str(work / "csv.json")], data, work)
        print(f"meltanolabs-target-csv (singer-sdk): {seconds_sdk:.2f} s wall ({cpu_sdk:.2f} s CPU), "
              f"{args.records / seconds_sdk:,.0f} records/s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
