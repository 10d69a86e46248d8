"""Leases, state versions and DDL under overlapping runs, on every destination kind.

A run takes its stream's lease in the destination before it reads the state; a second run waits
up to `lease_wait_seconds` and then fails naming the holder. Every commit names the state version
it builds on and is refused whole when another run committed since; versions stay unique. Two
sessions creating one schema, table or floe's own tables at once both succeed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from floe.core.destination import Destination, LoadJob, StagedFile, TableSpec
from floe.core.errors import DestinationError, LeaseHeldError, StateConflictError
from floe.destinations.sql import SqlDestination
from floe.infra.stage import new_load_id
from tests.fixtures.destinations import EXPIRING, Place, place_of

# A child process holding a lease: prints "held", then on each line of stdin reports lease.check().
HOLDER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from tests.fixtures.destinations import open_destination
    dest = open_destination(json.loads(sys.argv[1]), Path(sys.argv[2]))
    lease = dest.acquire_lease("src", "items")
    print("held", flush=True)
    for _ in sys.stdin:
        try:
            lease.check()
            print("still held", flush=True)
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
""")


def start_holder(place: Place, **extra: Any) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, json.dumps({**place.settings, **extra}), str(place.base)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line == "held\n", child.stderr.read() if child.stderr else line
    return child


def expiring(place: Place, seconds: float) -> dict[str, Any]:
    """The setting of a lease expiry, for the destinations whose leases expire."""
    return {"lease_expiry_seconds": seconds} if place.kind in EXPIRING else {}


def job(folder: Path, ids: list[int], base_version: int | None, stream: str = "items") -> LoadJob:
    table = pa.table({"id": pa.array(ids, pa.int64())})
    load_id = new_load_id()
    path = folder / f"{load_id}.parquet"
    pq.write_table(table, path)
    spec = TableSpec("src", stream, table.schema)
    return LoadJob(load_id, "src", stream, spec, [StagedFile(path, len(ids), table.schema)], {"last": ids[-1]},
                   datetime.now(UTC), base_version=base_version)


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        return call(), time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - returned for the test to judge
        return exc, time.monotonic() - started


# --- the lease ------------------------------------------------------------------------------------
def test_a_second_run_waits_for_the_lease_then_fails_naming_the_holder(place):
    first, second = place.open(), place.open("w", lease_wait_seconds=0.3)
    taken = datetime.now(UTC)
    lease = first.acquire_lease("src", "items")
    try:
        failed, waited = timed(lambda: second.acquire_lease("src", "items"))
        assert isinstance(failed, LeaseHeldError)
        assert 0.3 <= waited < 5
        message = str(failed)
        assert message.startswith("src.items -> w: another run is loading this stream (")
        assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message
        since = message.partition(" since ")[2][:10]  # the day the first run took it (at midnight: either)
        assert f"{taken:%Y-%m-%d}" <= since <= f"{datetime.now(UTC):%Y-%m-%d}", message
        assert message.endswith("gave up after waiting 0.3s (destinations.w.lease_wait_seconds)")
        other = second.acquire_lease("src", "other")  # another stream is not held up
        other.release()
    finally:
        lease.release()
    again = second.acquire_lease("src", "items")  # released: free at once
    again.release()
    first.close()
    second.close()


def test_a_lease_freed_within_the_wait_is_taken(place):
    first, second = place.open(), place.open("w", lease_wait_seconds=20)
    lease = first.acquire_lease("src", "items")
    releaser = threading.Timer(0.3, lease.release)
    releaser.start()
    taken, waited = timed(lambda: second.acquire_lease("src", "items"))
    releaser.join()
    assert not isinstance(taken, Exception), taken
    assert 0.3 <= waited < 5
    taken.release()
    first.close()
    second.close()


def test_the_lease_of_another_process_is_renewed_while_held_and_taken_over_once_it_is_killed(place):
    expiry = 1.0
    holder = start_holder(place, **expiring(place, expiry))
    # Longer than one expiry: an expiring lease survives that wait only by being renewed.
    wait = expiry + 1 if place.kind in EXPIRING else 0.3
    waiting = place.open("w", lease_wait_seconds=wait, **expiring(place, expiry))
    try:
        failed, _ = timed(lambda: waiting.acquire_lease("src", "items"))
        assert isinstance(failed, LeaseHeldError), failed
        assert f"pid {holder.pid}" in str(failed)
        if place.kind == "duckdb":  # between processes, DuckDB's own file lock is the lease
            assert f"DuckDB's lock on {place.base / 'w.duckdb'}" in str(failed)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    waiting.close()
    taker = place.open("w", lease_wait_seconds=expiry + 5, **expiring(place, expiry))
    taken, waited = timed(lambda: taker.acquire_lease("src", "items"))
    assert not isinstance(taken, Exception), taken
    # A database session or a file lock ends with its process; an expiring lease runs out.
    assert waited < (expiry + 1 if place.kind in EXPIRING else 1)
    taken.release()
    taker.close()


