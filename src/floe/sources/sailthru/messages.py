"""Sailthru message files (message_blast, message_transactional) as Arrow: parse, keep, explode.

A chunk of whole lines is parsed by pyarrow's JSON reader (in C, multi-threaded) with an explicit
schema. Keys the schema does not name are inferred as extra columns: Arrow kernels find the rows
holding a value there, and only those lines are read again, by orjson, into the `extra` column.
Each message is exploded into one row per open or click with Arrow compute kernels. A line
pyarrow refuses is found by bisecting the chunk, so an error names `file:line` (counted from 1)
and the field.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from floe.core.destination import json_field
from floe.core.errors import SourceError
from floe.infra.pii import Pii
from floe.sources.sailthru.files import ExportFile, line_chunks

TS = pa.timestamp("ms", "UTC")
POOL = pa.system_memory_pool()
EXTRA = json_field("extra")  # the keys of a line floe does not read, as one JSON object

_DATE = pa.struct([pa.field("$date", pa.int64())])
_OPENS = pa.list_(pa.struct([pa.field("ts", _DATE)]))
_CLICKS = pa.list_(pa.struct([pa.field("url", pa.string()), pa.field("ts", _DATE)]))
ACTION_FIELDS = [pa.field("action_name", pa.string()), pa.field("action_ts", TS), pa.field("action_url", pa.string())]
_ACTION_KEYS = {"opens": frozenset({"ts"}), "clicks": frozenset({"url", "ts"})}


def localize(values: pa.Array, zone: str) -> pa.Array:
    """Naive timestamps read in `zone` -> UTC timestamps (a repeated autumn hour: its first time)."""
    if pa.types.is_timestamp(values.type) and values.type.tz is None and zone != "UTC":
        values = pc.assume_timezone(values, zone, ambiguous="earliest", nonexistent="earliest")
    return values.cast(TS)


def message_schema(base_fields: list[pa.Field]) -> pa.Schema:
    """The table's columns: the message fields (send_time in UTC), `extra`, the action fields."""
    return pa.schema([f.with_type(TS) if f.name == "send_time" else f for f in base_fields] + [EXTRA, *ACTION_FIELDS])


