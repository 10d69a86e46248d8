"""What the SQL destinations (DuckDB, PostgreSQL) do beyond the contract every destination keeps
(tests/contract/test_destination_contract.py): compound keys with NULL parts, types read back,
commit folding, `floe check` on PostgreSQL and its COPY paths.

Loads are built the way the pipeline builds them (staged Parquet files + a checkpoint) and
committed with `Destination.load`; the table is then read back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from floe.core.destination import LoadJob, StagedFile, TableSpec, json_field
from floe.core.errors import DestinationError
from floe.core.stream import Batch, Context, State, Stream
from floe.destinations.duckdb import DuckDBConfig, DuckDBDestination, insert_threads
from floe.destinations.postgres import PostgresConfig, PostgresDestination
from floe.destinations.sql import SqlDestination
from floe.engine.pipeline import run_stream
from floe.infra.stage import StageWriter
from tests.fixtures.core import OneStreamSource, ResentParentStream, staged_files


def settings_for(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind.startswith("duckdb"):  # duckdb stages Arrow files; duckdb-parquet, Parquet ones
        return {"type": "duckdb", "path": str(tmp_path / "w.duckdb"), "stage_format": kind.partition("-")[2] or "arrow"}
    return request.getfixturevalue("postgres_db").config()


def make_destination(settings: dict[str, Any], tmp_path: Path) -> SqlDestination:
    if settings["type"] == "duckdb":
        return DuckDBDestination("warehouse", DuckDBConfig.model_validate(settings), Context(tmp_path))
    return PostgresDestination("warehouse", PostgresConfig.model_validate(settings), Context(tmp_path))


@pytest.fixture(params=["duckdb", "duckdb-parquet", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return settings_for(request.param, tmp_path, request)


@pytest.fixture
def dest(settings: dict[str, Any], tmp_path: Path):
    destination = make_destination(settings, tmp_path)
    yield destination
    destination.close()


class Loader:
    """Builds staged files + a LoadJob like the pipeline does, and commits it."""

    def __init__(self, dest: SqlDestination, folder: Path) -> None:
        self.dest, self.folder, self.count = dest, folder, 0

    def job(self, tables: list[pa.Table], disposition: str = "append", pk: tuple[str, ...] = (),
            checkpoint: dict[str, Any] | None = None, parent: tuple[str, ...] = ()) -> LoadJob:
        """One stage file per table, in the destination's stage format, in arrival order."""
        self.count += 1
        writer = StageWriter(self.folder, f"load{self.count}",
                             format=self.dest.stage_format(disposition))
        files: list[StagedFile] = []
        for table in tables:
            for batch in table.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]:
                writer.write(batch)
            files += writer.flush()
        fields: dict[str, pa.Field] = {}
        for table in tables:
            fields.update({f.name: f for f in table.schema})
        spec = TableSpec("src", "items", pa.schema(list(fields.values())), pk, disposition,  # type: ignore[arg-type]
                         parent_key=parent)
        return LoadJob(f"load-{self.count:04d}", "src", "items", spec, files,
                       checkpoint if checkpoint is not None else {"n": self.count}, datetime.now(UTC))

    def __call__(self, *tables: pa.Table, **kwargs: Any) -> LoadJob:
        job = self.job(list(tables), **kwargs)
        self.dest.load(job)
        return job


@pytest.fixture
def load(dest: SqlDestination, tmp_path: Path) -> Loader:
    return Loader(dest, tmp_path)


def rows(dest: SqlDestination, columns: str = "id, v") -> list[tuple[Any, ...]]:
    return dest.query(f"SELECT {columns} FROM src.items ORDER BY id NULLS LAST, v")


def t(ids: list[int | None], values: list[str | None], **extra: Any) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "v": pa.array(values, pa.string()), **extra})


