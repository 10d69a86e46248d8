"""`naming: snake_case` (docs/types.md): a source's columns in snake_case, the same rows otherwise;
two columns that become one name are an error naming both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import floe
from floe.core.errors import ConfigError, SourceError
from floe.core.settings import SourceConfig
from floe.core.stream import Batch, State, Stream
from floe.engine.naming import SnakeCaseStream, snake_case
from floe.engine.runner import select_streams
from floe.sandbox.fullstory import DEFAULT_API_KEY
from tests.fixtures.core import OneStreamSource
from tests.test_destinations import make_destination

WINDOWS = {"start_time": "2024-01-01T00:00:00Z", "end_time": "2024-01-01T02:00:00Z"}


@pytest.mark.parametrize(("name", "snake"), [
    ("EventStart", "event_start"), ("CustomVars", "custom_vars"), ("IndvId", "indv_id"), ("PageURL", "page_url"),
    ("EventTargetSelectorTok", "event_target_selector_tok"), ("evt_price_real", "evt_price_real"),
    ("user.Name", "user_name"), ("MobileAppName2", "mobile_app_name2"), ("ab2Cd", "ab2_cd"),
])
def test_snake_case(name: str, snake: str) -> None:
    assert snake_case(name) == snake


def fullstory(server: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "fullstory", "api_key": DEFAULT_API_KEY, "base_url": server.url, "poll_interval": 0.05,
            **WINDOWS, **extra}


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_fullstory_columns_in_snake_case_hold_the_same_rows(fullstory_server: Any, tmp_path: Path, kind: str,
                                                             request: pytest.FixtureRequest) -> None:
    warehouse = ({"type": "duckdb", "path": str(tmp_path / "w.duckdb")} if kind == "duckdb"
                 else request.getfixturevalue("postgres_db").config())
    result = floe.run({"sources": {"fs": fullstory(fullstory_server), "fs_snake": fullstory(
        fullstory_server, naming="snake_case")}, "destinations": {"w": warehouse}, "stage": str(tmp_path / "stage")})
    assert result.ok and result.stream("fs.events").rows == result.stream("fs_snake.events").rows > 0
    dest = make_destination(warehouse, tmp_path)
    try:
        with dest.transaction() as cur:
            before, after = (list(dest.existing_columns(cur, schema, "events")) for schema in ("fs", "fs_snake"))
        user = [c for c in before if not c.startswith("_floe_")]
        assert "EventStart" in user and "CustomVars" in user
        assert [c for c in after if not c.startswith("_floe_")] == [snake_case(c) for c in user]
        # Unquoted names work in PostgreSQL (it folds them to lower case), as in every warehouse.
        snake = dest.query("SELECT indv_id, event_start, event_type, custom_vars FROM fs_snake.events "
                           "ORDER BY event_start, indv_id")
        as_is = dest.query('SELECT "IndvId", "EventStart", "EventType", "CustomVars" FROM fs.events '
                           'ORDER BY "EventStart", "IndvId"')
        assert snake == as_is
    finally:
        dest.close()


class Clashing(Stream):
    """Columns `UserId` and (in the declared schema, or only in a later batch) `user_id`."""

    name = "users"
    primary_key = ("UserId",)

    def __init__(self, declared: bool) -> None:
        self.schema = pa.schema([("UserId", pa.int64())] + ([("user_id", pa.int64())] if declared else []))

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        yield Batch(pa.record_batch({"UserId": [1]}), {"n": 1})
        yield Batch(pa.record_batch({"UserId": [2], "user_id": [3]}), {"n": 2})


def snake_source(stream: Stream) -> OneStreamSource:
    source = OneStreamSource(stream)
    source.config = SourceConfig(type="test", naming="snake_case")
    return source


def test_declared_columns_that_become_one_name_fail_before_anything_loads() -> None:
    with pytest.raises(ConfigError, match=r"sources\.src\.naming \(src\.users\): columns 'UserId' and 'user_id' "
                                          r"both become 'user_id'"):
        select_streams(snake_source(Clashing(declared=True)), None)


def test_a_later_column_that_takes_a_name_already_used_fails_the_load_naming_both() -> None:
    (stream,) = select_streams(snake_source(Clashing(declared=False)), None)
    assert isinstance(stream, SnakeCaseStream) and stream.primary_key == ("user_id",)

    async def read_all() -> list[Batch]:
        return [batch async for batch in stream.read(None)]

    with pytest.raises(SourceError, match="columns 'UserId' and 'user_id' both become 'user_id'"):
        asyncio.run(read_all())


def test_as_is_keeps_the_stream_itself() -> None:
    stream = Clashing(declared=True)
    source = snake_source(stream)
    source.config.naming = "as_is"
    assert select_streams(source, None) == [stream]
