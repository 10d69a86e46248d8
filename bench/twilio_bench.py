"""Benchmark: 1,000,000 Twilio call records from the emulator into DuckDB, floe vs dlt's rest_api source.

    .venv/bin/python bench/twilio_bench.py [--records 1000000] [--skip-dlt] [--emulator-rate]
    .venv/bin/python bench/twilio_bench.py --latency 0.2 [--day-calls 50000]

floe runs with the default config (only credentials, start_date and streams set).

The emulator runs in its own process (serve_in_process) with every page pre-rendered, so the
numbers measure the loaders, not the emulator. Each loader runs as a child process whose peak
RSS is read with getrusage(RUSAGE_CHILDREN) by a tiny wrapper. dlt lives only in `.venv-bench`
(created here if missing: `make bench-deps` does the same); it is never a floe dependency.
Targets: floe >= 100,000 records/s end to end, peak RSS <= 400 MB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
FLOE = ROOT / ".venv" / "bin" / "floe"
BENCH_VENV = ROOT / ".venv-bench"
BENCH_PY = BENCH_VENV / "bin" / "python"


def measure_main(cmd: list[str]) -> None:
    """Wrapper mode: run `cmd`, then print its wall time and peak RSS as JSON on stderr's last line."""
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "returncode": proc.returncode,
              "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "stdout": proc.stdout[-2000:], "stderr": proc.stderr[-3000:]}
    print(json.dumps(result))


def measured(cmd: list[str], cwd: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", *cmd], cwd=cwd, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["returncode"] != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{result['stdout']}\n{result['stderr']}")
    return result