def test_merge_on_a_compound_key_with_a_null_part(dest, load):
    def ck(a: list[Any], b: list[Any], v: list[str]) -> pa.Table:
        return pa.table({"a": pa.array(a, pa.int64()), "b": pa.array(b, pa.string()), "v": v})

    load(ck([1, 1, 2], ["x", None, None], ["1x", "1-", "2-"]), disposition="merge", pk=("a", "b"))
    load(ck([1, 2, 1], [None, "y", "x"], ["1-new", "2y", "1x-new"]), disposition="merge", pk=("a", "b"))
    got = dest.query("SELECT a, b, v FROM src.items ORDER BY a, b NULLS LAST")
    assert got == [(1, "x", "1x-new"), (1, None, "1-new"), (2, "y", "2y"), (2, None, "2-")]


def test_a_compound_key_repeated_within_one_load_keeps_its_last_row(dest, load):
    # Keys equal only through their NULL parts are one key: the check for repeated keys must see them.
    def ck(a: list[Any], b: list[Any], v: list[str]) -> pa.Table:
        return pa.table({"a": pa.array(a, pa.int64()), "b": pa.array(b, pa.string()), "v": v})

    load(ck([1, 2, 1, 2, 3], [None, "y", None, "y", None], ["1-old", "2y-old", "1-new", "2y-new", "3-"]),
         disposition="merge", pk=("a", "b"))
    load(ck([3, 3], [None, "z"], ["3-new", "3z"]), disposition="merge", pk=("a", "b"))
    got = dest.query("SELECT a, b, v FROM src.items ORDER BY a, b NULLS LAST")
    assert got == [(1, None, "1-new"), (2, "y", "2y-new"), (3, "z", "3z"), (3, None, "3-new")]


def test_types_round_trip_through_read_batches(dest, load):
    ts = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    table = pa.table({
        "id": pa.array([1, 2], pa.int64()),
        "flag": [True, None],
        "amount": pa.array([Decimal("12.34"), None], pa.decimal128(10, 2)),
        "wide": pa.array([Decimal("1234567890123456789012345678.0123456789"), None], pa.decimal128(38, 10)),
        "ratio": [0.5, None],
        "day": [date(2024, 5, 6), None],
        "seen_at": pa.array([ts, None], pa.timestamp("us", "UTC")),
        "doc": pa.array(['{"a": [1, 2]}', None], pa.string()),
        "text": ["comma, \"quote\"\nnewline", ""],
    }).cast(pa.schema([
        ("id", pa.int64()), ("flag", pa.bool_()), ("amount", pa.decimal128(10, 2)),
        ("wide", pa.decimal128(38, 10)), ("ratio", pa.float64()),
        ("day", pa.date32()), ("seen_at", pa.timestamp("us", "UTC")), json_field("doc"), ("text", pa.string()),
    ]))
    load(table)
    batches = list(dest.read_batches(
        "SELECT id, flag, amount, wide, ratio, day, seen_at, doc, text FROM src.items ORDER BY id", batch_size=1))
    assert [b.num_rows for b in batches] == [1, 1]
    got = pa.Table.from_batches(batches).to_pylist()
    assert got[0]["flag"] is True and got[0]["ratio"] == 0.5
    # Exact decimals (DECIMAL(p,s) on DuckDB, NUMERIC(p,s) on PostgreSQL), up to 38 digits.
    assert (got[0]["amount"], got[0]["wide"]) == (Decimal("12.34"), Decimal("1234567890123456789012345678.0123456789"))
    assert got[0]["day"] == date(2024, 5, 6) and got[0]["seen_at"] == ts
    assert json.loads(got[0]["doc"]) == {"a": [1, 2]}
    assert got[0]["text"] == "comma, \"quote\"\nnewline"
    assert got[1] == {"id": 2, "flag": None, "amount": None, "wide": None, "ratio": None, "day": None, "seen_at": None,
                      "doc": None, "text": ""}


