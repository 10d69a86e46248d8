"""Start-up: `floe --help`, and a `floe run` that finds nothing new (target: each <= 0.4 s wall).

    .venv/bin/python bench/startup_bench.py [--runs 7] [--imports]

The no-op run: a FullStory source with a fixed `end_time` (emulator in its own process) loaded once
into a DuckDB file, then run again: the source has no window left to export, so the run reads the
config, opens the DuckDB file (state, lease), finds nothing and prints its summary. Each command runs
`--runs` times as a child process; the best and the median wall and CPU seconds are printed (CPU is
user + system of the child, from getrusage), with the load average. `--imports` also prints the
largest import costs of the no-op run by package (python -X importtime, self times summed).
floe's modules are byte-compiled first: with PYTHONDONTWRITEBYTECODE=1 set, each run would otherwise
compile them again (about a fifth of a second).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOE = ROOT / ".venv" / "bin" / "floe"


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def figures(cmd: list[str], cwd: Path, runs: int) -> dict[str, object]:
    load = os.getloadavg()[0]
    walls, cpus = zip(*(timed(cmd, cwd) for _ in range(runs)), strict=True)
    return {"best_wall_s": round(min(walls), 3), "median_wall_s": round(statistics.median(walls), 3),
            "best_cpu_s": round(min(cpus), 3), "median_cpu_s": round(statistics.median(cpus), 3),
            "runs": runs, "load_average": round(load, 2)}


def import_costs(cmd: list[str], cwd: Path, top: int = 15) -> dict[str, float]:
    """Milliseconds of import (self time) by top-level package, one run under -X importtime."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "floe", *cmd], cwd=cwd,
                          capture_output=True, text=True, check=True)
    by_package: Counter[str] = Counter()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            self_us, _, name = line.removeprefix("import time:").split("|")
            package = name.strip().split(".")[0]
            by_package[package] += int(self_us)
    total = sum(by_package.values())
    return {"total_ms": round(total / 1000), **{k: round(v / 1000) for k, v in by_package.most_common(top)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--imports", action="store_true", help="also print the no-op run's import costs")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True,
                   stdout=subprocess.DEVNULL)

    from floe.sandbox.fullstory import create_app
    from floe.sandbox.server import serve_in_process

    work = Path(tempfile.mkdtemp(prefix="floe-startup-"))
    server = serve_in_process(create_app, events_per_hour=100, cache_dir=str(work / "cache"))
    try:
        config = work / "floe.yml"
        config.write_text(json.dumps({
            "sources": {"fs": {"type": "fullstory", "api_key": "fs-sandbox-key", "base_url": server.url,
                               "start_time": "2024-03-01T00:00:00Z", "end_time": "2024-03-01T03:00:00Z"}},
            "destinations": {"warehouse": {"type": "duckdb", "path": str(work / "floe.duckdb")}},
            "stage": str(work / "stage")}))
        subprocess.run([str(FLOE), "run", "-c", str(config)], cwd=work, check=True, capture_output=True)
        report: dict[str, object] = {
            "help": figures([str(FLOE), "--help"], work, args.runs),
            "noop_run": figures([str(FLOE), "run", "-c", str(config)], work, args.runs),
        }
        if args.imports:
            report["noop_run_imports_ms"] = import_costs(["run", "-c", str(config)], work)
        report.update({"machine": f"{os.cpu_count()} cores", "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")})
        print(json.dumps(report, indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
