"""The contract every source keeps (as singer-sdk's standard tap tests hold taps to theirs), held
against each source reading its emulator over real HTTP (Sailthru: a generated export folder; SQL: a
PostgreSQL database the suite starts).

Each stream declares its schema, and its batches keep to it; a read ends with a checkpoint and every
state survives JSON (it is stored as JSON); a read resumed from ANY state it emitted, on top of what
was committed up to that state, leaves what one whole read leaves, no row lost or twice; and an error
names its place. A source joins the suite with one adapter function and one line in SOURCES.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from floe.config import validate_model
from floe.core.plugins import source_registry as registry
from floe.core.stream import Batch, Context, Source, State, Stream, merge_ledger
from floe.sandbox import fullstory, singular, twilio
from floe.sandbox.sailthru import ExportSpec, generate
from floe.sandbox.server import serve_in_thread
from tests.fixtures.redshift_unload import UnloadOnPostgres

Row = dict[str, Any]


@dataclass
class Subject:
    """A source to read: its settings, settings that make it fail, and the place that failure names."""

    settings: dict[str, Any]
    broken: dict[str, Any]
    place: str  # a regex the broken source's error must match
    volatile: frozenset[str] = field(default_factory=frozenset)  # columns that differ from read to read


def twilio_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    app = twilio.create_app(size=60, days=4, end=end.isoformat())
    with serve_in_thread(app) as server:
        sid, token = app.state.twilio.credentials()[0]
        start = datetime.fromtimestamp(app.state.twilio.start, UTC).date().isoformat()
        settings = {"type": "twilio", "account_sid": sid, "auth_token": token, "start_date": start,
                    "base_url": server.url, "window_days": 2}
        yield Subject(settings, {**settings, "auth_token": "wrong-token"}, r"HTTP 401.*/Accounts/AC",
                      frozenset({"when_retrieved"}))


def singular_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    today = datetime.now(UTC).date().isoformat()
    with serve_in_thread(singular.create_app(rows_per_day=3, today=today)) as server:
        settings = {"type": "singular", "api_key": "sandbox-singular-api-key", "base_url": f"{server.url}/api",
                    "lookback_days": 2, "end_date": today, "poll_interval": 0.01}
        yield Subject(settings, {**settings, "api_key": "wrong-key"}, r"HTTP 401")


def fullstory_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    with serve_in_thread(fullstory.create_app(events_per_hour=20)) as server:
        settings = {"type": "fullstory", "api_key": fullstory.DEFAULT_API_KEY, "base_url": server.url,
                    "start_time": "2024-01-01T00:00:00Z", "end_time": "2024-01-01T03:00:00Z",
                    "export_duration": "1h", "poll_interval": 0.01}
        yield Subject(settings, {**settings, "api_key": "wrong-key"}, r"HTTP 401")


def sailthru_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    generate(tmp_path / "export", ExportSpec(profiles=20, days=3))
    broken = tmp_path / "broken"
    generate(broken, ExportSpec(profiles=5, days=1))
    blast = next(broken.glob("blast.*.json"))
    blast.write_text(blast.read_text() + "{not json\n")
    settings = {"type": "sailthru", "path": str(tmp_path / "export"), "pii": "hash", "salt": "pepper-for-tests-7731"}
    yield Subject(settings, {**settings, "path": str(broken)}, rf"{blast.name}.*line \d+", frozenset({"ingested_at"}))


def sql_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    db = request.getfixturevalue("postgres_db")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.items (id int PRIMARY KEY, updated_at timestamptz, v text);"
                     "CREATE TABLE app.plain (n int, v text)")
        t0 = datetime(2026, 3, 1, tzinfo=UTC)
        for i in range(7):  # ids 5 and 6 share an updated_at: a bookmark between them is read again
            conn.execute("INSERT INTO app.items VALUES (%s, %s, %s)", (i, t0 + timedelta(minutes=min(i, 5)), f"v{i}"))
        conn.execute("INSERT INTO app.plain SELECT g, 'p' || g FROM generate_series(1, 3) g")
    settings = {"type": "sql", "url": db.url, "schema": "app", "batch_rows": 2,
                "tables": [{"name": "items", "replication_key": "updated_at"}, "plain"]}
    yield Subject(settings, {**settings, "tables": ["missing"]}, r"tables\[0\]: no table .missing. in schema .app.")


def sql_unload_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    """The SQL subject's tables as Redshift read with UNLOAD (replayed: tests/fixtures/redshift_unload.py)."""
    sql = next(sql_subject(request, tmp_path))
    settings = {**sql.settings, "type": "sql+unload-replay", "url": sql.settings["url"].replace("postgresql", "redshift"),
                "unload": request.getfixturevalue("unload_settings")}
    yield Subject(settings, {**settings, "tables": ["missing"]}, sql.place)


SOURCES: list[Callable[[pytest.FixtureRequest, Path], Iterator[Subject]]] = [
    twilio_subject, singular_subject, fullstory_subject, sailthru_subject, sql_subject, sql_unload_subject,
]
REPLAYS: dict[str, type[Source]] = {"sql+unload-replay": UnloadOnPostgres}  # a type the registry does not name


@pytest.fixture(params=SOURCES, ids=lambda f: f.__name__.removesuffix("_subject"))
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    yield from request.param(request, tmp_path)


def open_source(settings: dict[str, Any], base: Path) -> Source:
    cls = REPLAYS.get(settings["type"]) or registry.load(settings["type"])
    if settings["type"] in REPLAYS:
        settings = {**settings, "type": cls.Config.model_fields["type"].default}
    return cls("src", validate_model(cls.Config, settings, "sources.src"), Context(base))


