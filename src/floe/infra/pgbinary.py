"""PostgreSQL's binary COPY format built from Arrow columns without per-row Python.

Text COPY makes the server parse every number and timestamp; binary COPY hands them over as
big-endian machine values, which roughly halves the server's work. Each column becomes one or two
Arrow arrays (a 4-byte length prefix and the value bytes); `binary_join_element_wise` glues a
row's pieces together, and the result's data buffer is the COPY payload.

`encoder(schema, oids)` returns None when a column has no exact binary mapping onto its target
column (NUMERIC, TIME, nested values, a type that differs from the table's): the caller then
uses CSV, which PostgreSQL converts and checks itself.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from typing import TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)
EPOCH_2000_US = 946_684_800_000_000  # PostgreSQL counts timestamps from 2000-01-01
EPOCH_2000_DAYS = 10_957

# target type OID -> (array typecode, byte size) for fixed-width numbers
_INTS = {20: ("q", pa.int64()), 23: ("i", pa.int32()), 21: ("h", pa.int16())}
_FLOATS = {701: ("d", pa.float64()), 700: ("f", pa.float32())}
_TEXT = {25, 1043, 1042, 19}
_CODE_TYPES = {"q": pa.int64(), "i": pa.int32(), "h": pa.int16(), "d": pa.float64(), "f": pa.float32()}
JSONB, JSON, BOOL, BYTEA, DATE, TIMESTAMP, TIMESTAMPTZ = 3802, 114, 16, 17, 1082, 1114, 1184

Piece: TypeAlias = pa.Array | pa.Scalar
ColumnEncoder = Callable[[pa.Array], list[Piece]]


def _big_endian(values: pa.Array, code: str) -> pa.Array:
    """A fixed-size-binary array of the values' big-endian bytes (nulls keep garbage bytes; masked later)."""
    width = array(code).itemsize
    data = values.buffers()[1]
    raw = array(code)
    raw.frombytes(memoryview(data)[values.offset * width : (values.offset + len(values)) * width])
    raw.byteswap()
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(raw.tobytes())])


def _fixed(code: str, target: pa.DataType, adjust: Callable[[pa.Array], pa.Array] | None = None) -> ColumnEncoder:
    size = struct.pack(">i", array(code).itemsize)

    def encode(column: pa.Array) -> list[Piece]:
        values = column.cast(target)
        if adjust is not None:
            values = adjust(values).cast(_CODE_TYPES[code])  # arithmetic may widen: back to the wire width
        values = values.fill_null(0) if values.null_count else values
        body = _big_endian(values, code).cast(pa.binary())
        if not column.null_count:
            return [pa.scalar(size, pa.binary()), body]
        valid = pc.is_valid(column)
        return [pc.if_else(valid, pa.scalar(size, pa.binary()), pa.scalar(NULL, pa.binary())),
                pc.if_else(valid, body, pa.scalar(b"", pa.binary()))]

    return encode


def _bool(column: pa.Array) -> list[Piece]:
    body = pc.if_else(column, pa.scalar(b"\x01", pa.binary()), pa.scalar(b"\x00", pa.binary()))
    one = struct.pack(">i", 1)
    if not column.null_count:
        return [pa.scalar(one, pa.binary()), body]
    valid = pc.is_valid(column)
    return [pc.if_else(valid, pa.scalar(one, pa.binary()), pa.scalar(NULL, pa.binary())),
            pc.if_else(valid, body, pa.scalar(b"", pa.binary()))]


def _varlen(version: bytes = b"", strip_nul: bool = True) -> ColumnEncoder:
    def encode(column: pa.Array) -> list[Piece]:
        if strip_nul and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.replace_substring(column, "\x00", "")
        body = column.cast(pa.binary()) if not pa.types.is_binary(column.type) else column
        lengths = pc.cast(pc.binary_length(body), pa.int32())
        if version:
            lengths = pc.cast(pc.add(lengths, len(version)), pa.int32())
        prefix = _big_endian(lengths.fill_null(0), "i").cast(pa.binary())
        pieces: list[Piece] = [prefix]
        if version:
            pieces.append(pa.scalar(version, pa.binary()))
        pieces.append(body)
        if column.null_count:
            valid = pc.is_valid(column)
            pieces = [pc.if_else(valid, p, pa.scalar(NULL if i == 0 else b"", pa.binary())) if isinstance(p, pa.Array)
                      else pc.if_else(valid, p, pa.scalar(b"", pa.binary())) for i, p in enumerate(pieces)]
        return pieces

    return encode


def _column_encoder(field: pa.Field, oid: int, is_json: bool) -> ColumnEncoder | None:
    t = field.type
    if pa.types.is_integer(t) and oid in _INTS:
        code, target = _INTS[oid]
        return _fixed(code, target)
    if pa.types.is_floating(t) and oid in _FLOATS:
        code, target = _FLOATS[oid]
        return _fixed(code, target)
    if pa.types.is_boolean(t) and oid == BOOL:
        return _bool
    if pa.types.is_timestamp(t) and oid in (TIMESTAMP, TIMESTAMPTZ):
        return _fixed("q", pa.timestamp("us"), lambda v: pc.subtract(v.cast(pa.int64()), EPOCH_2000_US))
    if pa.types.is_date32(t) and oid == DATE:
        return _fixed("i", pa.date32(), lambda v: pc.subtract(v.cast(pa.int32()), EPOCH_2000_DAYS))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if oid in _TEXT or oid == JSON:
            return _varlen()
        if oid == JSONB and is_json:
            return _varlen(version=b"\x01")
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t)) and oid == BYTEA:
        return _varlen(strip_nul=False)
    return None


def encoder(schema: pa.Schema, oids: list[int], json_columns: set[str]) -> Callable[[pa.RecordBatch], bytes | memoryview] | None:
    """A function turning batches of `schema` into binary COPY tuples for columns of types `oids`, or None."""
    encoders = []
    for f, oid in zip(schema, oids, strict=True):
        column_encoder = _column_encoder(f, oid, f.name in json_columns)
        if column_encoder is None:
            return None
        encoders.append(column_encoder)
    count = pa.scalar(struct.pack(">h", len(encoders)), pa.binary())

    def encode(batch: pa.RecordBatch) -> bytes | memoryview:
        pieces: list[Piece] = [count]
        for name, column, column_encoder in zip(batch.schema.names, batch.columns, encoders, strict=True):
            try:
                pieces += column_encoder(column)
            except pa.ArrowInvalid as exc:  # e.g. a value too large for the table's INTEGER column
                raise ValueError(f"column {name!r}: {exc}") from None
        if batch.num_rows == 0:
            return b""
        if all(isinstance(p, pa.Scalar) for p in pieces):  # no column at all: just the field counts
            return bytes(count.as_py()) * batch.num_rows
        rows = pc.binary_join_element_wise(*pieces, pa.scalar(b"", pa.binary()))
        _, offsets, data = rows.buffers()
        start = struct.unpack_from("<i", offsets, 4 * rows.offset)[0]
        end = struct.unpack_from("<i", offsets, 4 * (rows.offset + len(rows)))[0]
        return memoryview(data)[start:end]  # no copy: the COPY writer reads it before the next batch

    return encode
