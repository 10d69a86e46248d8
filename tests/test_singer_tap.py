"""floe as a Singer tap, through the Source/Stream contracts every floe source implements."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pytest

from floe.apps.singer.catalog import build_catalog, read_selection
from floe.apps.singer.schema import json_schema_to_arrow
from floe.apps.singer.tap import MetricWriter, SingerTap, read_state
from floe.core.destination import json_field
from floe.core.errors import ConfigError
from floe.core.settings import SourceConfig
from floe.core.stream import Batch, Source, State, Stream
from tests.singer_check import check_tap_output

EVENTS = pa.schema([
    pa.field("id", pa.int64(), nullable=False), pa.field("at", pa.timestamp("us", "UTC")),
    pa.field("local", pa.timestamp("ms")), pa.field("day", pa.date32()), pa.field("amount", pa.decimal128(12, 2)),
    pa.field("tags", pa.list_(pa.string())), json_field("payload"), pa.field("blob", pa.binary()),
    pa.field("note", pa.string()),
])


class Events(Stream):
    """Six events in pages of two; the state is the last id done (a merge stream with a cursor)."""

    name = "events"
    schema = EVENTS
    primary_key = ("id",)
    cursor_field = "id"
    disposition = "merge"

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        after = (state or {}).get("after", 0)
        for start in range(after + 1, 7, 2):
            ids = [i for i in (start, start + 1) if i <= 6]
            moment = datetime(2026, 1, 1, tzinfo=UTC)
            rows = {
                "id": ids, "at": [moment + timedelta(hours=i) for i in ids],
                "local": [datetime(2026, 1, 1, 12, 30) for _ in ids], "day": [date(2026, 2, i) for i in ids],
                "amount": [Decimal("10.25") * i for i in ids], "tags": [["a", str(i)] for i in ids],
                "payload": [orjson.dumps({"k": i, "nested": [1, {"x": None}]}).decode() for i in ids],
                "blob": [b"\x00\x01" for _ in ids], "note": [None if i % 2 else "even" for i in ids],
            }
            yield Batch(pa.RecordBatch.from_pydict(rows, schema=EVENTS))
            yield Batch(checkpoint={"after": ids[-1]})


class Snapshot(Stream):
    """A full-table (replace) stream whose batches bring a column the declared schema lacks."""

    name = "snapshot"
    schema = pa.schema([pa.field("code", pa.string()), pa.field("count", pa.int32())])
    primary_key = ("code",)
    disposition = "replace"

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        yield Batch(pa.RecordBatch.from_pydict({"code": ["a", "b"], "count": [1, 2]}, schema=self.schema))
        yield Batch(checkpoint={"page": 1})
        extra = pa.schema([*self.schema, pa.field("seen", pa.timestamp("us", timezone(timedelta(hours=2))))])
        yield Batch(pa.RecordBatch.from_pydict(
            {"code": ["c"], "count": [3], "seen": [datetime(2026, 3, 1, 9, tzinfo=timezone(timedelta(hours=2)))]},
            schema=extra))
        yield Batch(checkpoint={"done": True})


class Toy(Source):
    Config = SourceConfig

    def streams(self) -> list[Stream]:
        return [Events(), Snapshot()]


def run_tap(state: dict[str, Any] | None = None, catalog: Any = None) -> tuple[bytes, str]:
    source = Toy("toy", SourceConfig(type="toy"))
    out, err = io.BytesIO(), io.StringIO()
    streams = source.streams()
    selection = read_selection(catalog, streams) if catalog is not None else None
    asyncio.run(SingerTap(source, out, MetricWriter(err)).run(streams, state or {}, selection))
    return out.getvalue(), err.getvalue()


def test_every_record_matches_its_schema_and_schema_comes_first() -> None:
    stdout, _ = run_tap()
    out = check_tap_output(stdout)
    assert [m["record"]["id"] for m in out.records["events"]] == [1, 2, 3, 4, 5, 6]
    first = out.records["events"][0]["record"]
    assert first["at"] == "2026-01-01T01:00:00Z"
    assert first["local"] == "2026-01-01T12:30:00Z"  # naive timestamps are UTC
    assert first["day"] == "2026-02-01"
    assert first["amount"] == 10.25 and b'"amount":10.25' in stdout  # decimals keep their digits
    assert first["payload"] == {"k": 1, "nested": [1, {"x": None}]}  # JSON documents stay documents
    assert first["blob"] == "AAE=" and first["tags"] == ["a", "1"]
    schema = out.schemas["events"]
    assert schema["key_properties"] == ["id"] and schema["bookmark_properties"] == ["id"]
    assert schema["schema"]["properties"]["at"] == {"type": ["string", "null"], "format": "date-time"}
    assert schema["schema"]["properties"]["id"] == {"type": "integer"}


def test_state_follows_the_records_it_covers() -> None:
    stdout, _ = run_tap()
    seen: list[int] = []
    for message in check_tap_output(stdout).messages:
        if message["type"] == "RECORD" and message["stream"] == "events":
            seen.append(message["record"]["id"])
        if message["type"] == "STATE" and "events" in message["value"]["bookmarks"]:
            assert message["value"]["bookmarks"]["events"]["after"] == max(seen)


def test_full_table_stream_is_versioned_and_activated_before_its_state() -> None:
    stdout, _ = run_tap()
    out = check_tap_output(stdout)
    snapshot = [m for m in out.messages if m.get("stream") == "snapshot" or m["type"] == "STATE"]
    versions = {m["version"] for m in out.records["snapshot"]}
    assert len(versions) == 1 and out.activations["snapshot"] == list(versions)
    kinds = [m["type"] for m in snapshot if m["type"] != "STATE" or "snapshot" in m["value"]["bookmarks"]]
    assert kinds == ["SCHEMA", "RECORD", "RECORD", "SCHEMA", "RECORD", "ACTIVATE_VERSION", "STATE"]
    assert out.last_state["bookmarks"]["snapshot"] == {"done": True}
    # the new column came with a new SCHEMA; its zoned timestamp is valid RFC 3339
    assert out.records["snapshot"][-1]["record"]["seen"] == "2026-03-01T09:00:00+02:00"


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_resuming_from_any_emitted_state_loses_and_repeats_nothing(cut: int) -> None:
    first = check_tap_output(run_tap()[0])
    event_states = [s for s in first.states if "events" in s["bookmarks"]]
    resumed_from = event_states[cut]
    before = [m["record"]["id"] for m in first.records["events"] if m["record"]["id"] <= resumed_from["bookmarks"]["events"]["after"]]
    second = check_tap_output(run_tap(read_state(resumed_from))[0])
    after = [m["record"]["id"] for m in second.records["events"]]
    assert sorted(before + after) == [1, 2, 3, 4, 5, 6]
    assert second.last_state["bookmarks"]["events"] == {"after": 6}


def test_catalog_selects_streams_and_fields() -> None:
    catalog = build_catalog(Toy("toy", SourceConfig(type="toy")).streams())
    entry = next(s for s in catalog["streams"] if s["stream"] == "events")
    meta = {tuple(m["breadcrumb"]): m["metadata"] for m in entry["metadata"]}
    assert meta[()]["table-key-properties"] == ["id"] and meta[()]["valid-replication-keys"] == ["id"]
    assert meta[()]["forced-replication-method"] == "INCREMENTAL" and meta[()]["selected-by-default"] is True
    assert meta[("properties", "id")]["inclusion"] == "automatic"
    assert meta[("properties", "note")]["inclusion"] == "available"
    snap = next(s for s in catalog["streams"] if s["stream"] == "snapshot")
    assert snap["metadata"][0]["metadata"]["forced-replication-method"] == "FULL_TABLE"
    # select only events, without `note`; `id` stays (automatic) even if deselected
    for s in catalog["streams"]:
        for m in s["metadata"]:
            if m["breadcrumb"] == []:
                m["metadata"]["selected"] = s["stream"] == "events"
            elif m["breadcrumb"][1] in ("note", "id"):
                m["metadata"]["selected"] = False
    out = check_tap_output(run_tap(catalog=catalog)[0])
    assert set(out.records) == {"events"}
    assert "note" not in out.schemas["events"]["schema"]["properties"]
    assert all("note" not in m["record"] and "id" in m["record"] for m in out.records["events"])


def test_catalog_naming_an_unknown_stream_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no stream 'nope'"):
        run_tap(catalog={"streams": [{"tap_stream_id": "nope", "stream": "nope", "schema": {}}]})


def test_metrics_are_singer_metric_lines_on_stderr() -> None:
    _, stderr = run_tap()
    metrics = [orjson.loads(line.removeprefix("INFO METRIC: ")) for line in stderr.splitlines()]
    counts = {m["tags"]["endpoint"]: m["value"] for m in metrics if m["metric"] == "record_count"}
    assert counts == {"events": 6, "snapshot": 3}
    jobs = [m for m in metrics if m["metric"] == "job_duration"]
    assert {m["tags"]["status"] for m in jobs} == {"succeeded"} and all(m["type"] == "timer" for m in jobs)


def test_tap_schema_round_trips_through_the_target_type_mapping() -> None:
    """What floe's tap declares, floe's target reads back as the same kinds of columns."""
    catalog = build_catalog([Events()])
    back = json_schema_to_arrow(catalog["streams"][0]["schema"], "events")
    assert back.field("id").type == pa.int64() and back.field("at").type == pa.timestamp("us", "UTC")
    assert back.field("day").type == pa.date32() and back.field("amount").type == pa.float64()
    assert back.field("payload").metadata and back.field("tags").metadata  # JSON documents
