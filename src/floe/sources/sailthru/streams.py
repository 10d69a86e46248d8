"""The message tables (pyarrow's JSON reader and a vectorised explode, see `messages`), the blast
table and the exports table (one row per file read: the data's freshness)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import ClassVar

import pyarrow as pa

from floe.core.stream import MONEY
from floe.sources.sailthru.files import ExportFile, StoredObject, count_records
from floe.sources.sailthru.messages import TS, MessageReader, message_schema
from floe.sources.sailthru.rows import SailthruStream, read_records, schema_of, typed_batch, unread


class MessageStream(SailthruStream):
    """One row per open or click (action_name/action_ts/action_url), or one row with null
    action fields for a message without any. A re-sent message (an `_update` file holds its
    activity so far) replaces its rows as a set: its NULL-action row goes once actions arrive."""

    parent_markers = False  # the NULL-action row of a message without actions is a real row

    base_fields: ClassVar[list[pa.Field]]  # as read from JSON (send_time naive, localised later)
    scrubs_itself = True  # before exploding: fewer rows to scan

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        config = self.source.config
        reader = MessageReader(self.base_fields, self.schema, self.zone, self.source.pii, config.block_bytes)
        return reader.batches(f)


class MessageBlastStream(MessageStream):
    name = "message_blast"
    table = "message_blast"
    base_fields: ClassVar[list[pa.Field]] = [
        pa.field("profile_id", pa.string()), pa.field("send_time", pa.timestamp("ms")),
        pa.field("blast_id", pa.int64()), pa.field("message_id", pa.int64()), pa.field("device", pa.string()),
        pa.field("message_revenue", MONEY), pa.field("delivery_status", pa.string()),
        pa.field("id", pa.string()),  # absent from the reference sample; Sailthru's own id when present
    ]
    primary_key = ("profile_id", "blast_id", "action_name", "action_ts", "action_url")
    parent_key = ("profile_id", "blast_id")
    schema = message_schema(base_fields)


class MessageTransactionalStream(MessageStream):
    name = "message_transactional"
    table = "message_transactional"
    base_fields: ClassVar[list[pa.Field]] = [
        pa.field("id", pa.string()), pa.field("profile_id", pa.string()), pa.field("template", pa.string()),
        pa.field("send_time", pa.timestamp("ms")), pa.field("device", pa.string()),
        pa.field("message_revenue", MONEY), pa.field("delivery_status", pa.string()),
    ]
    primary_key = ("id", "action_name", "action_ts", "action_url")
    parent_key = ("id",)
    schema = message_schema(base_fields)


class BlastStream(SailthruStream):
    name = "blast"
    table = "blast"
    primary_key = ("id",)
    kinds: ClassVar[dict[str, str]] = {"id": "int", "name": "str", "day": "date", "extra": "json"}
    schema = schema_of(kinds)

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        read = ("id", "name", "day")
        for lines, records in read_records(f, 10_000):
            data = {name: [r.get(name) for r in records] for name in read}
            yield typed_batch({**data, "extra": unread(records, read)}, self.kinds, self.zone, f.name, lines)


class ExportsStream(SailthruStream):
    """One row per file floe has read: its name, collection, export date (from the name), records
    (non-blank lines), its SHA-256 (a file on disk) or ETag (an object in S3 or GCS), and when it was ingested. Dashboards show `MAX(export_date)` as the data's freshness."""

    name = "exports"
    table = ""
    primary_key = ("name",)
    run_columns = ("ingested_at",)
    schema = pa.schema([
        ("name", pa.string()), ("collection", pa.string()), ("client_id", pa.string()),
        ("export_date", pa.date32()), ("rows", pa.int64()), ("bytes", pa.int64()),
        ("sha256", pa.string()), ("ingested_at", TS), ("etag", pa.string()),
    ])

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        with f.arrow_stream() as stream:
            records, size = count_records(stream)
        yield pa.RecordBatch.from_pylist([{
            "name": f.name, "collection": f.info.collection, "client_id": f.info.client_id,
            "export_date": f.info.export_date, "rows": records, "bytes": size,
            "sha256": None if f.remote else self.source.checksum(f), "ingested_at": datetime.now(UTC),
            "etag": f.location.info.etag if isinstance(f.location, StoredObject) else None,
        }], schema=self.schema)