# --- grouping checkpoints (Destination.commit_interval) -------------------------------------------
class CountingStream(Stream):
    """`n` one-row batches, each followed by a checkpoint; raises when it reaches `fail_at`."""

    name = "items"
    schema = pa.schema([("id", pa.int64())])

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        for i in range((state or {}).get("next", 0), self.n):
            if i == self.fail_at:
                raise RuntimeError("source broke")
            yield Batch(pa.record_batch({"id": pa.array([i], pa.int64())}), checkpoint={"next": i + 1})


@pytest.mark.parametrize("fail_at", [None, 3])
def test_commit_interval_folds_checkpoints_into_one_commit(duckdb_destination, tmp_path, fail_at):
    duckdb_destination.commit_interval = 3600.0
    stream = CountingStream(5, fail_at)
    result = asyncio.run(run_stream(OneStreamSource(stream), stream, duckdb_destination, tmp_path / "stage"))
    expected = 5 if fail_at is None else fail_at  # whole checkpoints before a failure still commit
    assert result.commits == 1 and result.rows == expected
    assert duckdb_destination.get_state("src", "items") == {"next": expected}
    assert duckdb_destination.query("SELECT COUNT(*) FROM src.items")[0][0] == expected
    assert (result.error is None) == (fail_at is None)
    assert not staged_files(tmp_path / "stage")  # no staged file left behind


@pytest.mark.parametrize(("config", "commits"), [
    ({}, 1),  # DuckDB's defaults: a commit holds 250,000 rows or ten seconds' worth
    ({"commit_rows": 2}, 3),  # after rows 2 and 4, then the rest
    ({"commit_wait_seconds": 0}, 5),
])
def test_duckdb_folds_checkpoints_until_commit_rows_or_commit_wait(tmp_path, config, commits):
    dest = DuckDBDestination("w", DuckDBConfig(path=str(tmp_path / "w.duckdb"), **config), Context(tmp_path))
    stream = CountingStream(5)
    try:
        result = asyncio.run(run_stream(OneStreamSource(stream), stream, dest, tmp_path / "stage"))
        assert result.ok and result.commits == commits and result.rows == 5
        assert dest.get_state("src", "items") == {"next": 5}
        assert dest.query("SELECT COUNT(*), COUNT(DISTINCT id) FROM src.items")[0] == (5, 5)
    finally:
        dest.close()


def test_duckdb_commits_each_checkpoint_of_a_merge(tmp_path):
    # A merge's transaction holds the rows it deletes and inserts in memory: no folding.
    dest = DuckDBDestination("w", DuckDBConfig(path=str(tmp_path / "w.duckdb")), Context(tmp_path))
    stream = ResentParentStream()
    try:
        result = asyncio.run(run_stream(OneStreamSource(stream), stream, dest, tmp_path / "stage"))
        assert result.ok and result.commits == 2
        assert rows(dest) == [(1, "c"), (2, "x")]
    finally:
        dest.close()


def test_duckdb_checkpoints_after_appends_do_not_vacuum_but_after_merges_do(tmp_path):
    # Vacuuming would merge the partly filled row groups of the three commits (compressing them again).
    dest = DuckDBDestination("w", DuckDBConfig(path=str(tmp_path / "w.duckdb")), Context(tmp_path))
    load = Loader(dest, tmp_path)

    def setting(name: str) -> str:
        return str(dest.query("SELECT value FROM duckdb_settings() WHERE name = ?", (name,))[0][0])

    try:
        assert setting("write_buffer_row_group_count") == "1"
        for i in range(3):
            load(t(list(range(i * 1000, i * 1000 + 1000)), ["x"] * 1000))
            dest.conn.execute("CHECKPOINT")
        assert setting("max_vacuum_tasks") == "0"
        assert dest.query("SELECT COUNT(DISTINCT row_group_id) FROM pragma_storage_info('src.items')")[0][0] == 3
        load(t([1], ["y"]), disposition="merge", pk=("id",))
        assert setting("max_vacuum_tasks") == "100"
        assert dest.query("SELECT COUNT(*), COUNT(*) FILTER (WHERE v = 'y') FROM src.items")[0] == (3000, 1)
    finally:
        dest.close()


