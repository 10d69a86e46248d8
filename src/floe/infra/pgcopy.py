"""Query results read with PostgreSQL's binary COPY and decoded into Arrow without per-value Python.

`copy_batches(conn, sql, params, batch_rows)` runs `COPY (sql) TO STDOUT (FORMAT binary)` and yields
record batches of at most `batch_rows` rows (fewer when rows are wide: a batch holds at most
`BATCH_BYTES` of COPY data). The batches' schema is the one `floe.infra.pgconn.read_batches` gives the
same query (`pgconn.arrow_field` of each result column), and so are the values.

How: the server sends one COPY message per row. A thread reads them from libpq (the per-message
calls chained in C, `itertools` style, so no Python bytecode runs per row) and joins a batch's
rows into one buffer, remembering each row's size; meanwhile the caller's thread decodes the
previous buffer with numpy, for every row at once: a field is a 4-byte big-endian length (-1 for
NULL) and the value, so each column's positions follow from the previous column's. Consecutive
fixed-width columns are gathered as one block per row and byte-swapped; text and bytea values
are cut out of the buffer by Arrow's `take`.

Columns must be of a type decoded here (`DECODED_OIDS`); select the others as text
(`column::text`). `infinity` timestamps and dates have no Arrow value and fail the read.
"""

from __future__ import annotations

import select
import struct
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import takewhile
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import pq
from psycopg.errors import error_from_result

from floe.infra.pgconn import arrow_field
from floe.infra.threads import prefetch_in_thread

BATCH_BYTES = 64 << 20  # COPY data per batch at most (wide rows make smaller batches)
SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
TRAILER = b"\xff\xff"
EPOCH_2000_US = 946_684_800_000_000  # PostgreSQL counts timestamps from 2000-01-01
EPOCH_2000_DAYS = 10_957
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
DAY_US = 86_400_000_000

# libpq's get_copy_data(async) results: no complete row buffered yet / the COPY is over
_WAIT, _END = (0, b""), (-1, b"")
_size, _data = itemgetter(0), itemgetter(1)

T = TypeVar("T")


class CopyFormatError(ValueError):
    """The COPY data does not have the shape its columns' types promise."""


# --- decoding one batch ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Fixed:
    """A type whose binary value has a fixed width: `wire` is its big-endian numpy dtype."""

    wire: str
    arrow_type: pa.DataType
    adjust: Callable[[np.ndarray, str], np.ndarray] | None = None  # wire values -> Arrow's (checked)

    @property
    def width(self) -> int:
        return np.dtype(self.wire).itemsize

    @property
    def native(self) -> np.dtype[Any]:
        return np.dtype(self.wire).newbyteorder("=")


@dataclass(frozen=True)
class Varlen:
    """Text or bytes; `version`: the format byte jsonb puts before its text."""

    arrow_type: pa.DataType
    version: int | None = None


def _timestamp(values: np.ndarray, name: str) -> np.ndarray:
    # 'infinity' is the int64 extreme; the last ~30 of PostgreSQL's 294,276 years overflow Arrow's range
    if values.min(initial=0) < -INT64_MAX or values.max(initial=0) > INT64_MAX - EPOCH_2000_US:
        raise CopyFormatError(f"column {name!r}: a timestamp is 'infinity' or out of range")
    return values + EPOCH_2000_US


def _date(values: np.ndarray, name: str) -> np.ndarray:
    if values.min(initial=0) < -INT32_MAX or values.max(initial=0) > INT32_MAX - EPOCH_2000_DAYS:
        raise CopyFormatError(f"column {name!r}: a date is 'infinity' or out of range")
    return values + np.int32(EPOCH_2000_DAYS)


def _time(values: np.ndarray, name: str) -> np.ndarray:
    if values.max(initial=0) >= DAY_US:
        raise CopyFormatError(f"column {name!r}: a time is 24:00:00, past Arrow's last time of day")
    return values


# result column type OID -> its binary COPY value, decoded into the type `pgconn.arrow_field` names
COLUMN_TYPES: dict[int, Fixed | Varlen] = {
    16: Fixed("u1", pa.bool_()),
    21: Fixed(">i2", pa.int16()), 23: Fixed(">i4", pa.int32()), 20: Fixed(">i8", pa.int64()),
    26: Fixed(">u4", pa.int64(), lambda v, _: v.astype(np.int64)),  # oid
    700: Fixed(">f4", pa.float32()), 701: Fixed(">f8", pa.float64()),
    1082: Fixed(">i4", pa.date32(), _date), 1083: Fixed(">i8", pa.time64("us"), _time),
    1114: Fixed(">i8", pa.timestamp("us"), _timestamp),
    1184: Fixed(">i8", pa.timestamp("us", "UTC"), _timestamp),
    25: Varlen(pa.string()), 1043: Varlen(pa.string()), 1042: Varlen(pa.string()), 19: Varlen(pa.string()),
    114: Varlen(pa.string()), 3802: Varlen(pa.string(), version=1), 17: Varlen(pa.binary()),
}
DECODED_OIDS = frozenset(COLUMN_TYPES)


