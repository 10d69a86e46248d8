"""`floe target` loads each record once when the orchestrator feeds a tap again from an earlier STATE.

The tap here is deterministic (what a tap started from a STATE sends is fixed); the orchestrator
keeps the last STATE line the target wrote and restarts from it. A target killed (SIGKILL) between
a commit and its STATE line, or stopped between the tables of one STATE, must neither append a
record twice nor lose one.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import psycopg
import pytest

from floe.apps.singer.setup import make_destination_for
from floe.apps.singer.target import SingerTarget
from floe.core.destination import Destination
from floe.core.errors import DestinationError

FLOE = str(Path(sys.executable).parent / "floe")
COLUMNS = {"pos": {"type": "integer"}, "i": {"type": "integer"}, "n": {"type": ["integer", "null"]}}
EVENTS, CLICKS = 3, 2  # records per position
NULL_CLICK = 4  # the first click of this position has no `n`


def tap(start: int, end: int, *, echo: bool = False, pad: int = 0, tail: int = 0) -> list[dict[str, Any]]:
    """What the tap sends when started from STATE {"pos": start}: per position p < end, EVENTS
    `events` and CLICKS `clicks` records (neither table has key properties), then STATE {"pos": p + 1}.
    `echo`: first repeats the STATE it was given (as Meltano SDK taps do); `pad`: STATE values carry
    that many bytes more; `tail`: then sends `tail` events of position `end` and dies (no STATE)."""

    def state(pos: int) -> dict[str, Any]:
        return {"type": "STATE", "value": {"pos": pos, **({"pad": "x" * pad} if pad else {})}}

    out: list[dict[str, Any]] = [
        {"type": "SCHEMA", "stream": name, "schema": {"type": "object", "properties": COLUMNS}, "key_properties": []}
        for name in ("events", "clicks")
    ]
    if echo:
        out.append(state(start))
    for pos in range(start, end):
        out += [{"type": "RECORD", "stream": "events", "record": {"pos": pos, "i": i, "n": i}} for i in range(EVENTS)]
        out += [{"type": "RECORD", "stream": "clicks",
                 "record": {"pos": pos, "i": i, "n": None if (pos, i) == (NULL_CLICK, 0) else i}} for i in range(CLICKS)]
        out.append(state(pos + 1))
    out += [{"type": "RECORD", "stream": "events", "record": {"pos": end, "i": i, "n": i}} for i in range(tail)]
    return out


def encoded(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(m) + b"\n" for m in messages)


def each_once(upto: int, per_position: int) -> list[tuple[int, int]]:
    return [(pos, i) for pos in range(upto) for i in range(per_position)]


def resume_from(printed: list[dict[str, Any]]) -> int:
    """The position the orchestrator restarts the tap from: the last STATE line it received."""
    return int(printed[-1]["pos"]) if printed else 0


@dataclass
class Warehouse:
    """A destination of `floe target`, as a Singer settings file, and a way to read what it holds."""

    kind: str
    settings: Path
    read: Callable[..., list[tuple[Any, ...]]]  # (table, columns="pos, i") -> its rows, sorted
    execute: Callable[[str], None]

    def destination(self) -> Destination:
        return make_destination_for(self.kind, None, self.settings)[0]

    def committed(self, stream: str) -> Any:
        dest = self.destination()
        try:
            return (dest.get_state("singer", stream) or {}).get("singer_state")
        finally:
            dest.close()


def warehouse(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Warehouse:
    settings = tmp_path / f"{kind}.json"
    if kind == "duckdb":
        path = tmp_path / "out.duckdb"
        settings.write_text(json.dumps({"path": str(path)}))

        def duckdb_read(table: str, columns: str = "pos, i") -> list[tuple[Any, ...]]:
            with duckdb.connect(str(path)) as conn:
                return conn.execute(f"SELECT {columns} FROM singer.{table} ORDER BY {columns}").fetchall()

        def duckdb_execute(sql: str) -> None:
            with duckdb.connect(str(path)) as conn:
                conn.execute(sql)

        return Warehouse(kind, settings, duckdb_read, duckdb_execute)
    if kind == "postgres":
        db = request.getfixturevalue("postgres_db")
        settings.write_text(json.dumps({k: v for k, v in db.config().items() if k != "type"}))

        def pg_read(table: str, columns: str = "pos, i") -> list[tuple[Any, ...]]:
            with psycopg.connect(db.dsn) as conn:
                return [tuple(r) for r in conn.execute(f"SELECT {columns} FROM singer.{table} ORDER BY {columns}")]

        def pg_execute(sql: str) -> None:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute(sql)

        return Warehouse(kind, settings, pg_read, pg_execute)
    lake = tmp_path / "lake"
    settings.write_text(json.dumps({"path": str(lake)}))

    def files_read(table: str, columns: str = "pos, i") -> list[tuple[Any, ...]]:
        """The rows of the files its state objects name (what a reader of the destination reads)."""
        commits = (json.loads(p.read_text()) for p in (lake / "singer" / table / "_floe_state").glob("v*.json"))
        files = ", ".join(f"'{lake / key}'" for commit in commits for key in commit["files"])
        return duckdb.sql(f"SELECT {columns} FROM read_parquet([{files}]) ORDER BY {columns}").fetchall()

    def no_sql(sql: str) -> None:
        raise AssertionError("the files destination runs no SQL")

    return Warehouse(kind, settings, files_read, no_sql)


@pytest.fixture(params=["duckdb", "postgres", "files"])
def any_warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Warehouse:
    return warehouse(request.param, request, tmp_path)


def feed(wh: Warehouse, tmp_path: Path, messages: list[dict[str, Any]], batch_rows: int = 1,
         fails: str | None = None) -> list[dict[str, Any]]:
    """One run of the target in this process (failing with an error matching `fails`, if given);
    returns the STATE lines it wrote."""
    out = io.BytesIO()
    dest = wh.destination()
    try:
        target = SingerTarget(dest, tmp_path / "stage", out, batch_rows=batch_rows)
        if fails is None:
            target.run(encoded(messages).splitlines())
        else:
            with pytest.raises(DestinationError, match=fails):
                target.run(encoded(messages).splitlines())
    finally:
        dest.close()
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def assert_each_record_once(wh: Warehouse, upto: int) -> None:
    assert wh.read("events") == each_once(upto, EVENTS)
    assert wh.read("clicks") == each_once(upto, CLICKS)


# --- replays, in process ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("batch_rows", "echo"), [(1, False), (7, True), (10_000, False)],
                         ids=["a-commit-per-state", "states-folded-sdk-echo", "one-commit-at-the-end"])
def test_a_tap_fed_again_from_the_state_before_the_last_commit_appends_nothing_twice(
    any_warehouse: Warehouse, tmp_path: Path, batch_rows: int, echo: bool
) -> None:
    printed = feed(any_warehouse, tmp_path, tap(0, 6, echo=echo), batch_rows)
    assert printed[-1]["pos"] == 6
    lost = printed[:-1]  # the orchestrator never got the last commit's STATE line
    assert any_warehouse.committed("events") == {"pos": 6}
    again = feed(any_warehouse, tmp_path, tap(resume_from(lost), 9, echo=echo), batch_rows)
    assert again[-1] == {"pos": 9}
    assert_each_record_once(any_warehouse, 9)


def test_records_after_the_last_state_are_committed_and_not_appended_again_on_resume(
    any_warehouse: Warehouse, tmp_path: Path
) -> None:
    printed = feed(any_warehouse, tmp_path, tap(0, 3, tail=2))  # the tap died after two events of position 3
    assert printed[-1] == {"pos": 3}
    assert any_warehouse.read("events")[-2:] == [(3, 0), (3, 1)]
    feed(any_warehouse, tmp_path, tap(resume_from(printed), 6))
    assert_each_record_once(any_warehouse, 6)


def test_a_tap_whose_state_never_moves_still_gets_its_new_records_loaded(any_warehouse: Warehouse,
                                                                         tmp_path: Path) -> None:
    """Same STATE value, different records before it: not a replay (the record count differs)."""
    def snapshot(rows: int) -> list[dict[str, Any]]:
        return [*tap(0, 0), *({"type": "RECORD", "stream": "events", "record": {"pos": 0, "i": i, "n": i}}
                              for i in range(rows)), {"type": "STATE", "value": {"done": True}}]

    feed(any_warehouse, tmp_path, snapshot(3))
    feed(any_warehouse, tmp_path, snapshot(5))  # the source grew; the tap sends it whole, as before
    assert any_warehouse.read("events") == sorted([(0, i) for i in range(3)] + [(0, i) for i in range(5)])


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_a_table_with_key_properties_merges_a_replay_so_a_record_changed_since_is_updated(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    wh = warehouse(kind, request, tmp_path)
    schema = {"type": "SCHEMA", "stream": "users", "key_properties": ["id"],
              "schema": {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}}}}

    def run(name: str) -> None:
        feed(wh, tmp_path, [schema, {"type": "RECORD", "stream": "users", "record": {"id": 1, "name": name}},
                            {"type": "STATE", "value": {"pos": 1}}])

    run("ann")
    run("ann v2")  # the same STATE again, with the record changed in between
    assert wh.read("users", "id, name") == [(1, "ann v2")]


# --- real processes, killed or failing -------------------------------------------------------------------------

def settings_with(wh: Warehouse, tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({**json.loads(wh.settings.read_text()), **extra}))
    return path


def start_target(wh: Warehouse, tmp_path: Path, messages: list[dict[str, Any]], stdout: Any) -> subprocess.Popen[bytes]:
    """`floe target KIND --config target.json < input` (a commit at every STATE)."""
    source = tmp_path / "input.jsonl"
    source.write_bytes(encoded(messages))
    with source.open("rb") as stdin, (tmp_path / "target.err").open("ab") as stderr:
        return subprocess.Popen([FLOE, "target", wh.kind, "--config", str(settings_with(wh, tmp_path, batch_rows=1))],
                                stdin=stdin, stdout=stdout, stderr=stderr, cwd=tmp_path)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], tmp_path: Path, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert proc.poll() is None, f"the target exited ({proc.returncode}) before {what}: " + \
            (tmp_path / "target.err").read_text()[-2000:]
        assert time.monotonic() < deadline, f"the target never got to {what}"
        time.sleep(0.02)


def blocked_writing_stdout(pid: int) -> bool:
    """Whether the process sleeps in the kernel writing to a full pipe (its stdout: stderr is a file)."""
    return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_a_target_killed_between_a_commit_and_its_state_line_loses_and_repeats_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    wh = warehouse(kind, request, tmp_path)
    # The orchestrator reads nothing until the kill, and its pipe holds two STATE lines: the target
    # commits the third STATE's records, then blocks writing that STATE.
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = start_target(wh, tmp_path, tap(0, 4, pad=1400), write_end)
    os.close(write_end)
    try:
        wait_for(lambda: blocked_writing_stdout(proc.pid), proc, tmp_path, "a full stdout")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with os.fdopen(read_end, "rb") as pipe:
        printed = [orjson.loads(line) for line in pipe.read().splitlines()]
    assert [s["pos"] for s in printed] == [1, 2]
    assert wh.committed("events")["pos"] == 3  # committed, never said
    again = feed(wh, tmp_path, tap(resume_from(printed), 6, pad=1400))
    assert again[-1]["pos"] == 6
    assert_each_record_once(wh, 6)


@pytest.mark.parametrize(("kind", "interruption"), [
    ("duckdb", "fails"), ("postgres", "fails"), ("postgres", "killed"), ("files", "fails"),
])
def test_a_state_over_two_tables_stopped_between_them_is_loaded_once_when_piped_again(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, interruption: str
) -> None:
    """The tap's STATE {"pos": 5} covers records of `events` and of `clicks`; the second table's part
    of that commit fails (a NOT NULL constraint meets the NULL click of position 4, or the state
    object's name is taken), or the target is SIGKILLed while that part waits for a lock."""
    wh = warehouse(kind, request, tmp_path)
    printed = feed(wh, tmp_path, tap(0, NULL_CLICK))
    assert printed[-1] == {"pos": NULL_CLICK}
    if interruption == "killed":
        printed += kill_while_clicks_waits_for_a_lock(wh, request, tmp_path)
    else:
        unblock = block_the_next_commit_of_clicks(wh, tmp_path)
        printed += feed(wh, tmp_path, tap(resume_from(printed), 8), fails="clicks")
        unblock()
    assert resume_from(printed) == NULL_CLICK
    events = wh.read("events")
    if kind == "files":  # table by table: the first table's part is committed, with a STATE never written out
        committed = wh.committed("events")["pos"]
        assert committed > NULL_CLICK and events == each_once(committed, EVENTS)
    else:  # one transaction: nothing of either table
        assert events == each_once(NULL_CLICK, EVENTS)
    assert wh.read("clicks") == each_once(NULL_CLICK, CLICKS)
    again = feed(wh, tmp_path, tap(resume_from(printed), 8))
    assert again[-1] == {"pos": 8}
    assert_each_record_once(wh, 8)


def block_the_next_commit_of_clicks(wh: Warehouse, tmp_path: Path) -> Callable[[], None]:
    """Make the next commit of `clicks` fail for real; returns what undoes it."""
    if wh.kind == "files":  # the name of the next state object is taken by a folder
        versions = sorted((tmp_path / "lake" / "singer" / "clicks" / "_floe_state").glob("v*.json"))
        taken = versions[-1].with_name(f"v{int(versions[-1].name[1:-5]) + 1:08d}.json")
        taken.mkdir()
        return taken.rmdir
    wh.execute("ALTER TABLE singer.clicks ALTER COLUMN n SET NOT NULL")
    return lambda: wh.execute("ALTER TABLE singer.clicks ALTER COLUMN n DROP NOT NULL")


def kill_while_clicks_waits_for_a_lock(wh: Warehouse, request: pytest.FixtureRequest,
                                       tmp_path: Path) -> list[dict[str, Any]]:
    """Run the target from position NULL_CLICK while another session holds a lock on `clicks`; SIGKILL
    it once its load waits for that lock. Returns the STATE lines it wrote."""
    dsn = request.getfixturevalue("postgres_db").dsn
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE singer.clicks IN ACCESS EXCLUSIVE MODE")
        proc = start_target(wh, tmp_path, tap(NULL_CLICK, 8), subprocess.PIPE)

        def waiting() -> list[Any]:
            return holder.execute("SELECT pid FROM pg_locks WHERE relation = 'singer.clicks'::regclass "
                                  "AND NOT granted").fetchall()

        wait_for(lambda: bool(waiting()), proc, tmp_path, "waiting for the lock on clicks")
        backend = waiting()[0][0]
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        holder.rollback()
        holder.autocommit = True  # each query its own transaction: pg_stat_activity is read once per transaction
        deadline = time.monotonic() + 30
        while holder.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone():
            assert time.monotonic() < deadline, "the killed target's session never ended"
            time.sleep(0.05)
    return [orjson.loads(line) for line in out.splitlines()]

