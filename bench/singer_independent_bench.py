"""Benchmark: `floe target duckdb` and `floe target postgres` on Singer input shaped like a real tap's.

    .venv/bin/python bench/singer_independent_bench.py [--records 500000] [--state-every 50000]
                                                       [--destinations duckdb postgres]

Targets: >= 150,000 records/s into DuckDB, >= 100,000 into PostgreSQL.

The input is not floe's own (bench/singer_target_bench.py writes every record alike): it is written
the way taps built on the Singer SDK and the classic taps write theirs, and kept in
`--work` (re-used when its size and settings match, "generated if missing"):
- one SCHEMA with 10 properties, `key_properties: [id]`, a nullable object (`metadata`) holding nested
  objects and arrays of varying keys, `additionalProperties` left open;
- RECORDs with `time_extracted`, properties in varying order, explicit nulls, optional properties
  missing from some records, integers where the schema says number, date-times with offsets and
  with and without fractions of a second, non-ASCII text and escapes;
- a STATE every `--state-every` records (singer-sdk's shape: bookmarks with a replication key value).
Each target runs as a child process reading the file on stdin; wall time, CPU (user + sys) and
peak RSS are the child's (wait4). The table is checked to hold every record afterwards.
For PostgreSQL a throwaway server is started (floe.testing.postgres.PostgresServer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
FLOE = ROOT / ".venv" / "bin" / "floe"

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "email": {"type": ["null", "string"]},
        "full_name": {"type": ["null", "string"]},
        "plan": {"type": ["null", "string"]},
        "seats": {"type": ["null", "integer"]},
        "mrr": {"type": ["null", "number"]},
        "is_active": {"type": ["null", "boolean"]},
        "updated_at": {"type": ["null", "string"], "format": "date-time"},
        "signup_date": {"type": ["null", "string"], "format": "date"},
        "metadata": {"type": ["null", "object"], "properties": {}},
    },
}
NAMES = ["Zoë Ångström", "José O'Neil", "李 雷", "Anna-Lena \"AL\" Berg", "Ø. Hansen", "Émile\tDurand"]
PLANS = ["free", "Team", "BUSINESS", "enterprise", None]


def record(rng: random.Random, i: int, base: datetime) -> dict[str, object]:
    updated = base + timedelta(seconds=i * 3 + rng.randrange(3), microseconds=rng.randrange(1_000_000))
    offset = rng.choice(["Z", "+00:00", "+02:00", "-05:30"])
    local = updated + {"Z": timedelta(0), "+00:00": timedelta(0), "+02:00": timedelta(hours=2),
                       "-05:30": -timedelta(hours=5, minutes=30)}[offset]
    stamp = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{local.microsecond:06d}" if i % 3 else "") + offset
    fields: dict[str, object] = {
        "id": i,
        "email": None if i % 17 == 0 else f"user.{i}@example{'-corp' if i % 5 == 0 else ''}.com",
        "full_name": f"{rng.choice(NAMES)} {i}",
        "plan": rng.choice(PLANS),
        "seats": None if i % 11 == 0 else rng.randrange(1, 5000),
        "mrr": rng.randrange(0, 10_000) if i % 4 == 0 else round(rng.random() * 10_000, 2),  # ints in a number
        "is_active": None if i % 23 == 0 else bool(i % 3),
        "updated_at": stamp,
        "signup_date": (base.date() - timedelta(days=rng.randrange(3650))).isoformat(),
        "metadata": None if i % 7 == 0 else {
            "source": rng.choice(["web", "api", "import"]),
            "tags": [f"t{rng.randrange(50)}" for _ in range(rng.randrange(4))],
            **({"utm": {"campaign": f"c{i % 97}", "medium": "email"}} if i % 2 else {}),
            **({"score": rng.random()} if i % 5 else {}),
        },
    }
    for optional in ("signup_date", "seats", "metadata"):  # some taps leave unset properties out
        if rng.random() < 0.05:
            del fields[optional]
    keys = list(fields)
    rng.shuffle(keys)
    return {k: fields[k] for k in keys}


def write_input(path: Path, records: int, state_every: int) -> None:
    rng = random.Random(17)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    extracted = "2026-12-01T12:00:00.123456Z"
    with path.open("wb") as out:
        out.write(orjson.dumps({"type": "SCHEMA", "stream": "customers", "schema": SCHEMA,
                                "key_properties": ["id"], "bookmark_properties": ["updated_at"]}) + b"\n")
        last = ""
        for i in range(records):
            rec = record(rng, i, base)
            last = str(rec["updated_at"])
            out.write(orjson.dumps({"type": "RECORD", "stream": "customers", "record": rec,
                                    "time_extracted": extracted}) + b"\n")
            if (i + 1) % state_every == 0:
                out.write(orjson.dumps({"type": "STATE", "value": {"bookmarks": {"customers": {
                    "replication_key": "updated_at", "replication_key_value": last}}}}) + b"\n")


def run_child(cmd: list[str], stdin: Path, cwd: Path) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds, peak RSS (MB) of the child, and its last line of stdout."""
    started = time.perf_counter()
    with stdin.open("rb") as handle, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        import subprocess

        child = subprocess.Popen(cmd, stdin=handle, stdout=out, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if status != 0:
            sys.exit(f"{cmd[0]} failed ({status}): {err.read().decode()[-2000:]}")
        lines = out.read().decode().strip().splitlines()
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--state-every", type=int, default=50_000)
    parser.add_argument("--destinations", nargs="+", choices=["duckdb", "postgres"], default=["duckdb", "postgres"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--batch-rows", type=int, nargs="+", default=[None],
                        help="the target's batch_rows, each in turn (default: floe's own)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "floe-singer-independent")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"customers-{args.records}-{args.state_every}.jsonl"
    if not data.exists():
        write_input(data.with_suffix(".tmp"), args.records, args.state_every)
        data.with_suffix(".tmp").rename(data)
    print(f"input: {args.records:,} RECORDs, STATE every {args.state_every:,}, {data.stat().st_size / 1e6:.0f} MB "
          f"({data})", flush=True)

    sys.path.insert(0, str(ROOT / "src"))
    from floe.testing.postgres import PostgresServer

    server = PostgresServer() if "postgres" in args.destinations else None
    try:
        db = server.__enter__().create_database("singer") if server else None
        for _ in range(args.repeat):
            for batch_rows in args.batch_rows:
                for kind in args.destinations:
                    if kind == "duckdb":
                        path = args.work / "bench.duckdb"
                        path.unlink(missing_ok=True)
                        settings = {"path": str(path)}
                    else:
                        assert db is not None
                        import psycopg

                        with psycopg.connect(db.dsn, autocommit=True) as conn:
                            conn.execute("DROP SCHEMA IF EXISTS singer CASCADE")
                        settings = {"url": db.url}
                    (args.work / "target.json").write_text(json.dumps(settings))
                    load = os.getloadavg()[0]
                    seconds, cpu, peak, last = run_child(
                        [str(FLOE), "target", kind, "--config", str(args.work / "target.json"),
                         *(["--batch-rows", str(batch_rows)] if batch_rows else [])], data, args.work)
                    if kind == "duckdb":
                        import duckdb

                        with duckdb.connect(str(path), read_only=True) as conn:
                            rows = conn.execute("SELECT count(*) FROM singer.customers").fetchall()[0][0]
                    else:
                        with psycopg.connect(db.dsn) as conn:  # type: ignore[union-attr]
                            rows = conn.execute("SELECT count(*) FROM singer.customers").fetchall()[0][0]
                    assert rows == args.records, (kind, rows)
                    print(json.dumps({"destination": kind, "batch_rows": batch_rows or "default", "records": rows,
                                      "seconds": round(seconds, 2),
                                      "records_per_s": round(rows / seconds), "cpu_seconds": round(cpu, 2),
                                      "peak_rss_mb": round(peak), "load_average": round(load, 2),
                                      "last_state": json.loads(last) if last else None,
                                      "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}), flush=True)
    finally:
        if server:
            server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