def spy_threads(dest: DuckDBDestination) -> list[str]:
    """The `SET threads` of each load's statements (the setting its INSERT runs with), as they come."""
    seen: list[str] = []
    statements = dest.disposition_sql

    def spy(spec: TableSpec, *args: Any, **kwargs: Any) -> list[str]:
        out = statements(spec, *args, **kwargs)
        seen.append(next(s for s in out if s.startswith("SET threads")))
        return out

    dest.disposition_sql = spy  # type: ignore[method-assign]
    return seen


def test_duckdb_appends_insert_on_append_threads_and_merges_on_every_thread(tmp_path):
    dest = DuckDBDestination("w", DuckDBConfig(path=str(tmp_path / "w.duckdb"), threads=3, append_threads=1),
                             Context(tmp_path))
    load, seen = Loader(dest, tmp_path), spy_threads(dest)
    try:
        load(t([1, 2], ["a", "b"]))
        load(t([2], ["c"]), disposition="merge", pk=("id",))
        load(t([3], ["d"]))
        assert seen == ["SET threads = 1", "SET threads = 3", "SET threads = 1"]
        assert dest.query("SELECT current_setting('threads')")[0][0] == 1
        assert rows(dest) == [(1, "a"), (2, "c"), (3, "d")]
    finally:
        dest.close()


def test_duckdb_appends_of_wide_rows_insert_on_fewer_threads(tmp_path):
    # Unset append_threads: the threads' buffered row groups stay within 64 MB by the staged bytes per row.
    dest = DuckDBDestination("w", DuckDBConfig(path=str(tmp_path / "w.duckdb"), threads=3), Context(tmp_path))
    load, seen = Loader(dest, tmp_path), spy_threads(dest)
    n = 20_000
    try:
        load(t(list(range(200_000)), ["x"] * 200_000))  # ~20 bytes a row: 2.5 MB a row group
        wide = {f"c{c}": pa.array(["v" * 40 + str(i) for i in range(n)]) for c in range(60)}  # ~3 KB a row
        load(t(list(range(n)), [None] * n, **wide))
        assert seen == ["SET threads = 3", "SET threads = 1"]
        assert dest.query("SELECT COUNT(*) FROM src.items")[0][0] == 200_000 + n
    finally:
        dest.close()


def test_insert_threads_keeps_the_buffered_row_groups_within_the_budget(tmp_path):
    def files(size: int, rows: int) -> list[StagedFile]:
        path = tmp_path / f"{size}-{rows}.arrow"
        with path.open("wb") as f:
            f.truncate(size)  # sparse: only its size counts
        return [StagedFile(path, rows, pa.schema([]))]

    assert insert_threads(files(500 * 250_000, 250_000), 4) == 1  # FullStory's ~500-byte rows: 61 MB a row group
    assert insert_threads(files(150 * 1_000_000, 1_000_000), 4) == 3  # Sailthru's ~150: 18 MB
    assert insert_threads(files(150 * 1_000_000, 1_000_000), 2) == 2
    assert insert_threads(files(5_000 * 1_000, 1_000), 2) == 1  # never less than one
    assert insert_threads(files(0, 0), 2) == 2


@pytest.mark.parametrize("memory_limit", [None, "2GB"])
def test_duckdb_drops_its_cache_of_written_blocks_after_each_commit(tmp_path, memory_limit):
    # DuckDB keeps every block it writes in memory until memory_limit makes it evict: without the
    # eviction after each commit, this process would hold the ~75 MB this test writes.
    dest = DuckDBDestination("w", DuckDBConfig(path=str(tmp_path / "w.duckdb"), memory_limit=memory_limit),
                             Context(tmp_path))
    load = Loader(dest, tmp_path)
    limit = dest.query("SELECT current_setting('memory_limit')")[0][0]
    n, rng = 300_000, np.random.default_rng(7)
    try:
        for i in range(2):  # random 64-bit integers do not compress: each load writes ~40 MB of blocks
            noise = {f"c{c}": pa.array(rng.integers(-(2**63), 2**63 - 1, n)) for c in range(16)}
            load(t(list(range(i * n, (i + 1) * n)), [None] * n, **noise))
        assert dest.query("SELECT COUNT(*) FROM src.items")[0][0] == 2 * n
        assert dest.query("SELECT used_blocks * block_size FROM pragma_database_size()")[0][0] > 48 << 20
        assert dest.query("SELECT sum(memory_usage_bytes) FROM duckdb_memory()")[0][0] <= 32 << 20
        assert dest.query("SELECT current_setting('memory_limit')")[0][0] == limit  # raised again
    finally:
        dest.close()
