"""The contract every destination keeps, held against each of them on the servers the suite starts.

Loads are built as the pipeline builds them (stage files in the destination's stage format + a
checkpoint) and committed through `Destination.load`; what the destination holds is then read back
as its users read it (a SQL table; for `files`, the data objects read by the rules of
docs/destinations.md). A destination joins the suite with one line in DESTINATIONS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from floe.apps.notify import Notifier, report
from floe.config import NotifyConfig
from floe.core.destination import CommittedState, Destination, LoadJob, StagedFile, StateChange, TableSpec
from floe.core.errors import DestinationError, StateConflictError
from floe.core.stream import RefreshScope
from floe.destinations.files import FilesDestination
from floe.destinations.sql import SqlDestination
from floe.engine.pipeline import StreamResult
from floe.infra.stage import StageWriter, new_load_id
from tests.fixtures.destinations import Place, files_rows, place_of
from tests.fixtures.fullstory import webhook  # noqa: F401, F811 - a fixture


@dataclass(frozen=True)
class Kind:
    """A destination under the contract: a kind of `place_of`, extra settings, what it declares."""

    kind: str
    settings: dict[str, Any] = field(default_factory=dict)
    typed: bool = True  # its columns have types: a value of another type fails the load
    load_log: bool = True  # it keeps a row per load, failed ones too (`_floe_loads`)

    @property
    def id(self) -> str:
        return "-".join([self.kind, *map(str, self.settings.values())])


DESTINATIONS = [
    Kind("duckdb"),  # Arrow IPC stage files (the default)
    Kind("duckdb", {"stage_format": "parquet"}),
    Kind("postgres"),
    Kind("redshift"),  # replayed on PostgreSQL, staged on S3 (tests/fixtures/redshift.py)
    Kind("bigquery"),  # tests/bigquery_emulator.py over the GCS emulator
    Kind("files", typed=False, load_log=False),
]


def kinds(**declared: bool) -> list[Any]:
    return [pytest.param(k, id=k.id) for k in DESTINATIONS if all(getattr(k, a) == v for a, v in declared.items())]


@dataclass
class Under:
    """One destination under test: the open destination, and its contents read back."""

    kind: Kind
    place: Place
    dest: Destination
    folder: Path

    def settings(self) -> dict[str, Any]:
        return {**self.place.settings, **self.kind.settings}

    def load(self, *tables: pa.Table, disposition: str = "append", pk: tuple[str, ...] = (),
             parent: tuple[str, ...] = (), checkpoint: dict[str, Any] | None = None) -> LoadJob:
        """Stage `tables` (one file each, in arrival order) and commit them with `checkpoint`."""
        job = self.job(*tables, disposition=disposition, pk=pk, parent=parent, checkpoint=checkpoint)
        self.dest.load(job)
        return job

    def job(self, *tables: pa.Table, disposition: str = "append", pk: tuple[str, ...] = (),
            parent: tuple[str, ...] = (), checkpoint: dict[str, Any] | None = None,
            schema_changes: str = "evolve") -> LoadJob:
        writer = StageWriter(self.folder / "stage" / "src" / "items", new_load_id(),
                             format=self.dest.stage_format(disposition))  # type: ignore[arg-type]
        files: list[StagedFile] = []
        fields: dict[str, pa.Field] = {}
        for table in tables:
            for batch in table.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]:
                writer.write(batch)
            files += writer.flush()
            fields.update({f.name: f for f in table.schema})
        spec = TableSpec("src", "items", pa.schema(list(fields.values())), pk, disposition, parent,  # type: ignore[arg-type]
                         schema_changes=schema_changes)  # type: ignore[arg-type]
        return LoadJob(writer.load_id, "src", "items", spec, files, checkpoint or {"load": writer.load_id},
                       datetime.now(UTC))

    def rows(self, columns: str = "id, v", spec: TableSpec | None = None,
             committed_only: bool = False) -> list[tuple[Any, ...]]:
        """The stream's rows, sorted; `files` reads a merge or child stream (`spec`) as the docs say,
        and with `committed_only` only the objects its state objects list (the docs' exact reading
        while a dead load's objects wait for the next commit to delete them)."""
        if isinstance(self.dest, FilesDestination):
            return bag(files_rows(self.dest, columns=columns, spec=spec, committed_only=committed_only))
        if self.place.bigquery is not None:
            got = self.place.bigquery.db.execute(f"SELECT {columns} FROM raw.src_items").fetchall()
        else:
            assert isinstance(self.dest, SqlDestination)
            got = self.dest.query(f"SELECT {columns} FROM src.items")
        return bag(got)

    def loads(self) -> list[tuple[str, str, int]]:
        """(load_id, status, rows) of every load in the destination's load log, in load order."""
        table = "raw._floe_loads" if self.place.bigquery is not None else "_floe_loads"
        sql = f"SELECT load_id, status, rows FROM {table} ORDER BY load_id"
        if self.place.bigquery is not None:
            return [tuple(r) for r in self.place.bigquery.db.execute(sql).fetchall()]  # type: ignore[misc]
        assert isinstance(self.dest, SqlDestination)
        return [tuple(r) for r in self.dest.query(sql)]  # type: ignore[misc]


def open_under(kind: Kind, request: pytest.FixtureRequest, base: Path) -> Iterator[Under]:
    place = place_of(kind.kind, request, base)
    dest = place.open(**kind.settings)
    try:
        yield Under(kind, place, dest, base)
    finally:
        dest.close()


@pytest.fixture(params=kinds())
def under(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Under]:
    """Each destination in DESTINATIONS in turn, fresh."""
    yield from open_under(request.param, request, tmp_path)


@pytest.fixture(params=kinds(typed=True))
def typed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Under]:
    """Each destination whose columns have types."""
    yield from open_under(request.param, request, tmp_path)