class _Buffer:
    """One batch's COPY data, read at many positions at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.bytes = np.frombuffer(data, np.uint8)
        self._views: dict[str, np.ndarray] = {}

    def read(self, positions: np.ndarray, wire: str) -> np.ndarray:
        """The values of numpy dtype `wire` (">i4", "V12", ...) at `positions`, in native byte order."""
        view = self._views.get(wire)
        if view is None:  # a value starting at every byte: one (unaligned) gather reads them all
            width = np.dtype(wire).itemsize
            view = np.ndarray((max(len(self.data) - width + 1, 0),), wire, self.data, strides=(1,))
            self._views[wire] = view
        picked = view[positions]
        return picked.byteswap(inplace=True).view(picked.dtype.newbyteorder("=")) if wire[0] == ">" else picked


def _validity(valid: np.ndarray | None) -> tuple[pa.Buffer | None, int]:
    """Arrow's validity bitmap of `valid` (None: no NULL) and the NULL count."""
    if valid is None or (nulls := len(valid) - int(np.count_nonzero(valid))) == 0:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), nulls


def _lengths(buffer: _Buffer, position: np.ndarray, ends: np.ndarray, name: str) -> np.ndarray:
    """The length words at `position` (-1: NULL), checked to keep their values within each row."""
    if np.any(position + 4 > ends):
        raise CopyFormatError(f"column {name!r}: a row ends early")
    lengths = buffer.read(position, ">i4")
    if np.any(position + 4 + np.maximum(lengths, 0) > ends):
        raise CopyFormatError(f"column {name!r}: a value runs past its row")
    return lengths


class _Run:
    """Consecutive fixed-width columns. In the rows where none of them is NULL (their length words
    say so) they are one block of known layout, read with one gather; rows with a NULL among
    them are read field by field."""

    def __init__(self, kinds: list[Fixed]) -> None:
        self.kinds = kinds
        self.starts = np.cumsum([0] + [4 + kind.width for kind in kinds])  # each field's length word
        self.width = int(self.starts[-1])

    def decode(self, buffer: _Buffer, position: np.ndarray, ends: np.ndarray,
               names: list[str]) -> tuple[list[pa.Array], np.ndarray]:
        """The run's columns and the positions after it."""
        fits = position + self.width <= ends
        block = buffer.read(np.where(fits, position, 0), f"V{self.width}")
        block = block.view(np.uint8).reshape(-1, self.width)
        regular = fits
        for start, kind in zip(self.starts[:-1], self.kinds, strict=True):
            regular = regular & (block[:, start:start + 4].view(">i4")[:, 0] == kind.width)
        values = [block[:, start + 4:start + 4 + kind.width].view(kind.wire)[:, 0].astype(kind.native)
                  for start, kind in zip(self.starts[:-1], self.kinds, strict=True)]
        valid: list[np.ndarray | None] = [None] * len(self.kinds)
        after = position + self.width
        irregular = np.flatnonzero(~regular)
        if len(irregular):
            at, row_ends = position[irregular], ends[irregular]
            for i, kind in enumerate(self.kinds):
                lengths = _lengths(buffer, at, row_ends, names[i])
                present = lengths >= 0
                if np.any(lengths[present] != kind.width):
                    raise CopyFormatError(f"column {names[i]!r}: expected {kind.width}-byte values")
                values[i][irregular] = buffer.read(np.where(present, at + 4, 0), kind.wire)
                valid[i] = np.ones(len(position), bool)
                valid[i][irregular] = present  # type: ignore[index]
                at = at + 4 + np.maximum(lengths, 0)
            after[irregular] = at
        columns = [_fixed_array(kind, v, ok, name)
                   for kind, v, ok, name in zip(self.kinds, values, valid, names[:len(self.kinds)], strict=True)]
        return columns, after


def _fixed_array(kind: Fixed, values: np.ndarray, valid: np.ndarray | None, name: str) -> pa.Array:
    validity, nulls = _validity(valid)
    if nulls:
        values = np.where(valid, values, 0)  # type: ignore[arg-type]
    if kind.adjust is not None:
        values = kind.adjust(values, name)
    data = np.packbits(values != 0, bitorder="little") if pa.types.is_boolean(kind.arrow_type) else values
    return pa.Array.from_buffers(kind.arrow_type, len(values), [validity, pa.py_buffer(data)], nulls)


