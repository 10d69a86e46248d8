"""Query results read with PostgreSQL's binary COPY and decoded into Arrow without per-value Python.

`copy_batches(conn, sql, params, batch_rows)` runs `COPY (sql) TO STDOUT (FORMAT binary)` and yields
record batches of at most `batch_rows` rows (fewer when rows are wide: a batch holds at most
`BATCH_BYTES` of COPY data). The batches' schema is the one `floe.pgconn.read_batches` gives the
same query (`pgconn.arrow_field` of each result column), and so are the values.

How: the server sends one COPY message per row. A thread reads them from libpq (the per-message
calls chained in C, `itertools` style, so no Python bytecode runs per row) and joins a batch's
rows into one buffer, remembering each row's size; meanwhile the caller's thread decodes the
previous buffer, one column at a time for every row at once with numpy: a field is a 4-byte
big-endian length (-1 for NULL) and the value, so each column's positions follow from the
previous column's. Fixed-width values are gathered and byte-swapped; text and bytea values are
cut out of the buffer by Arrow's `take`.

Columns must be of a type decoded here (`DECODED_OIDS`); select the others as text
(`column::text`). `infinity` timestamps and dates have no Arrow value and fail the read.
"""

from __future__ import annotations

import queue
import select
import struct
import threading
from array import array
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import takewhile
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import pq

from floe.pgconn import arrow_field

BATCH_BYTES = 64 << 20  # COPY data per batch at most (wide rows make smaller batches)
SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
TRAILER = b"\xff\xff"
EPOCH_2000_US = 946_684_800_000_000  # PostgreSQL counts timestamps from 2000-01-01
EPOCH_2000_DAYS = 10_957
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1

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