@pytest.mark.parametrize("kind", ["files", "redshift"])
def test_a_run_that_was_suspended_past_its_lease_expiry_cannot_commit(kind, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    holder = start_holder(place, lease_expiry_seconds=1)
    assert holder.stdin is not None and holder.stdout is not None
    holder.send_signal(signal.SIGSTOP)  # a suspended VM, a stalled process: no heartbeat
    try:
        other = place.open("w", lease_expiry_seconds=1, lease_wait_seconds=5)
        lease = other.acquire_lease("src", "items")  # taken over once the old one expired
    finally:
        holder.send_signal(signal.SIGCONT)
    holder.stdin.write("check\n")
    holder.stdin.flush()
    answer = holder.stdout.readline()
    assert answer.startswith("LeaseLostError: src.items -> w: "), answer
    holder.kill()
    holder.wait(timeout=30)
    lease.check()  # the new holder's lease stands
    lease.release()
    other.close()


# --- the state compare-and-set --------------------------------------------------------------------
def test_a_commit_from_a_stale_state_version_is_refused_and_commits_nothing(place, tmp_path):
    dest = place.open()
    try:
        dest.load(job(tmp_path, [1, 2], base_version=0))
        with pytest.raises(StateConflictError, match=r"^src\.items -> w: another run committed state version 1 "
                                                     r"after this run started from version 0; this commit was "
                                                     r"rolled back and nothing of it is kept"):
            dest.load(job(tmp_path, [3, 4], base_version=0))
        assert place.column("src", "items", "id") == [1, 2]
        assert dest.read_state("src", "items").version == 1 and dest.get_state("src", "items") == {"last": 2}
        dest.load(job(tmp_path, [5], base_version=1))
        assert place.column("src", "items", "id") == [1, 2, 5]
        assert place.versions("src", "items") == [1, 2]
    finally:
        dest.close()


def test_commits_of_one_version_by_two_runs_at_once_leave_one(place, tmp_path):
    destinations = [place.open(), place.open()]
    try:
        for trial in range(3):
            stream = f"items{trial}"
            jobs = [job(tmp_path, [trial * 10 + i], base_version=0, stream=stream) for i in range(2)]
            barrier = threading.Barrier(2)
            outcomes: list[Any] = [None, None]

            def commit(i: int, stream: str = stream, jobs: list[LoadJob] = jobs, barrier: Any = barrier,
                       outcomes: list[Any] = outcomes) -> None:
                barrier.wait()
                outcomes[i] = timed(lambda: destinations[i].load(jobs[i]))[0]

            threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(type(o).__name__ for o in outcomes) == ["NoneType", "StateConflictError"], outcomes
            winner = outcomes.index(None)
            assert place.column("src", stream, "id") == [trial * 10 + winner]
            assert place.versions("src", stream) == [1]
    finally:
        for dest in destinations:
            dest.close()


RENUMBER = """CREATE TABLE _floe_state_renumbered AS SELECT source, stream, row_number() OVER (
  PARTITION BY source, stream ORDER BY version, committed_at) AS version, state, load_id, committed_at
FROM _floe_state;
DROP TABLE _floe_state;
ALTER TABLE _floe_state_renumbered RENAME TO _floe_state"""


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_duplicate_versions_left_by_older_runs_are_named_and_the_documented_repair_works(kind, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    dest = place.open()
    assert isinstance(dest, SqlDestination)
    # _floe_state as an older floe left it after two overlapping runs: versions 2 and 3 twice.
    with dest.transaction() as cur:
        cur.execute("CREATE TABLE _floe_state (source VARCHAR, stream VARCHAR, version BIGINT, state VARCHAR, "
                    "load_id VARCHAR, committed_at TIMESTAMP WITH TIME ZONE)")
        for version, n in [(1, 1), (2, 2), (2, 2), (3, 3), (3, 3)]:
            cur.execute(f"INSERT INTO _floe_state VALUES ('src', 'items', {version}, '{{\"last\": {n}}}', 'l{n}', "
                        f"TIMESTAMP WITH TIME ZONE '2026-01-0{n} 00:00:00+00')")
    with pytest.raises(DestinationError, match=r"destinations\.w: \w+\._floe_state holds the same state version "
                                               r"more than once for src\.items \(versions 2, 3\): .* 'Duplicate "
                                               r"state versions'"):
        dest.load(job(tmp_path, [1], base_version=3))
    dest.close()
    dest = place.open()
    assert isinstance(dest, SqlDestination)
    with dest.transaction() as cur:
        for statement in RENUMBER.split(";\n"):
            cur.execute(statement)
    committed = dest.read_state("src", "items")
    assert (committed.version, committed.state) == (5, {"last": 3})
    dest.load(job(tmp_path, [9], base_version=5))
    assert place.versions("src", "items") == [1, 2, 3, 4, 5, 6]
    with pytest.raises(StateConflictError):
        dest.load(job(tmp_path, [10], base_version=5))
    dest.close()


# --- DDL races --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["duckdb", "postgres", "redshift"])
def test_streams_of_a_new_source_creating_its_schema_at_once_all_commit(kind, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    count = 4
    destinations: list[Destination] = [place.open() for _ in range(count)]  # fresh: floe's tables too
    try:
        for trial in range(3):
            barrier = threading.Barrier(count)
            errors: list[Exception] = []

            def load(i: int, trial: int = trial, barrier: Any = barrier, errors: list[Exception] = errors) -> None:
                spec_job = job(tmp_path, [i], base_version=None, stream=f"t{i}")
                spec_job = LoadJob(spec_job.load_id, f"new{trial}", f"t{i}", TableSpec(
                    f"new{trial}", f"t{i}", spec_job.table.columns), spec_job.files, {"n": i}, spec_job.started_at)
                barrier.wait()
                try:
                    destinations[i].load(spec_job)
                except Exception as exc:  # noqa: BLE001 - collected for the assertion
                    errors.append(exc)

            threads = [threading.Thread(target=load, args=(i,)) for i in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
            assert [place.column(f"new{trial}", f"t{i}", "id") for i in range(count)] == [[i] for i in range(count)]
    finally:
        for dest in destinations:
            dest.close()
