"""FullStory export -> DuckDB throughput and peak memory (emulator in its own process).

    .venv/bin/python bench/fullstory_bench.py [--events 2000000] [--hours 24] [--duration 1h] [--format FORMAT_NDJSON]
                                              [--destinations 1]

With `--destinations N` the source loads into N DuckDB files at once (one export read feeds them all).
DuckDB runs with floe's defaults unless `--memory-limit`, `--threads`, `--checkpoint-threshold` or
`--commit-rows` are given.

The emulator's events are as irregular as FullStory's (sparse custom vars, explicit nulls, odd key
casing, ids above 2^53; see floe.sandbox.fullstory). It builds each window's gzip file once and caches
it on disk; a warm-up (plain HTTP export requests) fills the cache, then the timed run loads into a
fresh DuckDB file. `floe run` runs as a child process, so
its peak RSS is measured alone (`ru_maxrss` of children).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import httpx

from floe.sandbox.fullstory import create_app
from floe.sandbox.server import serve_in_process
from floe.sources.fullstory import FullStoryConfig, parse_duration, rfc3339

ROOT = Path(__file__).resolve().parents[1]


def run_floe(config: Path, profile: Path | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one `floe run` child process (the only child
    this process waits for: the emulator is a multiprocessing child, reaped only at exit).
    With `profile`, py-spy samples the run into that file (collapsed stacks; CPU and RSS then include py-spy)."""
    prefix = ["py-spy", "record", "--format", "raw", "-o", str(profile), "--"] if profile else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run([*prefix, sys.executable, "-c", "from floe.cli import main; main()", "run", "-c", str(config)], check=True,
                   stdout=subprocess.DEVNULL, cwd=config.parent)
    seconds = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, usage.ru_maxrss / 1024


def warm_up(url: str, args: argparse.Namespace) -> None:
    """Ask the emulator for every window once (with the fields floe asks for), so that the timed run
    measures floe, not file building."""
    headers = {"Authorization": "Basic fs-sandbox-key"}
    fields = FullStoryConfig(api_key="fs-sandbox-key").export_fields
    step = parse_duration(args.duration)
    start = datetime(2024, 3, 1, tzinfo=UTC)
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        ops = []
        while start < datetime(2024, 3, 1, tzinfo=UTC) + timedelta(hours=args.hours):
            body = {"segmentId": "everyone", "type": "TYPE_EVENT", "format": args.format,
                    "timeRange": {"start": rfc3339(start), "end": rfc3339(start + step)}, "fields": fields}
            ops.append(client.post("/segments/v1/exports", json=body).json()["operationId"])
            start += step
        for op in ops:
            while client.get(f"/operations/v1/{op}").json()["state"] != "COMPLETED":
                time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--duration", default="1h")
    parser.add_argument("--format", default="FORMAT_NDJSON")
    parser.add_argument("--load-every", default="window", choices=["window", "day"])
    parser.add_argument("--memory-limit", help="DuckDB's memory_limit (default: floe's, i.e. DuckDB's)")
    parser.add_argument("--threads", type=int, help="DuckDB's threads (default: floe's, i.e. DuckDB's)")
    parser.add_argument("--checkpoint-threshold", help="DuckDB's checkpoint_threshold (default: floe's)")
    parser.add_argument("--commit-rows", type=int, help="the destination's commit_rows (default: floe's)")
    parser.add_argument("--destinations", type=int, default=1, help="how many DuckDB files to load at once")
    parser.add_argument("--profile", type=Path, help="sample the floe run with py-spy into this file")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "floe-fullstory-bench")
    args = parser.parse_args()
    events_per_hour = args.events // args.hours
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / f"cache-{events_per_hour}-{args.duration}-{args.format}"  # gzip_mb sums this run's files
    server = serve_in_process(create_app, events_per_hour=events_per_hour, cache_dir=str(cache))
    try:
        names = ["w"] if args.destinations == 1 else [f"w{i}" for i in range(1, args.destinations + 1)]
        # Only the settings asked for: by default the run measures what users get, floe's defaults.
        tuned = {key: value for key, value in (("memory_limit", args.memory_limit), ("threads", args.threads),
                                               ("checkpoint_threshold", args.checkpoint_threshold),
                                               ("commit_rows", args.commit_rows)) if value is not None}

        def config(name: str) -> Path:
            for db_name in names:
                (args.work / f"{name}-{db_name}.duckdb").unlink(missing_ok=True)
            path = args.work / f"{name}.yml"
            path.write_text(json.dumps({
                "sources": {"fs": {"type": "fullstory", "api_key": "fs-sandbox-key", "base_url": server.url,
                                   "start_time": "2024-03-01T00:00:00Z",
                                   "end_time": f"2024-03-{1 + args.hours // 24:02d}T{args.hours % 24:02d}:00:00Z",
                                   "export_duration": args.duration, "format": args.format,
                                   "load_every": args.load_every}},
                "destinations": {db_name: {"type": "duckdb", "path": str(args.work / f"{name}-{db_name}.duckdb"),
                                           **tuned} for db_name in names},
                "stage": str(args.work / "stage"),
            }))
            return path

        warm = time.monotonic()
        warm_up(server.url, args)
        print(f"warm-up (emulator builds and caches files): {time.monotonic() - warm:.1f}s", flush=True)
        seconds, cpu, peak = run_floe(config("timed"), args.profile)
        loaded = []
        for db_name in names:
            con = duckdb.connect(str(args.work / f"timed-{db_name}.duckdb"), read_only=True)
            loaded.append(con.execute("SELECT count(*) FROM fs.events").fetchone()[0])  # type: ignore[index]
            con.close()
        assert len(set(loaded)) == 1, f"the destinations hold different row counts: {loaded}"
        rows = loaded[0]
        size = sum(p.stat().st_size for p in cache.glob("*.gz"))
        print(json.dumps({"events": rows, "seconds": round(seconds, 2), "events_per_s": round(rows / seconds),
                          "cpu_seconds": round(cpu, 1),
                          "peak_rss_mb": round(peak), "gzip_mb": round(size / 1e6), "duration": args.duration, "load_every": args.load_every,
                          "format": args.format, "duckdb_settings": tuned,
                          "destinations": args.destinations}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
