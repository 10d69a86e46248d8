"""What `lookback_days` costs a daily Twilio run on a large account: API pages and seconds.

    .venv/bin/python bench/twilio_lookback.py [--per-day 50000] [--history 20] [--lookbacks 1,3,7,15]
                                              [--stream calls] [--latency 0]

The emulator (its own process) holds `--history` days of `--per-day` records. floe loads them once
(the backfill), the emulator's clock moves on one day (new records arrive, earlier ones change), and
then one daily run per lookback starts from a copy of the backfilled warehouse: the report gives, per
lookback, the pages requested and records served by the emulator, the wall and CPU seconds of the
`floe run` child process. `--latency` adds seconds to every emulator response (a stand-in for
Twilio's own page time, which is not published).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
FLOE = ROOT / ".venv" / "bin" / "floe"
sys.path.insert(0, str(ROOT / "bench"))
from twilio_bench import measured  # noqa: E402 - the same child-process timing as the throughput bench


def stats(url: str) -> dict:
    return httpx.get(f"{url}/_sandbox/stats", timeout=60).json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-day", type=int, default=50_000)
    parser.add_argument("--history", type=int, default=20, help="days of records before the daily run")
    parser.add_argument("--lookbacks", default="1,3,7,15")
    parser.add_argument("--stream", default="calls", choices=["calls", "messages"])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every emulator response")
    args = parser.parse_args()

    from floe.sandbox.server import serve_in_process
    from floe.sandbox.twilio import TwilioSandbox, create_app

    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    size = args.per_day * args.history
    work = Path(tempfile.mkdtemp(prefix="twilio-lookback-"))
    print(f"emulator: {size:,} {args.stream} over {args.history} days, in its own process ...", flush=True)
    server = serve_in_process(create_app, size=size, days=args.history, end=end.isoformat(),
                              cache_chunks=size // 1000 * 2 + 100)
    try:
        httpx.post(f"{server.url}/_sandbox/twilio/prerender", params={"kind": args.stream}, timeout=3600)
        sid, token = TwilioSandbox(seed=1, size=1, accounts=1).credentials()[0]  # credentials depend on seed only

        def config(lookback: int, db: Path) -> Path:
            path = work / f"floe-{lookback}.yml"
            path.write_text(yaml.safe_dump({
                "sources": {"twilio": {
                    "type": "twilio", "account_sid": sid, "auth_token": token, "base_url": server.url,
                    "start_date": (end - timedelta(days=args.history)).date().isoformat(),
                    "streams": [args.stream], "lookback_days": lookback}},
                "destinations": {"warehouse": {"type": "duckdb", "path": str(db)}},
                "stage": str(work / f"stage-{lookback}")}))
            return path

        backfill = work / "backfill.duckdb"
        started = time.monotonic()
        measured([str(FLOE), "run", "-c", str(config(7, backfill))], work)
        print(f"backfill: {time.monotonic() - started:.1f} s", flush=True)
        httpx.post(f"{server.url}/_sandbox/twilio/advance", params={"seconds": 86400}, timeout=60)
        httpx.post(f"{server.url}/_sandbox/twilio/prerender", params={"kind": args.stream}, timeout=3600)
        if args.latency:
            httpx.post(f"{server.url}/_sandbox/faults", json={"latency": args.latency}, timeout=60)
        rows = []
        for lookback in (int(v) for v in args.lookbacks.split(",")):
            db = work / f"daily-{lookback}.duckdb"
            shutil.copy(backfill, db)
            before = stats(server.url)
            run = measured([str(FLOE), "run", "-c", str(config(lookback, db))], work)
            after = stats(server.url)
            served = sum(after["served"].values()) - sum(before["served"].values())
            pages = after["requests"] - before["requests"]
            rows.append({"lookback_days": lookback, "pages": pages, "records_served": served,
                         "seconds": round(run["seconds"], 1), "cpu_seconds": round(run["cpu_seconds"], 1)})
            print(json.dumps(rows[-1]), flush=True)
        print(f"\n{args.per_day:,} {args.stream}/day, {args.history} days of history, latency {args.latency} s/page")
        print("| lookback_days | pages | records served | seconds | floe CPU s |\n|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['lookback_days']} | {r['pages']:,} | {r['records_served']:,} | {r['seconds']} | "
                  f"{r['cpu_seconds']} |")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
