"""The Singer target's fast path: a run of raw RECORD lines of one stream converted by DuckDB.

The target hands a contiguous run of lines that start like a RECORD of a known stream
(`{"type":"RECORD","stream":"NAME",` as orjson and floe's tap write it, or with `json.dumps`' spaces)
to DuckDB's newline-delimited JSON reader, which parses them on every core and gives each property
of the record as a JSON value; SQL then checks and converts them column by column. The fast path
only takes a run it can prove the per-record path (`convert.Converter`) turns into the same rows:
every line must be one JSON object, `type` exactly RECORD of this stream, no `version`, a `record`
object without repeated keys, and every value of the plain form below. Anything else (a value of
another type, a big or non-finite number, a date-time without offset, an escaped surrogate or NUL,
a column kind it does not handle, a DuckDB error) and `convert` returns None: the caller sends the
whole run through the per-record path, so the output, and every error, is the existing one.

Per kind, what the fast path takes (null or missing is null everywhere; a column that is not
nullable or is required must have a value in every record):
- integer: a JSON integer in 64 bits; number: such an integer or a finite JSON float (not a decimal);
- boolean, string: that JSON type;
- date-time: a string `YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+HH:MM|-HH:MM)`; date: `YYYY-MM-DD` (a valid day);
- json: any JSON type the schema allows; its text is then orjson's dump of orjson's parse of DuckDB's
  text of the value, which is the value the record held.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from floe.apps.singer.schema import Column

log = logging.getLogger("floe.singer.target")

MIN_RUN = 1_000  # shorter runs go through the per-record path (a DuckDB query costs milliseconds)
KINDS = frozenset({"integer", "number", "boolean", "string", "date-time", "date", "json"})
# Escapes after which DuckDB's and orjson's reading of a string may differ: surrogates and NUL.
UNSAFE = re.compile(rb"[dD][89a-fA-F]|0000")
DATE_TIME = (r"[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
             r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
SCAN = 1 << 18  # bytes of a run scanned at a time
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
JSON_TYPES = {"object": ("OBJECT",), "array": ("ARRAY",), "string": ("VARCHAR",), "boolean": ("BOOLEAN",),
              "integer": ("BIGINT", "UBIGINT"), "number": ("BIGINT", "UBIGINT", "DOUBLE")}


def record_prefixes(stream: str) -> tuple[bytes, ...]:
    """How a RECORD line of `stream` starts when its writer puts `type` and `stream` first."""
    name = orjson.dumps(stream)
    return b'{"type":"RECORD","stream":' + name + b",", b'{"type": "RECORD", "stream": ' + name + b", "


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def supported(columns: list[Column]) -> bool:
    """Whether the fast path handles every column of the stream."""
    names = [c.name.lower() for c in columns]  # DuckDB's struct fields are case-insensitive
    return bool(columns) and len(set(names)) == len(names) and all(
        c.kind in KINDS and c.scale is None for c in columns)


def _select(c: Column) -> tuple[str, str]:
    """The SQL value of column `c` (from `v`, its JSON value) and the condition it is fast-path safe.

    `x`, the value's JSON text as DuckDB's reader wrote it (yyjson, minified: an integer in plain digits,
    a string in quotes with only quotes, backslashes and control characters escaped), is checked with
    string functions where that proves the type, instead of parsing it again (json_type)."""
    v = f"struct_extract(record, {_literal(c.name)})"
    t = f"json_type({v})"
    s = f"({v} ->> '$')"
    x = f"CAST({v} AS VARCHAR)"
    if c.kind == "integer":
        value = f"TRY_CAST({x} AS BIGINT)"
        ok = f"regexp_full_match({x}, '-?[0-9]+') AND {value} IS NOT NULL"
    elif c.kind == "number":
        value = f"TRY_CAST({v} AS DOUBLE)"
        ok = (f"({t} = 'DOUBLE' AND isfinite(TRY_CAST({v} AS DOUBLE)))"
              f" OR ({t} IN ('BIGINT', 'UBIGINT') AND TRY_CAST({v} AS BIGINT) IS NOT NULL)")
    elif c.kind == "boolean":
        value, ok = f"{x} = 'true'", f"{x} IN ('true', 'false')"
    elif c.kind == "string":
        value, ok = s, f"starts_with({x}, '\"')"
    elif c.kind in ("date-time", "date"):  # (their characters are never escaped: the text is the quoted value)
        value = f"TRY_CAST({s} AS {'TIMESTAMPTZ' if c.kind == 'date-time' else 'DATE'})"
        pattern = _literal('"' + (DATE_TIME if c.kind == "date-time" else DATE) + '"')
        ok = f"regexp_full_match({x}, {pattern}) AND NOT starts_with({x}, '\"0000') AND {value} IS NOT NULL"
    else:  # json
        value = f"CAST({v} AS VARCHAR)"
        types = sorted({name for kind in c.allowed for name in JSON_TYPES.get(kind, ("?",))})
        ok = f"{t} IN ({', '.join(map(_literal, types))})" if c.allowed else "TRUE"
    missing = "FALSE" if (c.required or not c.nullable) else f"{v} IS NULL"
    return value, f"COALESCE({missing} OR ({ok}), FALSE)"


class FastPath:
    """In-memory DuckDBs (one per worker thread) that convert runs of RECORD lines; counts the runs
    they took and refused. `convert` may run in several threads at once."""

    WORKERS = 2  # runs converted at once (each query also runs on DuckDB's threads)

    def __init__(self, min_run: int = MIN_RUN) -> None:
        self.min_run = min_run  # runs of fewer lines go through the per-record path
        self._local = threading.local()  # each thread's connection
        self._conns: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self.taken = 0  # runs converted here
        self.records = 0  # records in them
        self.refused = 0  # runs left to the per-record path (of at least MIN_RUN lines)

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns = []
            self._local = threading.local()

    def _connection(self) -> duckdb.DuckDBPyConnection:
        conn: duckdb.DuckDBPyConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = duckdb.connect(":memory:")
            conn.execute("SET TimeZone = 'UTC'")
            with self._lock:
                self._conns.append(conn)
        return conn

    def convert(self, stream: str, columns: list[Column], schema: pa.Schema,
                lines: list[bytes], folder: Path) -> pa.RecordBatch | None:
        """The rows of `lines` as the per-record path would convert them, or None (take that path)."""
        if len(lines) < self.min_run or not supported(columns):
            return None
        data = b"".join(lines)
        newlines, escapes = _scan(data)
        if not data.endswith(b"\n") or newlines != len(lines):  # one line each, as a file's lines
            data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
            escapes = _scan(data)[1]
        reason = _unsafe_escape(data, escapes)  # (DuckDB refuses bytes that are not UTF-8)
        batch = None
        if reason is None:
            batch, reason = self._convert(stream, columns, schema, data, len(lines), folder)
        with self._lock:
            if batch is None:
                self.refused += 1
            else:
                self.taken += 1
                self.records += len(lines)
        if batch is None:
            log.debug("stream %s: %d records through the per-record path: %s", stream, len(lines), reason)
        return batch

    def _convert(self, stream: str, columns: list[Column], schema: pa.Schema, data: bytes,
                 count: int, folder: Path) -> tuple[pa.RecordBatch | None, str]:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".jsonl", prefix="floe-fast-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            fields = ", ".join(f"{_ident(c.name)} JSON" for c in columns)
            spec = {"type": "VARCHAR", "stream": "VARCHAR", "version": "JSON", "record": f"STRUCT({fields})"}
            selects = [_select(c) for c in columns]
            envelope = (f"COALESCE(type = 'RECORD' AND stream = {_literal(stream)} AND version IS NULL"
                        " AND record IS NOT NULL, FALSE)")
            oks = " AND ".join([envelope, *(ok for _, ok in selects)])
            values = ", ".join(f"{value} AS c{i}" for i, (value, _) in enumerate(selects))
            query = (f"SELECT {oks} AS ok, {values} FROM read_json({_literal(name)}, format = 'newline_delimited', "
                     f"columns = {_struct_literal(spec)}, maximum_object_size = 1073741824)")
            try:
                table = self._connection().sql(query).to_arrow_table()
            except duckdb.Error as exc:
                return None, f"DuckDB: {str(exc).splitlines()[0][:200]}"
        finally:
            os.unlink(name)
        if table.num_rows != count:
            return None, f"DuckDB read {table.num_rows} rows of {count} lines"
        if not pc.all(table.column("ok")).as_py():
            return None, "a record the fast path cannot prove"
        arrays = []
        for i, (c, target) in enumerate(zip(columns, schema, strict=True)):
            array = table.column(f"c{i}").combine_chunks()
            if c.kind == "json":
                try:
                    array = _json_texts(array.to_pylist())
                except orjson.JSONDecodeError:
                    return None, f"a JSON value of {c.name} orjson does not read"
            arrays.append(array.cast(target.type))
        return pa.RecordBatch.from_arrays(arrays, schema=schema), ""


def _scan(data: bytes) -> tuple[int, list[int]]:
    """The newlines in `data` and where each backslash-u starts. (numpy, a slice at a time: ~5 ms for a
    50,000-line run against ~25 with bytes.count and find, outside the GIL, no temporaries of the run's size.)"""
    codes = np.frombuffer(data, np.uint8)
    newlines, escapes = 0, []
    for start in range(0, len(codes), SCAN):
        part = codes[start:start + SCAN + 1]  # one byte more: a backslash's next
        newlines += int(np.count_nonzero(part[:SCAN] == 0x0A))
        backslashes = np.flatnonzero(part[:-1] == 0x5C)
        if len(backslashes):
            escapes += (backslashes[part[backslashes + 1] == 0x75] + start).tolist()
    return newlines, escapes


def _unsafe_escape(data: bytes, escapes: list[int]) -> str | None:
    """Why the text of `data` (`escapes`: where its backslash-u are) may read differently in DuckDB (None: it may not)."""
    for at in escapes:
        if UNSAFE.match(data, at + 2):
            return f"{data[at:at + 6].decode(errors='replace')} in a string"
    return None


def _json_texts(texts: list[str | None]) -> pa.Array:
    loads, dumps = orjson.loads, orjson.dumps
    return pa.array([None if t is None else dumps(loads(t)).decode() for t in texts], pa.string())


def _struct_literal(spec: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in spec.items()) + "}"