def ensure_bench_venv() -> None:
    if BENCH_PY.exists() and subprocess.run([str(BENCH_PY), "-c", "import dlt"], capture_output=True).returncode == 0:
        return
    print("creating .venv-bench with dlt (benchmark-only environment)...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "dlt[duckdb]"], check=True)


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emulator_rate(url: str, sid: str, token: str, records: int) -> dict:
    """Read every call page with a plain keep-alive client (no parsing): what the emulator can serve."""
    started = time.monotonic()
    served = 0
    with httpx.Client(base_url=url, auth=(sid, token), timeout=60) as client:
        next_uri: str | None = f"/2010-04-01/Accounts/{sid}/Calls.json?PageSize=1000"
        while next_uri:
            body = client.get(next_uri).content
            served += body.count(b'"sid":"CA')
            tail = body[body.rfind(b'"next_page_uri":'):]
            next_uri = None if tail.startswith(b'"next_page_uri":null') else tail.split(b'"')[3].decode()
    seconds = time.monotonic() - started
    assert served == records, served
    return {"emulator_seconds": round(seconds, 1), "emulator_records_per_s": round(records / seconds)}


def latency_main(latency: float, day_calls: int) -> None:
    """One day holding `day_calls` calls, `latency` seconds added to every page: a daily run with the
    default config (the day read in hour windows at once) against sequential paging (max_concurrency 1)."""
    from floe.sandbox.server import serve_in_process
    from floe.sandbox.twilio import TwilioSandbox, create_app

    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    sid, token = TwilioSandbox(seed=1, size=1, accounts=1).credentials()[0]
    print(f"starting the emulator ({day_calls:,} calls in one day, {latency} s a page)...", flush=True)
    server = serve_in_process(create_app, size=day_calls, days=1, end=midnight.isoformat(), latency=latency,
                              prerender=True)
    report: dict[str, object] = {"calls": day_calls, "latency_s_per_page": latency}
    try:
        for name, extra in (("default", {}), ("sequential", {"max_concurrency": 1})):
            work = Path(tempfile.mkdtemp(prefix="twilio-latency-"))
            config = {"sources": {"twilio": {
                "type": "twilio", "account_sid": sid, "auth_token": token, "base_url": server.url,
                "start_date": (midnight.date().fromordinal(midnight.date().toordinal() - 1)).isoformat(),
                "streams": ["calls"], **extra}},
                "destinations": {"warehouse": {"type": "duckdb", "path": str(work / "floe.duckdb")}},
                "stage": str(work / "stage")}
            (work / "floe.yml").write_text(yaml.safe_dump(config))
            before = httpx.get(f"{server.url}/_sandbox/stats").json()["requests"]
            load = os.getloadavg()[0]
            result = measured([str(FLOE), "run", "-c", str(work / "floe.yml")], work)
            pages = httpx.get(f"{server.url}/_sandbox/stats").json()["requests"] - before
            with duckdb.connect(str(work / "floe.duckdb"), read_only=True) as conn:
                rows = conn.execute("SELECT count(DISTINCT sid) FROM twilio.calls").fetchone()
            assert rows == (day_calls,), rows
            report[name] = {"seconds": round(result["seconds"], 2), "pages": pages,
                            "cpu_seconds": round(result["cpu_seconds"], 1), "load_average": load}
            shutil.rmtree(work, ignore_errors=True)
            print(json.dumps({name: report[name]}), flush=True)
    finally:
        server.stop()
    report["speedup_over_sequential"] = round(report["sequential"]["seconds"]  # type: ignore[index]
                                              / report["default"]["seconds"], 1)  # type: ignore[index]
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--latency", type=float,
                        help="instead: one day of --day-calls calls with this many seconds added to every page, "
                             "the default config against sequential paging")
    parser.add_argument("--day-calls", type=int, default=50_000)
    parser.add_argument("--skip-dlt", action="store_true")
    parser.add_argument("--emulator-rate", action="store_true", help="also time the emulator alone (raw page reads)")
    parser.add_argument("--profile", type=Path,
                        help="sample the floe run with py-spy into this file (collapsed stacks; CPU and RSS include py-spy)")
    args = parser.parse_args()
    if args.latency is not None:
        latency_main(args.latency, args.day_calls)
        return

    from floe.sandbox.server import serve_in_process
    from floe.sandbox.twilio import create_app

    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    work = Path(tempfile.mkdtemp(prefix="twilio-bench-"))
    print(f"starting the emulator ({args.records:,} calls) in its own process...", flush=True)
    server = serve_in_process(create_app, size=args.records, days=30, end=end.isoformat(),
                              cache_chunks=args.records // 1000 + 10)
    try:
        t0 = time.monotonic()
        httpx.post(f"{server.url}/_sandbox/twilio/prerender", timeout=600).raise_for_status()
        print(f"emulator pre-rendered in {time.monotonic() - t0:.1f}s", flush=True)
        from floe.sandbox.twilio import TwilioSandbox

        sid, token = TwilioSandbox(seed=1, size=1, accounts=1).credentials()[0]  # credentials depend on seed only
        start_date = (end.date().toordinal() - 31)
        config = {
            "sources": {"twilio": {
                "type": "twilio", "account_sid": sid, "auth_token": token, "base_url": server.url,
                "start_date": datetime.fromordinal(start_date).date().isoformat(), "streams": ["calls"]}},
            "destinations": {"warehouse": {"type": "duckdb", "path": str(work / "floe.duckdb")}},
            "stage": str(work / "stage"),
        }
        (work / "floe.yml").write_text(yaml.safe_dump(config))
        if args.emulator_rate:
            report_emulator = emulator_rate(server.url, sid, token, args.records)
            print(json.dumps(report_emulator), flush=True)
        print("floe run ...", flush=True)
        load_before = os.getloadavg()[0]
        prefix = ([shutil.which("py-spy") or str(FLOE.with_name("py-spy")), "record", "--format", "raw", "--threads", "--native", "-o", str(args.profile.resolve()),
                   "--"] if args.profile else [])
        emulator_pid = multiprocessing.active_children()[0].pid
        emulator_cpu = process_cpu_seconds(emulator_pid)
        floe = measured([*prefix, str(FLOE), "run", "-c", str(work / "floe.yml")], work)
        emulator_cpu = process_cpu_seconds(emulator_pid) - emulator_cpu
        with duckdb.connect(str(work / "floe.duckdb"), read_only=True) as conn:
            floe_rows = conn.execute("SELECT count(*), count(DISTINCT sid) FROM twilio.calls").fetchone()
        assert floe_rows == (args.records, args.records), floe_rows
        floe_rate = args.records / floe["seconds"]
        report = {"records": args.records, "floe_seconds": round(floe["seconds"], 1),
                  "floe_records_per_s": round(floe_rate), "floe_peak_rss_mb": round(floe["peak_rss_mb"]),
                  "floe_cpu_seconds": round(floe["cpu_seconds"], 1),
                  "floe_records_per_cpu_s": round(args.records / floe["cpu_seconds"]),
                  "emulator_cpu_seconds_meanwhile": round(emulator_cpu, 1),
                  "load_average_before_floe": load_before, "load_average_after_floe": os.getloadavg()[0]}
        print(json.dumps(report), flush=True)

        if not args.skip_dlt:
            ensure_bench_venv()
            print("dlt rest_api run ...", flush=True)
            dlt = measured([str(BENCH_PY), str(ROOT / "bench" / "dlt_twilio.py"), server.url, sid, token,
                            str(work / "dlt.duckdb"), str(work / "dlt-pipelines")], work)
            dlt_rows = json.loads(dlt["stdout"].strip().splitlines()[-1])["rows"]
            assert dlt_rows == args.records, dlt_rows
            report.update({
                "dlt_seconds": round(dlt["seconds"], 1), "dlt_records_per_s": round(args.records / dlt["seconds"]),
                "dlt_peak_rss_mb": round(dlt["peak_rss_mb"]), "dlt_cpu_seconds": round(dlt["cpu_seconds"], 1),
                "speed_ratio_floe_over_dlt": round(dlt["seconds"] / floe["seconds"], 2),
                "memory_ratio_floe_over_dlt": round(floe["peak_rss_mb"] / dlt["peak_rss_mb"], 2),
            })
        report.update({"machine": f"{os.cpu_count()} cores, {platform.python_version()}",
                       "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")})
        print(json.dumps(report, indent=2))
        ok = floe_rate >= 100_000 and floe["peak_rss_mb"] <= 400
        print("targets (>= 100,000 records/s, <= 400 MB):", "met" if ok else "NOT met")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure_main(sys.argv[2:])
    else:
        main()