def bag(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows in the order `Under.rows` returns them (a multiset: duplicates stay)."""
    return sorted(rows, key=repr)


def t(ids: list[int | None], values: list[str | None], **extra: Any) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "v": pa.array(values, pa.string()), **extra})


# --- the dispositions ------------------------------------------------------------------------------
def test_append_adds_rows_stamps_each_with_its_load_and_keeps_every_state_version(under):
    first = under.load(t([1, 2], ["a", "b"]), checkpoint={"cursor": "2024-01-01"})
    second = under.load(t([2, 3], ["b", "c"]), checkpoint={"cursor": "2024-01-02"})
    assert under.rows() == [(1, "a"), (2, "b"), (2, "b"), (3, "c")]
    assert under.rows("id, _floe_load_id") == bag([(1, first.load_id), (2, first.load_id), (2, second.load_id),
                                                   (3, second.load_id)])
    assert all(at is not None for (at,) in under.rows("_floe_loaded_at"))
    # State: the latest version is the second load's checkpoint; both versions are kept.
    assert under.dest.get_state("src", "items") == {"cursor": "2024-01-02"}
    assert under.dest.read_state("src", "items").version == 2
    assert under.place.versions("src", "items") == [1, 2]
    [latest] = under.dest.states()
    assert (latest["source"], latest["stream"], latest["version"], latest["state"], latest["load_id"]) == (
        "src", "items", 2, {"cursor": "2024-01-02"}, second.load_id)
    if under.kind.load_log:
        assert under.loads() == sorted([(first.load_id, "committed", 2), (second.load_id, "committed", 2)])


def test_merge_keeps_the_last_row_per_key_with_duplicate_and_null_keys(under):
    merge = {"disposition": "merge", "pk": ("id",)}
    under.load(t([1, 2, 3], ["a", "b", "c"]), **merge)
    # id 2 twice and NULL twice within one load (across two stage files): the later row of each wins.
    job = under.load(t([2, None, 4], ["b1", "n1", "d"]), t([2, None], ["b2", "n2"]), **merge)
    assert under.rows(spec=job.table) == [(1, "a"), (2, "b2"), (3, "c"), (4, "d"), (None, "n2")]
    job = under.load(t([None, 1], ["n3", "a2"]), **merge)  # a NULL key matches the NULL key
    assert under.rows(spec=job.table) == [(1, "a2"), (2, "b2"), (3, "c"), (4, "d"), (None, "n3")]


def test_replace_swaps_the_whole_table_and_an_empty_replace_empties_it(under):
    under.load(t([1, 2, 3], ["a", "b", "c"]), disposition="replace")
    under.load(t([9], ["z"]), disposition="replace")
    assert under.rows() == [(9, "z")]
    under.load(t([], []), disposition="replace", checkpoint={"empty": True})
    assert under.rows() == []
    assert under.dest.get_state("src", "items") == {"empty": True}


def test_a_backfill_commit_replaces_the_rows_of_its_range_and_keeps_every_other_row(under):
    def at(*days: int | None) -> dict[str, pa.Array]:
        return {"at": pa.array([None if d is None else datetime(2024, 1, d, 12, tzinfo=UTC) for d in days],
                               pa.timestamp("us", "UTC"))}

    under.load(t([1, 2, 3, 4, 5], ["a", "b", "c", "d", "n"], **at(1, 2, 3, 4, None)), checkpoint={"day": 4})
    scope = RefreshScope("at", datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 4, tzinfo=UTC))
    job = under.job(t([2, 3, 6], ["b2", "c2", "x2"], **at(2, 3, 3)), checkpoint={"day": 4})
    under.dest.load(dataclasses.replace(job, replaces=scope))  # days 2 and 3 re-read: b, c changed, x is new
    assert under.rows() == [(1, "a"), (2, "b2"), (3, "c2"), (4, "d"), (5, "n"), (6, "x2")]
    empty = under.job(pa.table({"id": pa.array([], pa.int64()), "v": pa.array([], pa.string()), **at()}),
                      checkpoint={"day": 4})
    under.dest.load(dataclasses.replace(empty, files=[], replaces=scope))  # the days now hold nothing
    assert under.rows() == [(1, "a"), (4, "d"), (5, "n")]
    assert under.dest.get_state("src", "items") == {"day": 4} and under.place.versions("src", "items") == [1, 2, 3]


def test_a_child_merge_replaces_each_re_sent_parents_set_and_a_marker_empties_it(under):
    # Child rows keyed (id, v) under parent id: a re-sent parent's rows are replaced as a set;
    # a marker row (v NULL) says "this parent now has no rows" and is not a row itself.
    child = {"disposition": "merge", "pk": ("id", "v"), "parent": ("id",)}
    under.load(t([1, 1, 2, 3], ["a", "b", "c", "d"]), **child)
    job = under.load(t([1, 2, 4], ["z", None, None]), **child)
    assert under.rows(spec=job.table) == [(1, "z"), (3, "d")]


def test_a_new_column_is_added_and_earlier_rows_read_null(under):
    under.load(t([1], ["a"]))
    # Three files, three schemas, one load: `extra` all null (so typed null), then int64, then absent.
    under.load(t([4], ["d"], extra=pa.nulls(1)), t([2], ["b"], extra=pa.array([7], pa.int64())), t([3], ["c"]))
    assert under.rows("id, v, extra") == [(1, "a", None), (2, "b", 7), (3, "c", None), (4, "d", None)]


# --- failures commit nothing -----------------------------------------------------------------------
def assert_only_the_first_load(under: Under, first: LoadJob, failed: LoadJob, error: str) -> None:
    assert under.rows("id, v, n") == [(1, "a", 5)]
    assert under.dest.get_state("src", "items") == {"n": 1}
    assert under.place.versions("src", "items") == [1]
    under.dest.record_failure(failed, error)  # what the pipeline does with the error
    if under.kind.load_log:
        assert under.loads() == sorted([(first.load_id, "committed", 1), (failed.load_id, "failed", failed.rows)])
    under.load(t([3], ["c"], n=pa.array([7], pa.int64())), checkpoint={"n": 3})  # usable again
    assert under.rows("id, v, n") == [(1, "a", 5), (3, "c", 7)]
    assert under.place.versions("src", "items") == [1, 2]


def test_a_type_change_widens_the_column_or_keeps_the_values_in_a_variant_column(typed):
    typed.load(t([1], ["a"], n=pa.array([7], pa.int32()), amount=pa.array([10], pa.int64())), checkpoint={"n": 1})
    # `amount` becomes decimal(12, 2): every warehouse widens the column; `n` becomes a list, which no column
    # type holds beside integers: its values go to the variant column `n__v_json`.
    job = typed.load(t([2], ["b"], n=pa.array([[1, 2]], pa.list_(pa.int64())),
                       amount=pa.array([Decimal("9910.25")], pa.decimal128(12, 2))), checkpoint={"n": 2})
    assert typed.rows("id, n, amount") == [(1, 7, Decimal("10")), (2, None, Decimal("9910.25"))]
    assert [(i, json.loads(v) if isinstance(v, str) else v) for i, v in typed.rows("id, n__v_json")] == [
        (1, None), (2, [1, 2])]
    assert typed.dest.get_state("src", "items") == {"n": 2}
    assert [c["kind"] for c in job.details["schema_changes"]] == ["variant", "widen"]


def test_a_value_the_column_cannot_hold_rolls_back_the_whole_load(typed):
    first = typed.load(t([1], ["a"], n=pa.array([5], pa.int64())), checkpoint={"n": 1})
    # A good file with a new column, then one whose `n` no column holds, with schema_changes: freeze:
    # none of it lands.
    bad = typed.job(t([2], ["b"], n=pa.array([6], pa.int64()), more=pa.array([1], pa.int64())),
                    t([3], ["b"], n=pa.array(["not a number"], pa.string())), checkpoint={"n": 2},
                    schema_changes="freeze")
    with pytest.raises(DestinationError, match="src.items failed, nothing committed") as failed:
        typed.dest.load(bad)
    assert_only_the_first_load(typed, first, bad, str(failed.value))
    assert "more" not in {c.split(".")[-1] for c in describe_columns(typed)}  # the new column went with it


def describe_columns(under: Under) -> list[str]:
    if under.place.bigquery is not None:
        return [r[0] for r in under.place.bigquery.db.execute("DESCRIBE raw.src_items").fetchall()]
    assert isinstance(under.dest, SqlDestination)
    return [r[0] for r in under.dest.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'items'")]


def test_a_load_that_breaks_midway_commits_nothing(under):
    first = under.load(t([1], ["a"], n=pa.array([5], pa.int64())), checkpoint={"n": 1})
    broken = under.job(t([2], ["b"], n=pa.array([6], pa.int64())), t([4], ["d"], n=pa.array([8], pa.int64())),
                       checkpoint={"n": 2})
    broken.files[-1].path.write_bytes(b"not a stage file")  # the second file cannot be read
    with pytest.raises(Exception) as failed:  # noqa: B017, PT011 - Redshift and BigQuery raise the reader's error
        under.dest.load(broken)
    assert_only_the_first_load(under, first, broken, str(failed.value))


# --- exactly once under SIGKILL ----------------------------------------------------------------------
# Appends load i (rows i * PER_LOAD ...) for i from the committed state on; prints "loading <i>" before
# load `kill_at` and never goes past it (it then waits on stdin), so the parent's SIGKILL lands during it.
PER_LOAD = 2_000
CHILD = textwrap.dedent("""
    import json, sys
    from datetime import UTC, datetime
    from pathlib import Path
    import pyarrow as pa
    from floe.config import validate_model
    from floe.core.plugins import destination_registry as registry
    from floe.core.destination import LoadJob, TableSpec
    from floe.infra.stage import StageWriter, new_load_id
    from floe.core.stream import Context

    settings, folder, per_load, kill_at = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if settings["type"] == "redshift":
        from tests.fixtures.redshift import RedshiftOnPostgres as cls
    else:
        cls = registry.load(settings["type"])
    dest = cls("w", validate_model(cls.Config, settings, "destinations.w"), Context(folder))
    for i in range((dest.get_state("src", "items") or {"next": 0})["next"], kill_at + 1):
        batch = pa.record_batch({"id": pa.array(range(i * per_load, (i + 1) * per_load), pa.int64())})
        writer = StageWriter(folder / "stage" / "src" / "items", new_load_id(), format=dest.stage_format("append"))
        writer.write(batch)
        job = LoadJob(writer.load_id, "src", "items", TableSpec("src", "items", batch.schema), writer.flush(),
                      {"next": i + 1}, datetime.now(UTC))
        if i == kill_at:
            print(f"loading {i}", flush=True)
        dest.load(job)
    sys.stdin.readline()
""")


def test_sigkill_during_a_load_then_a_rerun_loads_every_row_exactly_once(under):
    loads, kill_at = 4, 2
    under.dest.close()  # the child process loads (DuckDB: one process holds the file)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(under.settings()), str(under.folder), str(PER_LOAD), str(kill_at)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[2], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout is not None
    line = child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert line == f"loading {kill_at}\n", child.stderr.read() if child.stderr else line

    # The re-run: from the committed state on, as a run does.
    under.dest = under.place.open(**under.kind.settings)
    committed = (under.dest.get_state("src", "items") or {"next": 0})["next"]
    assert committed in (kill_at, kill_at + 1)  # the killed load committed whole or not at all
    assert sorted(i for (i,) in under.rows("id", committed_only=True)) == list(range(committed * PER_LOAD))  # rows and state agree
    for i in range(committed, loads):
        under.load(pa.table({"id": pa.array(range(i * PER_LOAD, (i + 1) * PER_LOAD), pa.int64())}),
                   checkpoint={"next": i + 1})
    assert sorted(i for (i,) in under.rows("id")) == list(range(loads * PER_LOAD))  # each row once
    assert under.dest.get_state("src", "items") == {"next": loads}
    assert under.place.versions("src", "items") == list(range(1, loads + 1))


# --- state changes: revert and reset -----------------------------------------------------------------
def change(job: LoadJob, state: dict[str, Any] | None, base: int, delete_after: int | None, action: str,
           **details: Any) -> StateChange:
    return StateChange(new_load_id(), job.table, "src", "items", state, base, delete_after, action, details)


@pytest.mark.parametrize("disposition", ["append", "merge"])
def test_revert_deletes_the_rows_of_later_loads_as_a_new_version_and_reset_empties_the_stream(under, disposition):
    pk = ("id",) if disposition == "merge" else ()
    jobs = [under.load(t([n], [f"v{n}"]), disposition=disposition, pk=pk, checkpoint={"n": n}) for n in (1, 2, 3, 4)]
    log = under.dest.state_log("src", "items")
    assert [(v.version, v.load_id, v.state, v.action) for v in log] == [
        (n, jobs[n - 1].load_id, {"n": n}, "load") for n in (4, 3, 2, 1)]
    assert {v.rows for v in log} == {1} and all(v.committed_at is not None for v in log)
    assert [v.version for v in under.dest.state_log("src", "items", limit=2)] == [4, 3]

    assert under.dest.change_state(change(jobs[0], {"n": 2}, 4, 2, "revert", to_version=2)) == 2
    assert under.rows(spec=jobs[0].table) == [(1, "v1"), (2, "v2")]
    assert under.dest.read_state("src", "items") == CommittedState(5, {"n": 2})
    [revert] = under.dest.state_log("src", "items", limit=1)
    assert (revert.version, revert.state, revert.action) == (5, {"n": 2}, "revert")
    assert (revert.details["to_version"], revert.details["deleted_rows"]) == (2, 2)
    with pytest.raises(StateConflictError):  # built on version 4, which is no longer the latest
        under.dest.change_state(change(jobs[0], {"n": 1}, 4, 1, "revert"))
    # The re-run loads the reverted rows again: each once.
    under.load(t([3, 4], ["v3", "v4"]), disposition=disposition, pk=pk, checkpoint={"n": 4})
    assert under.rows(spec=jobs[0].table) == [(1, "v1"), (2, "v2"), (3, "v3"), (4, "v4")]

    assert under.dest.change_state(change(jobs[0], None, 6, None, "reset", keep_rows=True)) == 0
    assert under.dest.read_state("src", "items") == CommittedState(7, None)
    assert len(under.rows(spec=jobs[0].table)) == 4  # kept
    assert under.dest.change_state(change(jobs[0], None, 7, 0, "reset")) == 4
    assert under.rows(spec=jobs[0].table) == []
    assert under.dest.read_state("src", "items") == CommittedState(8, None)
    assert under.place.versions("src", "items") == list(range(1, 9))  # the history keeps every change
    under.load(t([1], ["v1"]), disposition=disposition, pk=pk, checkpoint={"n": 1})  # loads as if never loaded
    assert under.rows(spec=jobs[0].table) == [(1, "v1")]


# --- the load log: notices of failure and recovery ----------------------------------------------------
def test_a_stream_that_failed_and_loads_again_is_reported_recovered_once(under, webhook):  # noqa: F811
    url, received = webhook
    notifier = Notifier(NotifyConfig(webhook=url))
    first_run = datetime.now(UTC)
    assert under.dest.last_load_status("src", "items", first_run) is None
    failed = under.job(t([1], ["a"]))
    under.dest.record_failure(failed, "boom")
    second_run = datetime.now(UTC)
    assert under.dest.last_load_status("src", "items", second_run) == "failed"
    under.load(t([1], ["a"]))
    ok = StreamResult("src", "items", under.dest.name, rows=1)
    report(notifier, [ok], {under.dest.name: under.dest}, second_run)
    assert [m["event"] for m in received] == ["recovered"]
    assert received[0]["last_sync_point"] == under.dest.get_state("src", "items")
    third_run = datetime.now(UTC)
    report(notifier, [ok], {under.dest.name: under.dest}, third_run)  # already reported: nothing new
    assert [m["event"] for m in received] == ["recovered"]
