"""Turning a downloaded FullStory export file (gzip NDJSON or one JSON array) into Arrow batches.

Memory stays flat whatever the file size: the gzip is decompressed in pieces, cut at event
boundaries into chunks of about `chunk_bytes`, and each chunk is parsed by pyarrow's JSON reader
(vectorised, int64 kept exact) into a batch with every known column in schema order plus
`CustomVars`: a JSON object (keys sorted) of every field that is not a known column.
"""

from __future__ import annotations

import io
import re
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from isal import isal_zlib

from floe.errors import SourceError

CUSTOM_VARS = "CustomVars"
# The system allocator hands freed memory back; Arrow's default pools keep it (RSS would creep).
POOL = pa.system_memory_pool()
# One element of a JSON array of (at most two-level nested) objects; strings may hold braces.
_STRING = rb'"(?:[^"\\]|\\.)*"'
_FLAT = rb"\{(?:[^{}\"]|" + _STRING + rb")*\}"
_ELEMENT = re.compile(rb"\{(?:[^{}\"]|" + _STRING + rb"|" + _FLAT + rb")*\}", re.S)
_SEPARATORS = re.compile(rb"[\s,\[\]]*")


def _parse_type(t: pa.DataType) -> pa.DataType:
    """What the JSON reader parses a column as: times in ns (any RFC3339 precision), ints as int64."""
    if pa.types.is_timestamp(t):
        return pa.timestamp("ns", tz="UTC")
    if pa.types.is_integer(t):
        return pa.int64()
    return t


class ExportReader:
    """Reads one export file into Arrow batches of `schema` (its last field is CustomVars)."""

    def __init__(self, schema: pa.Schema, fmt: str, chunk_bytes: int = 2 << 20, workers: int = 2) -> None:
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
        # Known fields seen in the events so far: only these are declared to the JSON reader, since
        # each declared field that never occurs costs time on every row (~0.5 µs/event for hauser's 58).
        self._declared: set[str] = set()

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
    def batches(self, path: Path) -> Iterator[pa.RecordBatch]:
        """The file's batches in file order. Chunks are cut on this thread and parsed on `workers`
        threads (pyarrow releases the GIL while parsing), at most `workers` chunks ahead."""
        chunks = self._ndjson_chunks(path) if self.fmt == "FORMAT_NDJSON" else self._array_chunks(path)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fullstory-parse") as pool:
            pending: deque[Future[pa.RecordBatch]] = deque()
            try:
                for chunk in chunks:
                    pending.append(pool.submit(self.batch, chunk))
                    if len(pending) > self.workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def batch(self, chunk: bytes) -> pa.RecordBatch:
        """One chunk of whole events as one batch of `schema`."""
        return self.convert(self.parse(chunk))

    def parse(self, chunk: bytes) -> pa.Table:
        """Parse the chunk as one block without pyarrow's own threads (`batches` runs chunks side
        by side instead): one block needs no reconciling of types or concatenating of chunks
        (about 20% less CPU than 1 MB blocks on pyarrow's threads). Safe on several threads."""
        while True:
            declared = pa.schema([f for f in self.parse_schema if f.name in self._declared])
            options = pj.ParseOptions(explicit_schema=declared, unexpected_field_behavior="infer")
            try:
                table = pj.read_json(io.BytesIO(chunk), read_options=pj.ReadOptions(
                    block_size=len(chunk) + 1, use_threads=False), parse_options=options, memory_pool=POOL)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                table = None
            # A known field met for the first time was typed by inference: declare it and parse again,
            # so that known columns always get their declared type (exact int64, timestamps).
            new = {f.name for f in self.known if f.name not in self._declared} & set(
                table.column_names if table is not None else self.known_names)
            if not new:
                return table if table is not None else self.parse_rows(chunk)
            self._declared = self._declared | new  # a new set: other workers may be reading the old one

    def parse_rows(self, chunk: bytes) -> pa.Table:
        """The slow path, one event at a time with orjson: for chunks pyarrow cannot type (e.g. a
        custom var holding a list of mixed types). Returns the known columns plus CustomVars."""
        try:
            events = [orjson.loads(line) for line in chunk.splitlines() if line.strip()]
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"export file: cannot parse events: {exc}") from None
        events = [{self.canonical(k): v for k, v in e.items()} for e in events]
        columns: dict[str, pa.Array] = {}
        for f in self.parse_schema:
            values = [e.get(f.name) for e in events]
            try:
                if pa.types.is_timestamp(f.type):
                    columns[f.name] = pc.cast(pa.array(values, pa.string()), f.type)
                else:
                    columns[f.name] = pa.array(values, f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise SourceError(f"export file: field {f.name}: {exc}") from None
        columns[CUSTOM_VARS] = pa.array([
            orjson.dumps({k: v for k, v in e.items() if k not in self.known_names and v is not None},
                         option=orjson.OPT_SORT_KEYS).decode() for e in events], pa.string())
        return pa.table(columns)

    def canonical(self, key: str) -> str:
        """The known column a field name stands for, matched case-insensitively; else the name itself."""
        return key if key in self.known_names else self.known_by_lower.get(key.lower(), key)

    def convert(self, table: pa.Table) -> pa.RecordBatch:
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
                        raise SourceError(f"export file: field {name} is not a {f.type}: {exc}") from None
                parts.append(col)
            arrays.append(pc.coalesce(*parts) if len(parts) > 1 else parts[0] if parts else pa.nulls(n, f.type))
        if CUSTOM_VARS in table.column_names:  # built by parse_rows
            arrays.append(table[CUSTOM_VARS].combine_chunks())
        else:
            arrays.append(custom_vars(table, sorted(c for c in table.column_names if self.canonical(c) not in
                                                    self.known_names)))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _fragment(key: str, col: pa.Array) -> pa.Array:
    """`key` followed by each value as JSON text (`key` is `"name":`); null where the value is null.
    Vectorised for scalars; strings that need escaping and nested values go through orjson."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if not pc.any(pc.match_substring_regex(col, r'[\x00-\x1f"\\]')).as_py():  # nothing to escape
            return pc.binary_join_element_wise(key + '"', col, '"', "")
    elif pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        return pc.binary_join_element_wise(key, pc.cast(col, pa.string()), "")
    elif pa.types.is_timestamp(t):
        return pc.binary_join_element_wise(key + '"', pc.strftime(col, "%Y-%m-%dT%H:%M:%S.%fZ"), '"', "")
    values = pa.array([None if v is None else orjson.dumps(v, default=str).decode() for v in col.to_pylist()],
                      pa.string())
    return pc.binary_join_element_wise(key, values, "")


def custom_vars(table: pa.Table, names: list[str]) -> pa.Array:
    """`{"name": value, ...}` per row over `names` (already sorted), skipping nulls; `{}` if none."""
    n = table.num_rows
    fragments = []
    for name in names:
        col = table[name].combine_chunks()
        if pa.types.is_null(col.type) or col.null_count == n:
            continue
        fragments.append(_fragment(orjson.dumps(name).decode() + ":", col))
    if not fragments:
        return pa.array(["{}"] * n, pa.string())
    if len(fragments) == 1:  # pyarrow 26 drops rows when joining a single array with null_handling="skip"
        body = pc.fill_null(fragments[0], "")
    else:
        body = pc.binary_join_element_wise(*fragments, ",", null_handling="skip")
    return pc.binary_join_element_wise("{", body, "}", "")