class MessageReader:
    """Reads one collection's message files into exploded batches of `schema`."""

    def __init__(self, base_fields: list[pa.Field], schema: pa.Schema, zone: str, pii: Pii, block_bytes: int) -> None:
        self.parsed = pa.schema([*base_fields, pa.field("opens", _OPENS), pa.field("clicks", _CLICKS)])
        # "infer": keys the schema does not name become columns too, so that the rows holding any
        # are found with Arrow kernels; only those lines are read again by Python.
        self.inferring = pj.ParseOptions(explicit_schema=self.parsed, unexpected_field_behavior="infer")
        self.lenient = pj.ParseOptions(explicit_schema=self.parsed, unexpected_field_behavior="ignore")
        self.read_options = pj.ReadOptions(block_size=max(1 << 16, block_bytes // 4))
        self.known = frozenset(self.parsed.names)
        self.schema, self.zone, self.pii, self.block_bytes = schema, zone, pii, block_bytes

    def parse(self, data: bytes, options: pj.ParseOptions) -> pa.Table:
        return pj.read_json(pa.py_buffer(data), read_options=self.read_options, parse_options=options,
                            memory_pool=POOL)

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        # Whole-line chunks parsed one at a time (pyarrow's streaming reader grew to ~100 MB more
        # within a large file); the chunk's first line number makes errors exact without re-reading.
        with f.arrow_stream() as stream:
            for first_line, chunk in line_chunks(stream, self.block_bytes):
                table = self.read_chunk(f.name, first_line, chunk).combine_chunks()
                for batch in table.to_batches():
                    yield from explode(batch, self.zone, self.schema, self.pii).to_batches()

    def read_chunk(self, name: str, first_line: int, chunk: bytes) -> pa.Table:
        """The chunk's columns of `parsed` plus `extra` (see `unread_values`)."""
        rows: list[int] | None = None  # the rows holding values floe does not read (None: maybe any)
        try:
            table = self.parse(chunk, self.inferring)
            if table.schema.equals(self.parsed):  # the common case: no Python per line at all
                return table.append_column(EXTRA, pa.nulls(table.num_rows, pa.string()))
            mask = unread_mask(table.combine_chunks().to_struct_array().combine_chunks(), self.parsed)
            rows = [] if mask is None else pc.indices_nonzero(mask).to_pylist()
            table = table.select(self.parsed.names)
            if not rows:  # unread keys, but only ever null
                return table.append_column(EXTRA, pa.nulls(table.num_rows, pa.string()))
        except pa.ArrowInvalid:  # a bad line, or keys floe does not read whose types vary from line to line
            try:
                table = self.parse(chunk, self.lenient)
            except pa.ArrowInvalid as exc:
                raise self.locate(name, first_line, chunk, exc) from None
        lines = [line for line in chunk.split(b"\n") if line.strip()]
        if len(lines) != table.num_rows:
            raise self.locate(name, first_line, chunk, None)
        extra: list[str | None] = [None] * len(lines)
        try:
            for i in range(len(lines)) if rows is None else rows:
                extra[i] = unread_values(orjson.loads(lines[i]), self.known)
        except orjson.JSONDecodeError as exc:
            raise self.locate(name, first_line, chunk, exc) from None
        return table.append_column(EXTRA, pa.array(extra, pa.string()))

    def locate(self, name: str, first_line: int, chunk: bytes, error: Exception | None) -> SourceError:
        """The error of the first line of `chunk` that is not a JSON object or that pyarrow refuses."""
        numbered = [(n, line) for n, line in enumerate(chunk.split(b"\n"), first_line) if line.strip()]
        for number, line in numbered:
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                return SourceError(f"{name}:{number}: not valid JSON ({exc})")
            if not isinstance(value, dict):
                return SourceError(f"{name}:{number}: expected a JSON object, got {type(value).__name__}")
        lo, hi = 0, len(numbered)  # every line is an object: bisect for the first one pyarrow refuses
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._refusal(b"\n".join(line for _, line in numbered[lo:mid])) is None:
                lo = mid
            else:
                hi = mid
        if numbered and (refusal := self._refusal(numbered[lo][1])) is not None:
            return SourceError(f"{name}:{numbered[lo][0]}: {self._describe(numbered[lo][1], refusal)}")
        span = f"{numbered[0][0]}-{numbered[-1][0]}" if numbered else str(first_line)
        return SourceError(f"{name}:{span}: {_clean(str(error)) if error else 'lines and rows do not match'}")

    def _refusal(self, data: bytes) -> str | None:
        try:
            self.parse(data, self.lenient)
        except pa.ArrowInvalid as exc:
            return str(exc)
        return None

    def _describe(self, line: bytes, refusal: str) -> str:
        """`field <name>: <what is wrong>` for one line pyarrow refused."""
        path = re.search(r"Column\(/([^)]*)\)", refusal)
        if path:
            return f"field {path.group(1).replace('/[]', '[]').replace('/', '.')}: {_clean(refusal)}"
        schema = self.lenient.explicit_schema
        for f in schema:  # pyarrow did not say which field: try them one by one
            try:
                pj.read_json(pa.py_buffer(line), parse_options=pj.ParseOptions(
                    explicit_schema=pa.schema([f]), unexpected_field_behavior="ignore"))
            except pa.ArrowInvalid:
                return f"field {f.name}: {_clean(refusal)}"
        return _clean(refusal)


def _clean(message: str) -> str:
    """pyarrow's words for a refused value, without its row numbers (they count within a block)."""
    message = message.removeprefix("JSON parse error: ")
    message = re.sub(r"Column\(/[^)]*\) changed from (\w+) to (\w+) in row \d+", r"expected \1, got \2", message)
    return re.sub(r"Failed to convert JSON to (\S+), couldn't parse:", r"expected \1, got ", message)


def unread_values(doc: dict[str, Any], known: frozenset[str]) -> str | None:
    """The line's non-null values at keys floe does not read, as one JSON object (None: there are
    none). An `opens`/`clicks` list whose actions carry such values is kept whole."""
    rest = {k: v for k, v in doc.items() if k not in known and v is not None}
    for name, keys in _ACTION_KEYS.items():
        actions = doc.get(name)
        if isinstance(actions, list) and any(_unread_action(a, keys) for a in actions):
            rest[name] = actions
    return orjson.dumps(rest).decode() if rest else None


def _unread_action(action: Any, keys: frozenset[str]) -> bool:
    if not isinstance(action, dict):
        return False
    ts = action.get("ts")
    return any(v is not None for k, v in action.items() if k not in keys) or (
        isinstance(ts, dict) and any(v is not None for k, v in ts.items() if k != "$date"))


def unread_mask(values: pa.Array, want: pa.DataType | pa.Schema) -> pa.Array | None:
    """Per value of `values` (as pyarrow inferred it): does it hold a non-null value where `want`
    has no field? None when it holds none anywhere."""
    if isinstance(want, pa.Schema):
        want = pa.struct(list(want))
    if values.type.equals(want):
        return None
    masks: list[pa.Array] = []
    if pa.types.is_struct(values.type) and pa.types.is_struct(want):
        for i, f in enumerate(values.type):
            child = pc.struct_field(values, [i])
            index = want.get_field_index(f.name)
            mask = pc.is_valid(child) if index < 0 else unread_mask(child, want.field(index).type)
            if mask is not None:
                masks.append(mask)
    elif pa.types.is_list(values.type) and pa.types.is_list(want):
        inner = unread_mask(pc.list_flatten(values), want.value_type)
        if inner is not None:
            hit = np.zeros(len(values), dtype=bool)
            hit[pc.filter(pc.list_parent_indices(values), inner).to_numpy()] = True
            masks.append(pa.array(hit))
    if not masks:
        return None
    return functools.reduce(lambda a, b: pc.or_kleene(a, b), masks)


def explode(batch: pa.RecordBatch, zone: str, schema: pa.Schema, pii: Pii) -> pa.Table:
    """Message lines -> one row per action (or one bare row), send_time in UTC, addresses scrubbed."""
    names = [n for n in batch.schema.names if n not in ("opens", "clicks")]
    columns = [
        localize(batch.column(n), zone) if n == "send_time"
        else pii.scrub_array(batch.column(n)) if pa.types.is_string(batch.schema.field(n).type) and pii.mode != "keep"
        else batch.column(n)
        for n in names
    ]
    base = pa.Table.from_arrays(columns, names=names)
    parts: list[pa.Table] = []
    for action, column in (("open", "opens"), ("click", "clicks")):
        lists = batch.column(column)
        flat = pc.list_flatten(lists)
        n = len(flat)
        if not n:
            continue
        ts = pc.struct_field(pc.struct_field(flat, "ts"), "$date").cast(TS)
        url = pc.struct_field(flat, "url") if action == "click" else pa.nulls(n, pa.string())
        if action == "click" and pii.mode != "keep":
            url = pii.scrub_array(url)
        rows = base.take(pc.list_parent_indices(lists))
        parts.append(
            rows.append_column("action_name", pa.repeat(pa.scalar(action), n))
            .append_column("action_ts", ts).append_column("action_url", url)
        )
    bare = pc.and_(
        pc.equal(pc.fill_null(pc.list_value_length(batch.column("opens")), 0), 0),
        pc.equal(pc.fill_null(pc.list_value_length(batch.column("clicks")), 0), 0),
    )
    rows = base.filter(bare)
    n = rows.num_rows
    if n or not parts:
        parts.append(
            rows.append_column("action_name", pa.nulls(n, pa.string()))
            .append_column("action_ts", pa.nulls(n, TS)).append_column("action_url", pa.nulls(n, pa.string()))
        )
    return pa.concat_tables(parts).cast(schema)