# result column type OID -> its binary COPY value, decoded into the type `pgconn.arrow_field` names
COLUMN_TYPES: dict[int, Fixed | Varlen] = {
    16: Fixed("u1", pa.bool_()),
    21: Fixed(">i2", pa.int16()), 23: Fixed(">i4", pa.int32()), 20: Fixed(">i8", pa.int64()),
    26: Fixed(">u4", pa.int64(), lambda v, _: v.astype(np.int64)),  # oid
    700: Fixed(">f4", pa.float32()), 701: Fixed(">f8", pa.float64()),
    1082: Fixed(">i4", pa.date32(), _date), 1083: Fixed(">i8", pa.time64("us")),
    1114: Fixed(">i8", pa.timestamp("us"), _timestamp), 1184: Fixed(">i8", pa.timestamp("us", "UTC"), _timestamp),
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
        """The values of numpy dtype `wire` (">i4", "V12", ...) at each of `positions`, in native byte order."""
        view = self._views.get(wire)
        if view is None:  # a value starting at every byte: one (unaligned) gather reads them all
            width = np.dtype(wire).itemsize
            view = np.ndarray((max(len(self.data) - width + 1, 0),), wire, self.data, strides=(1,))
            self._views[wire] = view
        return view[positions].astype(np.dtype(wire).newbyteorder("="))


def _validity(valid: np.ndarray | None) -> tuple[pa.Buffer | None, int]:
    nulls = 0 if valid is None else len(valid) - int(np.count_nonzero(valid))
    return (pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None), nulls


def _fixed_array(kind: Fixed, values: np.ndarray, valid: np.ndarray | None, name: str) -> pa.Array:
    validity, nulls = _validity(valid)
    if nulls:
        values = np.where(valid, values, 0)  # type: ignore[arg-type]
    if kind.adjust is not None:
        values = kind.adjust(values, name)
    data = np.packbits(values != 0, bitorder="little") if pa.types.is_boolean(kind.arrow_type) else values
    return pa.Array.from_buffers(kind.arrow_type, len(values), [validity, pa.py_buffer(data)], nulls)


def _varlen_array(kind: Varlen, buffer: _Buffer, starts: np.ndarray, lengths: np.ndarray, name: str) -> pa.Array:
    n = len(lengths)
    valid = lengths >= 0
    validity, nulls = _validity(valid)
    sizes = np.where(valid, lengths, 0) if nulls else lengths
    if kind.version is not None:
        if np.count_nonzero(buffer.bytes[starts[valid & (sizes > 0)]] == kind.version) != n - nulls:
            raise CopyFormatError(f"column {name!r}: expected jsonb version {kind.version} values")
        starts, sizes = starts + valid, sizes - valid
    # 2n values alternating [value i] and [the bytes from there to value i + 1], over the whole
    # buffer: its even values are the column.
    offsets = np.empty(2 * n + 1, np.int64)
    offsets[0:2 * n:2] = starts
    offsets[1:2 * n:2] = starts + sizes
    offsets[2 * n] = offsets[2 * n - 1] if n else 0
    spread = pa.Array.from_buffers(pa.large_binary(), 2 * n, [None, pa.py_buffer(offsets), pa.py_buffer(buffer.data)])
    values = spread.take(pa.array(np.arange(0, 2 * n, 2)))
    values = pa.Array.from_buffers(pa.large_binary(), n, [validity, *values.buffers()[1:]], nulls)
    try:
        return values.cast(kind.arrow_type)  # to string: checks that the text is UTF-8
    except pa.ArrowInvalid as exc:
        raise CopyFormatError(f"column {name!r}: {exc}") from None


class BatchDecoder:
    """Turns a buffer of binary COPY rows (and each row's size) into a record batch.

    Consecutive fixed-width columns are read as one block per row (one gather for them all) in
    the rows where none of them is NULL, the block's length words saying so; the rows holding a
    NULL there are read field by field."""

    def __init__(self, schema: pa.Schema, oids: list[int]) -> None:
        self.schema = schema
        kinds = [COLUMN_TYPES[oid] for oid in oids]
        self.groups: list[list[Fixed] | Varlen] = []  # runs of fixed-width columns, and each varlen one
        for kind in kinds:
            if isinstance(kind, Varlen):
                self.groups.append(kind)
            elif self.groups and isinstance(self.groups[-1], list):
                self.groups[-1].append(kind)
            else:
                self.groups.append([kind])

    def __call__(self, data: bytes, row_sizes: np.ndarray) -> pa.RecordBatch:
        buffer = _Buffer(data)
        ends = np.cumsum(row_sizes)
        position = ends - row_sizes
        if np.any(row_sizes < 2) or np.any(buffer.read(position, ">i2") != len(self.schema)):
            raise CopyFormatError(f"a COPY row does not hold {len(self.schema)} fields")
        position += 2
        columns: list[pa.Array] = []
        for group in self.groups:
            names = self.schema.names[len(columns):]
            if isinstance(group, Varlen):
                lengths = self._lengths(buffer, position, ends, names[0])
                columns.append(_varlen_array(group, buffer, position + 4, lengths, names[0]))
                position = position + 4 + np.maximum(lengths, 0)
            else:
                columns += self._run(buffer, group, position, ends, names)
        if np.any(position != ends):
            raise CopyFormatError("a COPY row holds more than its fields")
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    @staticmethod
    def _lengths(buffer: _Buffer, position: np.ndarray, ends: np.ndarray, name: str) -> np.ndarray:
        """The length words at `position` (-1: NULL), checked to stay within each row."""
        if np.any(position + 4 > ends):
            raise CopyFormatError(f"column {name!r}: a row ends early")
        lengths = buffer.read(position, ">i4")
        if np.any(position + 4 + np.maximum(lengths, 0) > ends):
            raise CopyFormatError(f"column {name!r}: a value runs past its row")
        return lengths

    def _run(self, buffer: _Buffer, run: list[Fixed], position: np.ndarray, ends: np.ndarray,
             names: list[str]) -> list[pa.Array]:
        """Decode consecutive fixed-width columns, moving `position` (in place) past them."""
        expected = b"".join(struct.pack(">i", kind.width) + bytes(kind.width) for kind in run)
        words = [i for i, kind in enumerate(run) for _ in range(4)]
        offsets = np.cumsum([0] + [4 + kind.width for kind in run])
        block_width = int(offsets[-1])
        length_bytes = np.concatenate([np.arange(o, o + 4) for o in offsets[:-1]])
        fits = position + block_width <= ends
        block = buffer.read(np.where(fits, position, 0), f"V{block_width}").view(np.uint8).reshape(-1, block_width)
        regular = fits & np.all(block[:, length_bytes] == np.frombuffer(expected, np.uint8)[length_bytes], axis=1)
        del words
        values = [np.ascontiguousarray(block[:, o + 4:o + 4 + k.width]).view(k.wire).ravel().astype(
                  np.dtype(k.wire).newbyteorder("=")) for o, k in zip(offsets[:-1], run, strict=True)]
        valid: list[np.ndarray | None] = [None] * len(run)
        irregular = np.flatnonzero(~regular)
        if len(irregular):  # rows with a NULL in the run: field by field
            at = position[irregular]
            for i, kind in enumerate(run):
                lengths = self._lengths(buffer, at, ends[irregular], names[i])
                present = lengths >= 0
                if np.any(lengths[present] != kind.width):
                    raise CopyFormatError(f"column {names[i]!r}: expected {kind.width}-byte values")
                values[i][irregular] = buffer.read(np.where(present, at + 4, 0), kind.wire)
                valid[i] = np.ones(len(position), bool)
                valid[i][irregular] = present  # type: ignore[index]
                at = at + 4 + np.maximum(lengths, 0)
            position[irregular] = at
        position[regular] += block_width
        return [_fixed_array(kind, v, ok, name) for kind, v, ok, name in zip(run, values, valid, names, strict=False)]


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


def _check(result: pq.abc.PGresult | None, wanted: pq.ExecStatus) -> None:
    if result is not None and result.status != wanted:
        message = result.error_message.decode(errors="replace").strip()
        raise psycopg.DatabaseError(message or f"unexpected reply to COPY: {pq.ExecStatus(result.status).name}")


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


def _read_copy(pgconn: pq.abc.PGconn, query: bytes, batch_rows: int,
               stop: threading.Event) -> Iterator[tuple[bytes, np.ndarray]]:
    """Run the COPY; yield each batch's rows as (one buffer of tuples, each tuple's size)."""
    pgconn.send_query(query)
    while pgconn.flush():
        _wait(pgconn, stop, write=True)
    _check(_result(pgconn, stop), pq.ExecStatus.COPY_OUT)
    parts: list[bytes] = []
    sizes = array("q")
    held = 0
    carry: tuple[int, memoryview] | None = None  # the last message seen: the trailer if it is the last
    header = True
    for messages in _messages(pgconn, stop):
        if header:
            messages[0] = _strip_header(messages[0])
            header = False
        if carry is not None:
            messages.insert(0, carry)
        carry = messages.pop()
        while messages:
            room = batch_rows - len(sizes)
            taken, messages = messages[:room], messages[room:]
            parts.append(b"".join(map(_data, taken)))
            sizes.extend(map(_size, taken))
            held += len(parts[-1])
            if len(sizes) >= batch_rows or held >= BATCH_BYTES:
                yield b"".join(parts), np.frombuffer(sizes, np.int64).copy()
                parts, sizes, held = [], array("q"), 0
    if stop.is_set():
        return
    while (result := _result(pgconn, stop)) is not None:  # a failed query's error comes here
        _check(result, pq.ExecStatus.COMMAND_OK)
    if carry is None or bytes(carry[1]) != TRAILER:
        raise CopyFormatError("the COPY data ended without its trailer")
    if sizes:
        yield b"".join(parts), np.frombuffer(sizes, np.int64).copy()


def _strip_header(message: tuple[int, memoryview]) -> tuple[int, memoryview]:
    """The first message without the COPY header (signature, flags, extension) in front of it."""
    data = message[1]
    if bytes(data[:11]) != SIGNATURE or len(data) < 19:
        raise CopyFormatError("the COPY data does not start with the binary COPY signature")
    flags, extension = struct.unpack_from(">ii", data, 11)
    if flags & 0x10000:
        raise CopyFormatError("the COPY data carries OIDs")
    skip = 19 + extension
    return message[0] - skip, data[skip:]


def _in_thread(items: Iterator[T], stop: threading.Event, depth: int = 2) -> Generator[T, None, None]:
    """`items`, produced by a thread of their own at most `depth` ahead of the consumer.

    Closing this iterator sets `stop` and waits for the thread: `items` must return soon after."""
    box: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((False, exc))

    thread = threading.Thread(target=produce, name="floe-copy-reader", daemon=True)
    thread.start()
    try:
        while True:
            try:
                more, item = box.get(timeout=0.5)
            except queue.Empty:
                if not thread.is_alive() and box.empty():
                    raise RuntimeError("the COPY reader stopped without a word") from None
                continue
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


def copy_batches(
    conn: psycopg.Connection[Any], sql: str, params: Any = (), batch_rows: int = 50_000
) -> Iterator[pa.RecordBatch]:
    """Stream `sql`'s rows as record batches of at most `batch_rows` rows, read with binary COPY.

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
    chunks = _in_thread(_read_copy(conn.pgconn, f"COPY ({query}) TO STDOUT (FORMAT binary)".encode(),
                                   batch_rows, stop), stop)
    yielded = False
    try:
        for buffer, row_sizes in chunks:
            yield decode(buffer, row_sizes)
            yielded = True
    finally:
        chunks.close()
    if not yielded:
        yield pa.RecordBatch.from_pylist([], schema=schema)
