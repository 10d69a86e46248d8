"""`bad_rows: quarantine`: rows a destination cannot store go to `_floe_rejected`, the others load.

The rows are left out in the load's own transaction (the table, `_floe_rejected`, the state and the
load row commit together); `bad_rows: fail`, the default, fails the load and commits nothing, as does
a commit with more rejected rows than `bad_rows_max`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from floe.config import parse_config
from floe.core.destination import json_field
from floe.core.plugins import source_registry
from floe.core.settings import SourceConfig
from floe.core.stream import Batch, Source, State, Stream
from floe.engine import runner
from floe.engine.pipeline import run_stream
from tests.fixtures.destinations import Place, place_of

DOCS = ['{"a": 1}', "[1, 2]", '"text"', "{not json", None, '{"b": {"c": null}}', "3.5", r'{"nul": "a\u0000b"}']
NOT_JSON, NUL_ESCAPE = 3, 7


class DocsStream(Stream):
    """Rows (id, doc JSON, note text): doc 3 is not JSON, doc 7 holds the \\u0000 escape; `long` makes
    note 5 70,000 bytes long."""

    name = "docs"
    schema = pa.schema([pa.field("id", pa.int64()), json_field("doc"), pa.field("note", pa.string())])

    def __init__(self, long: bool = False, docs: list[str | None] = DOCS, **policy: Any) -> None:
        self.long, self.docs = long, docs
        for key, value in policy.items():
            setattr(self, key, value)

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        notes = ["x" * 70_000 if self.long and i == 5 else f"note {i}" for i in range(len(self.docs))]
        yield Batch(pa.record_batch([pa.array(range(len(self.docs)), pa.int64()), pa.array(self.docs, pa.string()),
                                     pa.array(notes, pa.string())], schema=self.schema), checkpoint={"done": 1})


class DocsConfig(SourceConfig):
    type: str = "docs"
    long: bool = False


class DocsSource(Source):
    Config = DocsConfig

    def __init__(self, name: str, config: Any = None, context: Any = None, stream: Stream | None = None) -> None:
        super().__init__(name, config, context)
        self.stream = stream

    def streams(self) -> list[Stream]:
        return [self.stream or DocsStream(self.config.long)]


def load(place: Place, stream: DocsStream, tmp_path: Path) -> Any:
    destination = place.open()
    try:
        return asyncio.run(run_stream(DocsSource("src", stream=stream), stream, destination, tmp_path / "stage"))
    finally:
        destination.close()


def meta(place: Place, table: str) -> str:
    return f"raw.{table}" if place.kind == "bigquery" else table


def rejected(place: Place) -> list[tuple[Any, ...]]:
    return place._sql(f"SELECT source, stream, load_id, reason, record FROM {meta(place, '_floe_rejected')} "
                      "ORDER BY record")


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "bigquery"])
def test_rows_the_warehouse_cannot_store_are_quarantined_and_the_others_load(kind, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    result = load(place, DocsStream(bad_rows="quarantine"), tmp_path)
    assert result.ok, result.error
    bad = {NOT_JSON, NUL_ESCAPE} if kind == "postgres" else {NOT_JSON}  # jsonb cannot hold \u0000
    assert place.column("src", "docs", "id") == [i for i in range(len(DOCS)) if i not in bad]
    assert result.rows == len(DOCS) - len(bad) and result.details["rejected_rows"] == len(bad)
    rows = rejected(place)
    [load_id] = {r[2] for r in rows}
    assert {r[0:2] for r in rows} == {("src", "docs")}
    assert {json.loads(r[4])["id"]: r[3] for r in rows} == {
        NOT_JSON: "column 'doc': not a JSON document",
        **({NUL_ESCAPE: "column 'doc': JSON holding \\u0000, which PostgreSQL's jsonb refuses"} if kind == "postgres"
           else {})}
    assert json.loads(rows[0][4]) == {"id": NOT_JSON, "doc": "{not json", "note": "note 3"}
    [(committed,)] = place._sql(f"SELECT details FROM {meta(place, '_floe_loads')} WHERE load_id = '{load_id}' "
                                "AND status = 'committed'")
    assert json.loads(committed)["rejected_rows"] == len(bad)  # the same commit as the rows and the state
    assert place.state("src", "docs") == {"done": 1}


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_without_quarantine_or_over_bad_rows_max_the_load_fails_and_commits_nothing(kind, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    failed = load(place, DocsStream(), tmp_path)  # bad_rows: fail, the default
    assert not failed.ok and "nothing committed" in failed.error
    over = load(place, DocsStream(bad_rows="quarantine", bad_rows_max=0), tmp_path)
    assert over.error == ("w: src.docs: 1 rows cannot be loaded, over bad_rows_max 0; nothing committed. The first: "
                          "column 'doc': not a JSON document") if kind == "duckdb" else over.error.startswith(
        "w: src.docs: 2 rows cannot be loaded, over bad_rows_max 0; nothing committed.")
    assert place.column("src", "docs", "id") == [] and place.state("src", "docs") is None


def test_text_over_redshifts_varchar_limit_is_quarantined(request, tmp_path):
    place = place_of("redshift", request, tmp_path)
    result = load(place, DocsStream(long=True, docs=DOCS[:NUL_ESCAPE], bad_rows="quarantine"), tmp_path)
    assert result.ok, result.error
    rows = rejected(place)
    assert sorted(r[3] for r in rows) == ["column 'doc': not a JSON document",
                                          "column 'note': text over the 65,535-byte limit"]
    assert place.column("src", "docs", "id") == [0, 1, 2, 4, 6]
    assert all(len(r[4].encode()) <= 65_535 for r in rows)  # a rejected row's JSON fits the warehouse too


def test_bad_rows_is_set_per_source_and_stream_in_floe_yml(monkeypatch, tmp_path):
    monkeypatch.setitem(source_registry._entries, "docs", f"{__name__}:DocsSource")
    place = place_of("duckdb", request=None, base=tmp_path)  # type: ignore[arg-type]
    config = parse_config({"sources": {"src": {"type": "docs", "bad_rows": {"docs": "quarantine", "*": "fail"}}},
                           "destinations": {"w": place.settings}, "stage": str(tmp_path / "stage")},
                          tmp_path / "floe.yml")
    [result] = runner.run(config)
    assert result.ok and result.details == {"rejected_rows": 1}
    assert [json.loads(r[4])["id"] for r in rejected(place)] == [NOT_JSON]