class _Single:
    """One text or bytes column: its values cut out of the buffer by Arrow's `take`."""

    def __init__(self, kind: Varlen) -> None:
        self.kind = kind

    def decode(self, buffer: _Buffer, position: np.ndarray, ends: np.ndarray,
               names: list[str]) -> tuple[list[pa.Array], np.ndarray]:
        name, version = names[0], self.kind.version
        lengths = _lengths(buffer, position, ends, name)
        after = position + 4 + np.maximum(lengths, 0)
        n = len(lengths)
        valid = lengths >= 0
        validity, nulls = _validity(valid)
        starts, sizes = position + 4, (np.where(valid, lengths, 0) if nulls else lengths)
        if version is not None:
            if np.count_nonzero(buffer.bytes[starts[valid & (sizes > 0)]] == version) != n - nulls:
                raise CopyFormatError(f"column {name!r}: expected jsonb version {version} values")
            starts, sizes = starts + valid, sizes - valid
        # 2n values alternating [value i] and [the bytes from there to value i + 1], over the whole
        # buffer: its even values are the column.
        offsets = np.empty(2 * n + 1, np.int64)
        offsets[0:2 * n:2] = starts
        offsets[1:2 * n:2] = starts + sizes
        offsets[2 * n] = offsets[2 * n - 1] if n else 0
        spread = pa.Array.from_buffers(pa.large_binary(), 2 * n,
                                       [None, pa.py_buffer(offsets), pa.py_buffer(buffer.data)])
        values = spread.take(pa.array(np.arange(0, 2 * n, 2)))
        values = pa.Array.from_buffers(pa.large_binary(), n, [validity, *values.buffers()[1:]], nulls)
        try:
            return [values.cast(self.kind.arrow_type)], after  # to string: checks that the text is UTF-8
        except pa.ArrowInvalid as exc:
            raise CopyFormatError(f"column {name!r}: {exc}") from None


class BatchDecoder:
    """Turns a buffer of binary COPY rows (and each row's size) into a record batch."""

    def __init__(self, schema: pa.Schema, oids: list[int]) -> None:
        self.schema = schema
        self.groups: list[_Run | _Single] = []
        for oid in oids:
            kind = COLUMN_TYPES[oid]
            if isinstance(kind, Varlen):
                self.groups.append(_Single(kind))
            elif self.groups and isinstance(self.groups[-1], _Run):
                self.groups[-1] = _Run([*self.groups[-1].kinds, kind])
            else:
                self.groups.append(_Run([kind]))

    def __call__(self, data: bytes, row_sizes: np.ndarray) -> pa.RecordBatch:
        buffer = _Buffer(data)
        ends = np.cumsum(row_sizes)
        position = ends - row_sizes
        if np.any(row_sizes < 2) or np.any(buffer.read(position, ">i2") != len(self.schema)):
            raise CopyFormatError(f"a COPY row does not hold {len(self.schema)} fields")
        position += 2
        columns: list[pa.Array] = []
        for group in self.groups:
            decoded, position = group.decode(buffer, position, ends, self.schema.names[len(columns):])
            columns += decoded
        if np.any(position != ends):
            raise CopyFormatError("a COPY row holds more than its fields")
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


# --- reading the COPY stream --------------------------------------------------------------------
def _wait(pgconn: pq.abc.PGconn, stop: threading.Event, write: bool = False) -> None:
    """Block (without the GIL) until the connection's socket is ready, or `stop` is set."""
    sockets = [pgconn.socket]
    while not stop.is_set():
        ready = select.select([], sockets, [], 0.5)[1] if write else select.select(sockets, [], [], 0.5)[0]
        if ready:
            return


def _result(pgconn: pq.abc.PGconn, stop: threading.Event) -> pq.abc.PGresult | None:
    """The next result, waited for without holding the GIL (None when `stop` is set first)."""
    while pgconn.is_busy():
        if stop.is_set():
            return None
        _wait(pgconn, stop)
        pgconn.consume_input()
    return pgconn.get_result()


def _check(pgconn: pq.abc.PGconn, stop: threading.Event, result: pq.abc.PGresult | None,
           wanted: pq.ExecStatus) -> None:
    """Raise the server's error (as psycopg raises it) if `result` is not `wanted`, once the
    connection has delivered its other results (so it can go on: roll back, close)."""
    if result is None or result.status == wanted:
        return
    while _result(pgconn, stop) is not None:
        pass
    if result.status == pq.ExecStatus.FATAL_ERROR:
        raise error_from_result(result)
    raise psycopg.DatabaseError(f"unexpected reply to COPY: {pq.ExecStatus(result.status).name}")


