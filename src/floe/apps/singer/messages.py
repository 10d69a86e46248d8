"""Singer messages: building them (tap side) and reading them (target side).

One JSON object per line. The tap writes RECORDs straight from Arrow batches: a fixed byte
prefix per stream and batch, then one orjson call per row. Timestamps become RFC 3339 with a
`Z` (naive timestamps are taken as UTC), JSON document columns are copied verbatim
(`orjson.Fragment`), decimals keep their digits, binary values become base64.
"""

from __future__ import annotations

import base64
import decimal
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

import orjson
import pyarrow as pa

from floe.core.destination import is_json

SCHEMA, RECORD, STATE, ACTIVATE_VERSION, BATCH = "SCHEMA", "RECORD", "STATE", "ACTIVATE_VERSION", "BATCH"
DUMP_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return orjson.Fragment(str(value)) if value.is_finite() else None
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def dumps(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message, default=_default, option=DUMP_OPTIONS) + b"\n"


def rfc3339(moment: datetime) -> str:
    """`2026-11-24T03:12:48.123456Z` (UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def schema_message(stream: str, schema: dict[str, Any], key_properties: list[str],
                   bookmark_properties: list[str] | None = None) -> bytes:
    message: dict[str, Any] = {"type": SCHEMA, "stream": stream, "schema": schema, "key_properties": key_properties}
    if bookmark_properties:
        message["bookmark_properties"] = bookmark_properties
    return dumps(message)


def state_message(value: Any) -> bytes:
    return dumps({"type": STATE, "value": value})


def activate_version_message(stream: str, version: int) -> bytes:
    return dumps({"type": ACTIVATE_VERSION, "stream": stream, "version": version})


def record_lines(stream: str, batch: pa.RecordBatch, time_extracted: datetime,
                 version: int | None = None) -> Iterator[bytes]:
    """One RECORD line per row of `batch`."""
    head: dict[str, Any] = {"type": RECORD, "stream": stream, "time_extracted": rfc3339(time_extracted)}
    if version is not None:
        head["version"] = version
    prefix = orjson.dumps(head)[:-1] + b',"record":'
    json_columns = [f.name for f in batch.schema if is_json(f)]
    rows = batch.to_pylist()
    dump = orjson.dumps
    if json_columns:
        for row in rows:
            for name in json_columns:
                value = row[name]
                if value is not None:
                    row[name] = orjson.Fragment(value)
    for row in rows:
        yield prefix + dump(row, default=_default, option=DUMP_OPTIONS) + b"}\n"


def write_records(out: IO[bytes], stream: str, batch: pa.RecordBatch, time_extracted: datetime,
                  version: int | None = None) -> None:
    out.write(b"".join(record_lines(stream, batch, time_extracted, version)))


def message_type(message: Any) -> str | None:
    """The upper-cased `type` of a parsed message (Singer types are case-insensitive)."""
    if not isinstance(message, dict):
        return None
    kind = message.get("type")
    return kind.upper() if isinstance(kind, str) else None