def test_duckdb_merge_inserts_on_one_thread_and_every_load_gives_the_threads_back(tmp_path):
    # Each thread of an INSERT holds a row group of its own: a merge's runs on `merge_insert_threads`.
    dest = DuckDBDestination("w", DuckDBConfig(path=str(tmp_path / "w.duckdb"), threads=3), Context(tmp_path))
    load = Loader(dest, tmp_path)

    def threads() -> int:
        return int(dest.query("SELECT current_setting('threads')")[0][0])

    try:
        job = load.job([t([1], ["a"])], disposition="merge", pk=("id",))
        statements = dest.disposition_sql(job.table, "staged", "filename, file_row_number", job.load_id)
        at = next(i for i, sql in enumerate(statements) if sql.startswith('INSERT INTO "w"."src"."items" '))
        assert "SET threads = 3" in statements[:at - 1]  # first, for every load
        assert statements[at - 1:at + 2:2] == ["SET threads = 1", "SET threads = 3"]
        load(t([1, 2, 1], ["a", "b", "c"]), disposition="merge", pk=("id",))  # the later row of a key wins
        load(t([2, 3], ["x", "y"]), disposition="merge", pk=("id",))
        assert rows(dest) == [(1, "c"), (2, "x"), (3, "y")]
        assert threads() == 3
        dest.conn.execute("SET threads = 1")  # as a merge that failed in its INSERT leaves it
        load(t([4], ["z"]), disposition="merge", pk=("id",))
        assert threads() == 3 and len(rows(dest)) == 4
    finally:
        dest.close()
    every = DuckDBDestination("e", DuckDBConfig(path=str(tmp_path / "e.duckdb"), threads=3,
                                                                  merge_insert_threads=None),
                              Context(tmp_path))
    try:
        job = Loader(every, tmp_path / "e").job([t([1], ["a"])], disposition="merge", pk=("id",))
        assert [sql for sql in every.disposition_sql(job.table, "staged", "filename", job.load_id)
                if sql.startswith("SET threads")] == ["SET threads = 3"]
    finally:
        every.close()


# --- floe check on PostgreSQL ---------------------------------------------------------------------
def test_postgres_check_says_exactly_what_is_wrong(postgres_server, postgres_db, tmp_path):
    import psycopg

    def check(**changes: Any) -> list[str]:
        dest = make_destination({**postgres_db.config(), **changes}, tmp_path)
        try:
            return dest.check()
        finally:
            dest.close()

    assert "user may create schemas" in check()[0]
    with pytest.raises(DestinationError, match=r"destinations.warehouse: cannot connect to postgresql://floe@127.0.0.1:\d+/"
                                               r"t_\w+: authentication failed for user 'floe'"):
        check(password="not-the-password")
    with pytest.raises(DestinationError, match=r"database 'nope' does not exist"):
        check(database="nope")
    with pytest.raises(DestinationError, match=r"server not reachable"):
        check(port=postgres_server.port + 1 if postgres_server.port < 65535 else 1)
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE reader LOGIN PASSWORD 'reader-pass'")
        conn.execute(f'REVOKE CREATE ON DATABASE "{postgres_db.database}" FROM PUBLIC')
    try:
        with pytest.raises(DestinationError, match=r"permission denied: user 'reader' may not create schemas"):
            check(user="reader", password="reader-pass")
    finally:
        with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{postgres_db.database}" WITH (FORCE)')
            conn.execute("DROP ROLE reader")