def _messages(pgconn: pq.abc.PGconn, stop: threading.Event) -> Iterator[list[tuple[int, memoryview]]]:
    """The COPY's data messages (one per row), in lists of what each read from the socket brought."""
    calls = iter(partial(pgconn.get_copy_data, 1), _END)
    while not stop.is_set():
        messages = list(takewhile(_WAIT.__ne__, calls))  # all complete rows in libpq's buffer
        probe = next(calls, None)  # None: `calls` ended on _END (exhausted, so get_copy_data is not called)
        if probe is not None and probe != _WAIT:
            messages.append(probe)
        if messages:
            yield messages
        if probe is None:
            return
        if probe == _WAIT:
            _wait(pgconn, stop)
            pgconn.consume_input()


def _read_copy(pgconn: pq.abc.PGconn, query: bytes, batch_rows: int, batch_bytes: int,
               stop: threading.Event) -> Iterator[tuple[bytes, np.ndarray]]:
    """Run the COPY; yield each batch's rows as (one buffer of tuples, each tuple's size)."""
    pgconn.send_query(query)
    while pgconn.flush():
        _wait(pgconn, stop, write=True)
    _check(pgconn, stop, _result(pgconn, stop), pq.ExecStatus.COPY_OUT)
    parts: list[bytes] = []
    sizes = array("q")
    held = 0
    carry: tuple[int, memoryview] | None = None  # the last message seen: the trailer if it is the last
    header = True
    for messages in _messages(pgconn, stop):
        if header:  # the header comes in front of the first row (or of the trailer)
            first = _strip_header(messages[0])
            messages[:1], header = [first] if first[0] else [], False
        if carry is not None:
            messages.insert(0, carry)
        if not messages:
            continue
        carry = messages.pop()
        while messages:
            room = batch_rows - len(sizes)
            taken, messages = messages[:room], messages[room:]
            parts.append(b"".join(map(_data, taken)))
            sizes.extend(map(_size, taken))
            held += len(parts[-1])
            if len(sizes) >= batch_rows or held >= batch_bytes:
                yield b"".join(parts), np.frombuffer(sizes, np.int64).copy()
                parts, sizes, held = [], array("q"), 0
    if stop.is_set():
        return
    while (result := _result(pgconn, stop)) is not None:  # a failed query's error comes here
        _check(pgconn, stop, result, pq.ExecStatus.COMMAND_OK)
    if carry is None or bytes(carry[1]) != TRAILER:
        raise CopyFormatError("the COPY data ended without its trailer")
    if sizes:
        yield b"".join(parts), np.frombuffer(sizes, np.int64).copy()


def _strip_header(message: tuple[int, memoryview]) -> tuple[int, memoryview]:
    """The first message without the COPY header (signature, flags, extension) in front of it."""
    data = message[1]
    if len(data) < 19 or bytes(data[:11]) != SIGNATURE:
        raise CopyFormatError("the COPY data does not start with the binary COPY signature")
    flags, extension = struct.unpack_from(">ii", data, 11)
    if flags & 0x10000:
        raise CopyFormatError("the COPY data carries OIDs")
    skip = 19 + extension
    return message[0] - skip, data[skip:]


def copy_batches(
    conn: psycopg.Connection[Any], sql: str, params: Any = (), batch_rows: int = 50_000,
    batch_bytes: int = BATCH_BYTES,
) -> Iterator[pa.RecordBatch]:
    """Stream `sql`'s rows as record batches of at most `batch_rows` rows, read with binary COPY
    (a batch is also cut once it holds `batch_bytes` of COPY data).

    Runs in the connection's current transaction (the columns are described first, which locks
    the tables against changes until it ends); an empty result yields one empty batch. Every
    column's type must be in `DECODED_OIDS`."""
    conn.execute("SET client_encoding TO 'UTF8'")
    with conn.cursor() as cur:
        cur.execute(f"SELECT * FROM ({sql}) AS floe_query LIMIT 0", params or None)
        described = cur.description or []
    if not described:
        raise ValueError("the query has no columns to COPY")
    undecoded = [f"{d.name} (type oid {d.type_code})" for d in described if d.type_code not in DECODED_OIDS]
    if undecoded:
        raise ValueError(f"binary COPY cannot decode {', '.join(undecoded)}: select them as text")
    schema = pa.schema([arrow_field(d.name, d.type_code, d.precision, d.scale) for d in described])
    decode = BatchDecoder(schema, [d.type_code for d in described])
    query = psycopg.ClientCursor(conn).mogrify(sql, params or None)
    stop = threading.Event()
    chunks = prefetch_in_thread(_read_copy(conn.pgconn, f"COPY ({query}) TO STDOUT (FORMAT binary)".encode(),
                                   batch_rows, batch_bytes, stop), stop, name="floe-copy-reader")
    yielded = False
    try:
        for buffer, row_sizes in chunks:
            yield decode(buffer, row_sizes)
            yielded = True
    finally:
        chunks.close()
    if not yielded:
        yield pa.RecordBatch.from_pylist([], schema=schema)
