"""Turning a downloaded FullStory export file (gzip NDJSON or one JSON array) into Arrow batches.

Memory stays flat whatever the file size: the gzip is decompressed in pieces, cut at event
boundaries into chunks of about `chunk_bytes`, and each chunk is parsed by pyarrow's JSON reader
(vectorised, int64 kept exact) into a batch with every known column in schema order plus
`CustomVars`: a JSON object (keys sorted) of every field that is not a known column.
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from isal import isal_zlib

from floe.core.errors import SourceError

if TYPE_CHECKING:
    import pyarrow as pa

CUSTOM_VARS = "CustomVars"
# One element of a JSON array of (at most two-level nested) objects; strings may hold braces.
_STRING = rb'"(?:[^"\\]|\\.)*"'
_FLAT = rb"\{(?:[^{}\"]|" + _STRING + rb")*\}"
_ELEMENT = re.compile(rb"\{(?:[^{}\"]|" + _STRING + rb"|" + _FLAT + rb")*\}", re.S)
_SEPARATORS = re.compile(rb"[\s,\[\]]*")


def _timestamps_as_text(t: pa.DataType) -> pa.DataType:
    """`t` with every timestamp in it (inference makes them of date-like text) replaced by string."""
    import pyarrow as pa

    if pa.types.is_timestamp(t):
        return pa.string()
    if pa.types.is_list(t):
        return pa.list_(_timestamps_as_text(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_timestamps_as_text(f.type)) for f in t])
    return t


def _parse_type(t: pa.DataType) -> pa.DataType:
    """What the JSON reader parses a column as: times in ns (any RFC3339 precision), ints as int64."""
    import pyarrow as pa

    if pa.types.is_timestamp(t):
        return pa.timestamp("ns", tz="UTC")
    if pa.types.is_integer(t):
        return pa.int64()
    return t


class ExportReader:
    """Reads one export file into Arrow batches of `schema` (its last field is CustomVars)."""

    def __init__(self, schema: pa.Schema, fmt: str, chunk_bytes: int = 2 << 20, workers: int = 2) -> None:
        import pyarrow as pa

        self.schema = schema
        self.known = [f for f in schema if f.name != CUSTOM_VARS]
        self.known_names = {f.name for f in self.known}
        # hauser matches field names case-insensitively: `pageurl` is the PageUrl column, not a custom var.
        self.known_by_lower = {f.name.lower(): f.name for f in self.known}
        self.fmt = fmt
        self.chunk_bytes = chunk_bytes
        self.workers = workers
        self._by_line = True
        self.parse_schema = pa.schema([pa.field(f.name, _parse_type(f.type)) for f in self.known])
        self.unit = "line" if fmt == "FORMAT_NDJSON" else "element"  # how an error names an event's place
        # Fields met so far that are declared to the JSON reader, by the name the events spell them with:
        # known fields (in any casing) with their column's type, and other fields that inference would
        # turn into timestamps as text (a custom var "2024-01-01" stays that string). Only fields met are
        # declared, since each declared field costs time on every row (~0.5 µs/event for hauser's 58).
        self._declared: dict[str, pa.DataType] = {}

    # --- bytes -> event chunks ------------------------------------------------------------
    def _inflate(self, path: Path) -> Iterator[bytes]:
        """Decompressed pieces of a gzip file (several members allowed); raises if it is cut short.

        ISA-L's inflate (same API as zlib's) takes less than half of zlib's CPU."""
        inflater = isal_zlib.decompressobj(wbits=47)
        ended = False  # the current member is complete (a file may hold several members)
        with path.open("rb") as f:
            while block := f.read(128 << 10):  # ~1 MB once inflated
                while block:
                    if ended:
                        inflater, ended = isal_zlib.decompressobj(wbits=47), False
                    try:
                        out = inflater.decompress(block)
                    except (zlib.error, isal_zlib.error) as exc:  # type: ignore[misc]  # isal stubs: error is IsalError
                        raise SourceError(f"export file is not valid gzip ({exc})") from None
                    if out:
                        yield out
                    block, ended = (inflater.unused_data, True) if inflater.eof else (b"", False)
        if not ended:
            raise SourceError("export file is truncated (the gzip stream ends early)")

    def _ndjson_chunks(self, path: Path) -> Iterator[bytes]:
        """Whole lines, about `chunk_bytes` at a time; pieces are joined once (no growing buffer)."""
        pieces: list[bytes] = []
        size = 0
        for piece in self._inflate(path):
            pieces.append(piece)
            size += len(piece)
            if size >= self.chunk_bytes and (cut := piece.rfind(b"\n") + 1):
                pieces[-1] = piece[:cut]
                yield b"".join(pieces)
                rest = piece[cut:]
                pieces, size = ([rest] if rest else []), len(rest)
        tail = b"".join(pieces)
        if tail.strip():
            yield tail + b"\n"

    def _array_chunks(self, path: Path) -> Iterator[bytes]:
        """FORMAT_JSON: cut the array into whole elements and hand them on one per line.

        Fast path: an array written one element per line (FullStory's and most writers' layout;
        a raw newline cannot occur inside a JSON string) is split on newlines. Anything else
        (minified, pretty-printed) goes through a regex that skips over strings."""
        pending = bytearray()
        started = False
        self._by_line = True
        for piece in self._inflate(path):
            pending += piece
            if not started:
                head = pending.lstrip()
                if not head:
                    continue
                if head[:1] != b"[":
                    raise SourceError("FORMAT_JSON export does not start with a JSON array")
                started = True
            if len(pending) >= self.chunk_bytes:
                yield from self._elements(pending, final=False)
        yield from self._elements(pending, final=True)

    def _elements(self, pending: bytearray, final: bool) -> Iterator[bytes]:
        if self._by_line:
            cut = len(pending) if final else pending.rfind(b"\n") + 1
            if final and not bytes(pending).rstrip().endswith(b"]"):
                raise SourceError("FORMAT_JSON export is truncated (the array is not closed)")
            if cut > 0:
                items = [i for line in bytes(pending[:cut]).split(b"\n") if (i := line.strip(b" \t\r[],"))]
                if all(i[:1] == b"{" and i[-1:] == b"}" and b"}," not in i for i in items):
                    del pending[:cut]
                    if items:
                        yield b"\n".join(items) + b"\n"
                    return
            self._by_line = False
        data = bytes(pending)
        pos, out = 0, []
        for match in _ELEMENT.finditer(data):
            if _SEPARATORS.fullmatch(data, pos, match.start()) is None:
                if final:
                    raise SourceError(f"FORMAT_JSON export: unexpected bytes {data[pos:match.start()][:40]!r}")
                break  # a brace inside a string cut by the chunk boundary: wait for more bytes
            out.append(match.group().replace(b"\n", b" "))  # a raw newline is never inside a string
            pos = match.end()
        rest = data[pos:]
        if final and _SEPARATORS.fullmatch(rest) is None:
            raise SourceError("FORMAT_JSON export is truncated or not a flat array of objects")
        del pending[: len(pending) - len(rest)]
        if out:
            yield b"\n".join(out) + b"\n"

    # --- event chunks -> batches -------------------------------------------------------
    def chunks(self, path: Path) -> Iterator[bytes]:
        """The file's events in chunks of whole events, one per line (the same chunks on every call)."""
        return self._ndjson_chunks(path) if self.fmt == "FORMAT_NDJSON" else self._array_chunks(path)

    def batches(self, path: Path, where: str = "export file") -> Iterator[pa.RecordBatch]:
        """The file's batches in file order. Chunks are cut on this thread and parsed on `workers`
        threads (pyarrow releases the GIL while parsing), at most `workers` chunks ahead.

        Every failure is a SourceError that starts with `where` (the window and export) and names the
        line (NDJSON) or array element, and the field, when one is at fault."""
        import pyarrow as pa

        with ThreadPoolExecutor(self.workers, thread_name_prefix="fullstory-parse") as pool:
            pending: deque[tuple[int, Future[pa.RecordBatch]]] = deque()
            index = -1
            try:
                for index, chunk in enumerate(self.chunks(path)):
                    pending.append((index, pool.submit(self.batch, chunk)))
                    if len(pending) > self.workers:
                        index, future = pending.popleft()
                        yield future.result()
                while pending:
                    index, future = pending.popleft()
                    yield future.result()
            except _EventError as exc:  # the error path: count the lines of the chunks before this one
                line = 1 + sum(c.count(b"\n") for c, _ in zip(self.chunks(path), range(index), strict=False))
                raise SourceError(f"{where}: {self.unit} {line + exc.line}: {exc.message}") from None
            except SourceError as exc:
                raise SourceError(f"{where}: {exc}") from None
            except (pa.ArrowException, ValueError, TypeError, OverflowError, OSError) as exc:
                raise SourceError(f"{where}: cannot read the export file ({type(exc).__name__}: {exc})") from None
            finally:
                for _, future in pending:
                    future.cancel()

    def batch(self, chunk: bytes) -> pa.RecordBatch:
        """One chunk of whole events (one per line) as one batch of `schema`."""
        table = self.parse(chunk)
        try:
            return self.convert(table)
        except _BadColumn as bad:
            raise self._misfit(chunk, bad.name, bad.values.to_pylist(), bad.type, bad.detail) from None

    def _misfit(self, chunk: bytes, name: str, values: list[Any], target: pa.DataType, detail: str) -> _EventError:
        """The error for field `name` of a chunk whose `values` do not all convert to `target`, at the
        first that does not (the error path, so one value at a time)."""
        column_type = self.schema.field(self.canonical(name)).type
        return _EventError(_line_of(chunk, _first_misfit(values, target)),
                           f"field {name} is not a {column_type}: {detail}")

    def parse(self, chunk: bytes) -> pa.Table:
        """Parse the chunk as one block without pyarrow's own threads (`batches` runs chunks side
        by side instead): one block needs no reconciling of types or concatenating of chunks
        (about 20% less CPU than 1 MB blocks on pyarrow's threads). The chunk is read in place (no
        copy, and no Python file calls holding the GIL). Safe on several threads."""
        import pyarrow as pa
        import pyarrow.json as pj

        while True:
            declared = self._declared
            options = pj.ParseOptions(explicit_schema=pa.schema(list(declared.items())),
                                      unexpected_field_behavior="infer")
            try:
                table = pj.read_json(pa.BufferReader(chunk), read_options=pj.ReadOptions(
                    block_size=len(chunk) + 1, use_threads=False), parse_options=options, memory_pool=pa.system_memory_pool())
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                table = None
            # A field met for the first time was typed by inference: declare it and parse again, so that
            # known columns always get their declared type (exact int64, timestamps) and text stays text.
            if table is None:
                new = {f.name: f.type for f in self.parse_schema if f.name not in declared}
            else:
                new = {f.name: t for f in table.schema if f.name not in declared
                       and (t := self._declared_type(f)) is not None}
            if not new:
                return table if table is not None else self.parse_rows(chunk)
            self._declared = declared | new  # a new dict: other workers may be reading the old one

    def _declared_type(self, parsed: pa.Field) -> pa.DataType | None:
        """The type to declare a parsed field with, or None to keep what inference found."""
        known = self.canonical(parsed.name)
        if known in self.known_names:
            return self.parse_schema.field(known).type
        text = _timestamps_as_text(parsed.type)
        return None if text.equals(parsed.type) else text

    def parse_rows(self, chunk: bytes) -> pa.Table:
        """The slow path, one event at a time with orjson: for chunks pyarrow cannot type (e.g. a
        custom var holding a list of mixed types). Returns the known columns plus CustomVars."""
        import pyarrow as pa
        import pyarrow.compute as pc

        events = []
        for i, line in enumerate(chunk.split(b"\n")):
            if line.strip():
                try:
                    events.append({self.canonical(k): v for k, v in orjson.loads(line).items()})
                except orjson.JSONDecodeError as exc:
                    raise _EventError(i, f"not valid JSON ({exc})") from None
                except AttributeError:  # .items(): a JSON value that is not an object
                    raise _EventError(i, "not a JSON object") from None
        columns: dict[str, pa.Array] = {}
        for f in self.parse_schema:
            values = [e.get(f.name) for e in events]
            try:
                if pa.types.is_timestamp(f.type):
                    columns[f.name] = pc.cast(pa.array(values, pa.string()), f.type)
                else:
                    columns[f.name] = pa.array(values, f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise self._misfit(chunk, f.name, values, f.type, str(exc)) from None
        columns[CUSTOM_VARS] = pa.array([
            orjson.dumps({k: v for k, v in e.items() if k not in self.known_names and v is not None},
                         option=orjson.OPT_SORT_KEYS).decode() for e in events], pa.string())
        return pa.table(columns)

    def canonical(self, key: str) -> str:
        """The known column a field name stands for, matched case-insensitively; else the name itself."""
        return key if key in self.known_names else self.known_by_lower.get(key.lower(), key)

    def convert(self, table: pa.Table) -> pa.RecordBatch:
        import pyarrow as pa
        import pyarrow.compute as pc

        table = table.combine_chunks()
        n = table.num_rows
        columns: dict[str, list[str]] = {}  # known column -> the parsed columns holding it
        for name in table.column_names:
            columns.setdefault(self.canonical(name), []).append(name)
        arrays: list[pa.Array] = []
        for f in self.known:
            parts = []
            for name in columns.get(f.name, []):
                col = table[name].combine_chunks() if table[name].num_chunks else pa.nulls(n, f.type)
                if not col.type.equals(f.type):
                    try:
                        col = pc.cast(col, f.type, safe=not pa.types.is_timestamp(f.type))
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise _BadColumn(name, f.type, col, str(exc)) from None
                parts.append(col)
            arrays.append(pc.coalesce(*parts) if len(parts) > 1 else parts[0] if parts else pa.nulls(n, f.type))
        if CUSTOM_VARS in table.column_names:  # built by parse_rows
            arrays.append(table[CUSTOM_VARS].combine_chunks())
        else:
            arrays.append(custom_vars(table, sorted(c for c in table.column_names if self.canonical(c) not in
                                                    self.known_names)))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


class _EventError(SourceError):
    """An event at fault: its line in its chunk (0-based) and what is wrong (`batches` adds where)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line + 1} of a chunk: {message}")
        self.line, self.message = line, message


class _BadColumn(Exception):
    """A parsed column that does not cast to its known type (the caller finds the event at fault)."""

    def __init__(self, name: str, type_: pa.DataType, values: pa.Array, detail: str) -> None:
        super().__init__(detail)
        self.name, self.type, self.values, self.detail = name, type_, values, detail


def _first_misfit(values: list[Any], type_: pa.DataType) -> int:
    """The index of the first value that does not convert to `type_` (0 if none is found alone)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, value in enumerate(values):
        if value is None:
            continue
        try:
            array = pa.array([value])
            pc.cast(array, type_, safe=not (pa.types.is_timestamp(type_) and pa.types.is_timestamp(array.type)))
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            return i
    return 0


def _line_of(chunk: bytes, row: int) -> int:
    """The line of the chunk (0-based) that holds its `row`-th event: blank lines hold none."""
    seen = -1
    for i, line in enumerate(chunk.split(b"\n")):
        if line.strip():
            seen += 1
            if seen == row:
                return i
    return 0


def _fragment(key: str, col: pa.Array) -> pa.Array:
    """`key` followed by each value as JSON text (`key` is `,"name":`); null where the value is null.
    Vectorised for scalars (`parse` never leaves a timestamp here); strings holding control characters
    and nested values go through orjson."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if not pc.any(pc.match_substring_regex(col, r'[\x00-\x1f"\\]')).as_py():  # nothing to escape
            return pc.binary_join_element_wise(key + '"', col, '"', "")
        if not pc.any(pc.match_substring_regex(col, r"[\x00-\x1f]")).as_py():  # only quotes and backslashes
            escaped = pc.replace_substring(pc.replace_substring(col, "\\", "\\\\"), '"', '\\"')
            return pc.binary_join_element_wise(key + '"', escaped, '"', "")
    elif pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        return pc.binary_join_element_wise(key, pc.cast(col, pa.string()), "")
    values = pa.array([None if v is None else orjson.dumps(v, default=str).decode() for v in col.to_pylist()],
                      pa.string())
    return pc.binary_join_element_wise(key, values, "")


def custom_vars(table: pa.Table, names: list[str]) -> pa.Array:
    """`{"name": value, ...}` per row over `names` (already sorted), skipping nulls; `{}` if none.

    Custom vars are sparse, so only set values are rendered: each becomes `,"name":value`; the pieces
    are ordered by row (a stable sort keeps the names' order within a row), joined per row, the
    leading comma replaced by `{` and `}` appended, and the rows that have any are put in place."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    rows, pieces = [], []
    for name in names:
        col = table[name].combine_chunks()
        if pa.types.is_null(col.type) or col.null_count == n:
            continue
        valid = col.is_valid()
        rows.append(pc.cast(pc.indices_nonzero(valid), pa.int64()))
        pieces.append(_fragment("," + orjson.dumps(name).decode() + ":", col.filter(valid)).cast(pa.string()))
    if not rows:
        return pa.repeat(pa.scalar("{}", pa.string()), n)
    row = pa.concat_arrays(rows)
    order = pc.sort_indices(row)
    row_of = row.take(order).to_numpy()
    starts = np.flatnonzero(np.diff(row_of, prepend=-1))  # where each row's pieces begin
    joined = pc.binary_join(pa.ListArray.from_arrays(
        pa.array(np.append(starts, len(row_of)), pa.int32()), pa.concat_arrays(pieces).take(order)), "")
    objects = pc.binary_join_element_wise(pc.binary_replace_slice(joined, start=0, stop=1, replacement="{"), "}", "")
    has_vars = np.zeros(n, dtype=bool)
    has_vars[row_of[starts]] = True
    return pc.replace_with_mask(pa.repeat(pa.scalar("{}", pa.string()), n), pa.array(has_vars), objects)