def test_postgres_binary_and_csv_copy_load_identical_values(postgres_db, tmp_path):
    """Binary COPY (exact type matches) and CSV COPY (the fallback) must agree value for value."""
    ts = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    table = pa.Table.from_arrays([
        pa.array([1, None, -(2**62)], pa.int64()), pa.array([7, -8, None], pa.int32()),
        pa.array([1.5, None, float("inf")], pa.float64()), pa.array([True, False, None]),
        pa.array(["plain", None, "nul\x00inside, \"quoted\"\nline"]), pa.array(['{"a": [1]}', "[]", None]),
        pa.array([ts, None, datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC)], pa.timestamp("us", "UTC")),
        pa.array([datetime(2000, 1, 1), None, datetime(1970, 1, 1, 0, 0, 1)], pa.timestamp("ms")),
        pa.array([date(1999, 1, 1), date(2024, 2, 29), None]), pa.array([b"\x00\xff", None, b""]),
    ], schema=pa.schema([
        ("big", pa.int64()), ("small", pa.int32()), ("ratio", pa.float64()), ("flag", pa.bool_()),
        ("text", pa.string()), json_field("doc"), ("at", pa.timestamp("us", "UTC")), ("local", pa.timestamp("ms")),
        ("day", pa.date32()), ("raw", pa.binary()),
    ]))
    loaded = []
    for binary in (True, False):
        dest = make_destination(postgres_db.config(), tmp_path)
        dest.binary_copy = binary  # type: ignore[misc]
        try:
            Loader(dest, tmp_path)(table, disposition="replace")
            loaded.append(dest.query(
                'SELECT big, small, ratio, flag, text, doc, "at", "local", day, raw FROM src.items ORDER BY small DESC NULLS LAST'))
        finally:
            dest.close()
    assert loaded[0] == loaded[1]
    assert loaded[0][0] == (1, 7, 1.5, True, "plain", {"a": [1]}, ts, datetime(2000, 1, 1), date(1999, 1, 1), b"\x00\xff")
    assert loaded[0][2][4] == 'nulinside, "quoted"\nline' and loaded[0][2][2] == float("inf")


def test_postgres_a_value_too_large_for_an_existing_column_widens_it(postgres_db, tmp_path):
    dest = make_destination(postgres_db.config(), tmp_path)
    try:
        load = Loader(dest, tmp_path)
        load(pa.table({"n": pa.array([1], pa.int32())}))  # creates n INTEGER
        load(pa.table({"n": pa.array([3_000_000_000], pa.int64())}))
        assert dest.query("SELECT n FROM src.items ORDER BY n") == [(1,), (3_000_000_000,)]
        assert dest.query("SELECT data_type FROM information_schema.columns WHERE table_name = 'items' "
                          "AND column_name = 'n'") == [("bigint",)]
    finally:
        dest.close()


@pytest.mark.parametrize(("pk", "parent", "analyzed"), [
    (("id",), (), '("id")'),
    (("parent", "id"), ("parent",), '("parent", "id")'),
])
def test_a_postgres_merge_analyzes_only_the_columns_its_delete_joins_on(
    pk: tuple[str, ...], parent: tuple[str, ...], analyzed: str
) -> None:
    from floe.destinations.merge import disposition_sql
    from floe.destinations.postgres import MERGE_STYLE

    columns = pa.schema([("parent", pa.int64()), ("id", pa.int64()), ("doc", pa.string())])
    spec = TableSpec("src", "items", columns, pk, "merge", parent_key=parent)
    statements = disposition_sql(MERGE_STYLE, spec, '"src"."items"', "staging", columns=[], order="_floe_seq",
                                 load_id="'l'", now="now()", quote=lambda n: f'"{n}"')
    assert [s for s in statements if s.startswith("ANALYZE")] == [f"ANALYZE staging {analyzed}"]
