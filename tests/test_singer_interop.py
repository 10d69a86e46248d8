"""floe with published Singer packages from PyPI, each in its own venv (made by scripts/test-deps.sh).

- `floe tap sql | target-jsonl` (singer-python based target that validates every record).
- `tap-jsonl` (a Meltano SDK tap) | `floe target duckdb` / `floe target postgres`, plain and with
  the SDK's BATCH messages (gzip jsonl manifests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest

from floe.testing.postgres import PostgresDatabase

ROOT = Path(__file__).resolve().parent.parent
FLOE = str(Path(sys.executable).parent / "floe")
SINGER = ROOT / ".venv-singer"


def singer_bin(venv: str, command: str) -> str:
    path = SINGER / venv / "bin" / command
    assert path.exists(), f"{path} is missing: run scripts/test-deps.sh (make test does)"
    return str(path)


def pipe(producer: list[str], consumer: list[str], cwd: Path) -> bytes:
    """Run `producer | consumer`; both must succeed. Returns the consumer's stdout."""
    with (cwd / "producer.err").open("wb") as err:
        first = subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=err, cwd=cwd)
        assert first.stdout is not None
        second = subprocess.run(consumer, stdin=first.stdout, capture_output=True, cwd=cwd, check=False,
                                timeout=120)
        first.stdout.close()
        code = first.wait(timeout=60)
    assert code == 0, (cwd / "producer.err").read_text()[-3000:]
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    return second.stdout


def test_floe_tap_into_target_jsonl(postgres_db: PostgresDatabase, tmp_path: Path) -> None:
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE people (id int PRIMARY KEY, name text, born date, seen timestamptz, score numeric(6,2));
            INSERT INTO people VALUES (1, 'ann', '1990-05-01', '2026-01-01 12:00+01', 9.5),
                                      (2, 'bob', NULL, NULL, NULL);
        """)
    (tmp_path / "tap.json").write_text(json.dumps({"url": postgres_db.url, "schema": "public"}))
    (tmp_path / "target.json").write_text(json.dumps({"destination_path": "out", "do_timestamp_file": False}))
    stdout = pipe([FLOE, "tap", "sql", "--config", "tap.json"],
                  [singer_bin("target-jsonl", "target-jsonl"), "--config", "target.json"], tmp_path)
    written = [json.loads(line) for line in (tmp_path / "out" / "people.jsonl").read_text().splitlines()]
    assert sorted(written, key=lambda r: r["id"]) == [
        {"id": 1, "name": "ann", "born": "1990-05-01", "seen": "2026-01-01T11:00:00Z", "score": 9.5},
        {"id": 2, "name": "bob", "born": None, "seen": None, "score": None},
    ]
    assert json.loads(stdout.splitlines()[-1])["bookmarks"]["people"] == {"full_table": True}


PEOPLE = [
    {"id": 1, "name": "ann", "ts": "2024-01-01T00:00:00Z", "tags": ["a"]},
    {"id": 2, "name": "bob", "ts": "2024-01-02T08:30:00+02:00", "tags": []},
    {"id": 1, "name": "ann v2", "ts": "2024-01-03T00:00:00Z", "tags": ["b"]},
]


def tap_jsonl_config(tmp_path: Path, batch: bool) -> Path:
    data = tmp_path / "people.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PEOPLE))
    config: dict[str, Any] = {"path": str(data), "stream_name": "people", "primary_keys": ["id"]}
    if batch:
        (tmp_path / "batches").mkdir()
        config["batch_config"] = {"encoding": {"format": "jsonl", "compression": "gzip"},
                                  "storage": {"root": (tmp_path / "batches").as_uri()}}
    path = tmp_path / "tap-jsonl.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("batch", [False, True], ids=["records", "batch-messages"])
def test_meltano_sdk_tap_into_floe_target_duckdb(tmp_path: Path, batch: bool) -> None:
    (tmp_path / "target.json").write_text(json.dumps({"path": "out.duckdb"}))
    stdout = pipe([singer_bin("tap-jsonl", "tap-jsonl"), "--config", str(tap_jsonl_config(tmp_path, batch))],
                  [FLOE, "target", "duckdb", "--config", "target.json"], tmp_path)
    with duckdb.connect(str(tmp_path / "out.duckdb")) as conn:
        got = conn.execute("SELECT id, name, ts, tags, _sdc_stream FROM singer.people ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2].isoformat(), json.loads(r[3]), r[4]) for r in got] == [
        (1, "ann v2", "2024-01-03T00:00:00+00:00", ["b"], "people"),
        (2, "bob", "2024-01-02T06:30:00+00:00", [], "people"),
    ]
    assert "bookmarks" in json.loads(stdout.splitlines()[-1])


def test_meltano_sdk_tap_into_floe_target_postgres(postgres_db: PostgresDatabase, tmp_path: Path) -> None:
    settings = {k: v for k, v in postgres_db.config().items() if k != "type"}
    (tmp_path / "target.json").write_text(json.dumps({**settings, "schema": "raw"}))
    pipe([singer_bin("tap-jsonl", "tap-jsonl"), "--config", str(tap_jsonl_config(tmp_path, False))],
         [FLOE, "target", "postgres", "--config", "target.json"], tmp_path)
    with psycopg.connect(postgres_db.dsn) as conn:
        got = conn.execute("SELECT id, name, ts, tags FROM raw.people ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2].isoformat(), r[3]) for r in got] == [
        (1, "ann v2", "2024-01-03T00:00:00+00:00", ["b"]), (2, "bob", "2024-01-02T06:30:00+00:00", [])]