@dataclass
class Read:
    """One read of a stream: the rows between consecutive checkpoints (one commit each), the checkpoints."""

    segments: list[list[Row]]
    checkpoints: list[State]
    batches: list[pa.RecordBatch]
    trailing: int  # rows after the last checkpoint (never committed)


def read(settings: dict[str, Any], base: Path, stream_name: str | None = None,
         state: State | None = None) -> dict[str, Read]:
    """Read every stream (or one) of a fresh source from `state` to its end."""
    async def go() -> dict[str, Read]:
        source = open_source(settings, base)
        out: dict[str, Read] = {}
        try:
            for stream in source.streams():
                if stream_name in (None, stream.name):
                    out[stream.name] = await read_stream(stream, state)
        finally:
            await source.aclose()
        return out

    return asyncio.run(go())


async def read_stream(stream: Stream, state: State | None) -> Read:
    segments, checkpoints, batches, current = [], [], [], []
    async for batch in stream.read(state):
        assert isinstance(batch, Batch)
        if batch.records is not None:
            batches.append(batch.records)
            current += batch.records.to_pylist()
        if batch.checkpoint is not None:
            segments.append(current)
            checkpoints.append(batch.checkpoint)
            current = []
    return Read(segments, checkpoints, batches, len(current))


def streams_of(settings: dict[str, Any], base: Path) -> dict[str, Stream]:
    return {s.name: s for s in open_source(settings, base).streams()}


def test_streams_declare_their_schema_and_every_read_ends_with_a_json_checkpoint(subject, tmp_path):
    streams = streams_of(subject.settings, tmp_path)
    reads = read(subject.settings, tmp_path)
    assert streams and set(reads) == set(streams)
    for name, stream in streams.items():
        declared = stream.schema
        assert declared.names and len(set(declared.names)) == len(declared.names), name
        for column in (*stream.primary_key, *stream.parent_key, *filter(None, [stream.cursor_field])):
            assert column in declared.names, f"{name}: {column} is not declared"
        assert set(stream.parent_key) <= set(stream.primary_key), name
        assert stream.disposition != "merge" or stream.primary_key, f"{name}: a merge needs a primary key"
        got = reads[name]
        assert got.batches, f"{name}: no rows read"
        for batch in got.batches:  # a batch may lack declared columns or bring new ones, never retype one
            for f in batch.schema:
                if f.name in declared.names:
                    assert f.type == declared.field(f.name).type, f"{name}.{f.name}: {f.type}, declared {declared.field(f.name).type}"
            assert set(stream.primary_key) <= set(batch.schema.names), f"{name}: a batch without its key"
        assert got.checkpoints and got.trailing == 0, f"{name}: rows after the last checkpoint would never commit"
        for state in got.checkpoints:
            assert json.loads(json.dumps(state)) == state, f"{name}: a state that does not survive JSON: {state}"


def committed(stream: Stream, segments: list[list[Row]], volatile: frozenset[str]) -> list[str]:
    """What a destination holds after committing `segments` one by one, as sorted row texts."""
    key = lambda row, cols: tuple(row.get(c) for c in cols)  # noqa: E731
    table: list[Row] = []
    for rows in segments:
        if stream.disposition == "append":
            table += rows
        elif stream.disposition == "replace":
            table = list(rows)
        else:
            last = {key(r, stream.primary_key): r for r in rows}  # within a commit, the later row of a key wins
            replaced = {key(r, stream.parent_key) for r in rows} if stream.parent_key else set(last)
            of = stream.parent_key or stream.primary_key
            table = [r for r in table if key(r, of) not in replaced] + list(last.values())
            if stream.parent_key and stream.parent_markers:
                markers = [c for c in stream.primary_key if c not in stream.parent_key]
                table = [r for r in table if any(r.get(c) is not None for c in markers)]
    return sorted(json.dumps({k: v for k, v in r.items() if k not in volatile}, sort_keys=True, default=str)
                  for r in table)


def test_a_read_resumed_from_any_emitted_state_loses_nothing_and_repeats_nothing(subject, tmp_path):
    streams = streams_of(subject.settings, tmp_path)
    whole = read(subject.settings, tmp_path)
    for name, stream in streams.items():
        once = committed(stream, whole[name].segments, subject.volatile)
        if stream.disposition == "append":
            assert len(set(once)) == len(once), f"{name}: one read holds a row twice"
        checkpoints = whole[name].checkpoints
        picks = sorted({0, len(checkpoints) // 2, len(checkpoints) - 1})  # first, middle, last
        for k in picks:
            # as the destination gives it back: the checkpoint, with the ledger entries of every one so far
            state = json.loads(json.dumps(functools.reduce(merge_ledger, checkpoints[: k + 1])))
            resumed = read(subject.settings, tmp_path, name, state)[name]
            if k < len(checkpoints) - 1 or stream.disposition != "append":
                after = committed(stream, whole[name].segments[: k + 1] + resumed.segments, subject.volatile)
                assert after == once, (f"{name}: resumed from {state}, the rows differ from one whole read: "
                                       f"{sorted(set(after) ^ set(once))[:2]}")
            else:  # after the last state an append stream may read new rows (a new snapshot), never old ones
                again = set(committed(stream, resumed.segments, subject.volatile)) & set(once)
                assert not again, f"{name}: resumed from its last state, it read rows again: {sorted(again)[:2]}"


def test_an_error_names_its_place(subject, tmp_path):
    with pytest.raises(Exception, match=subject.place) as failed:  # noqa: PT011 - any error, if it names the place
        read(subject.broken, tmp_path)
    assert "wrong-token" not in str(failed.value) and "wrong-key" not in str(failed.value)  # secrets stay out
