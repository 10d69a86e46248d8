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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson
import pyarrow as pa

from floe.core.destination import is_json
from floe.core.errors import SourceError

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


# floe's extension of the SCHEMA message (docs/singer.md), under the key "floe": `parent_key` and
# `parent_markers` say the stream is a child table whose rows of a parent are replaced as a set by each
# STATE's records of that parent; `decimals` gives the digits and places of exact-decimal properties
# (`{"price": [18, 6]}`), which JSON Schema's "number" does not. Singer targets ignore keys they do not
# know; floe's target honours them.
EXTENSION = "floe"


@dataclass(frozen=True)
class Extension:
    parent_key: tuple[str, ...] = ()
    parent_markers: bool = True
    decimals: dict[str, tuple[int, int]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if self.parent_key:
            out |= {"parent_key": list(self.parent_key), "parent_markers": self.parent_markers}
        if self.decimals:
            out["decimals"] = {name: list(digits) for name, digits in self.decimals.items()}
        return out or None


def schema_message(stream: str, schema: dict[str, Any], key_properties: list[str],
                   bookmark_properties: list[str] | None = None, extension: Extension | None = None) -> bytes:
    message: dict[str, Any] = {"type": SCHEMA, "stream": stream, "schema": schema, "key_properties": key_properties}
    if bookmark_properties:
        message["bookmark_properties"] = bookmark_properties
    if extension is not None and (value := extension.as_json()):
        message[EXTENSION] = value
    return dumps(message)


def read_extension(message: dict[str, Any], keys: list[str], where: str) -> Extension:
    """A SCHEMA message's extension (an empty one without the key); a malformed one is an error."""
    value = message.get(EXTENSION)
    if value is None:
        return Extension()
    value = value if isinstance(value, dict) else {"": value}
    parent, markers, decimals = value.get("parent_key", []), value.get("parent_markers", True), value.get("decimals", {})
    valid = (isinstance(parent, list) and all(isinstance(k, str) and k in keys for k in parent)
             and isinstance(markers, bool) and isinstance(decimals, dict)
             and all(isinstance(d, list) and len(d) == 2 and all(type(n) is int for n in d) and 0 <= d[1] <= d[0] <= 38
                     for d in decimals.values()) and not set(value) - {"parent_key", "parent_markers", "decimals"})
    if not valid:
        raise SourceError(f'{where}: stream {message.get("stream")}: "{EXTENSION}" must be like {{"parent_key": '
                          '[some of the key_properties], "parent_markers": true, "decimals": {"price": [18, 6]}}, '
                          f"got {orjson.dumps(message[EXTENSION]).decode()}")
    return Extension(tuple(parent), markers, {str(k): (d[0], d[1]) for k, d in decimals.items()})


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
