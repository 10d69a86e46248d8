"""Singer records (dicts) -> Arrow record batches, validated in bulk.

Each column is converted with one vectorised Arrow call; a type, format, null or `required`
violation is then located with a per-value scan of that column only, so valid input never pays
for per-record validation. Checks: JSON type of every value (integer, number, boolean, string,
object/array), RFC 3339 `date-time`/`date` strings, nulls where the schema has no `null`, and
`required` properties. Properties the schema does not declare are ignored.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from floe.apps.singer.schema import ARROW_TYPES, Column
from floe.core.errors import SourceError


class RecordError(SourceError):
    """A record violates its stream's schema. Names the stream, the record number and the field."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def parse_datetime(value: str) -> datetime:
    """An RFC 3339 / ISO 8601 timestamp as an aware UTC datetime (no offset: taken as UTC)."""
    moment = datetime.fromisoformat(value)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_date(value: str) -> date:
    if len(value) > 10:  # a timestamp in a date column: keep its date (taps often send midnight stamps)
        return parse_datetime(value).date()
    return date.fromisoformat(value)


def _problem(value: Any, column: Column) -> str | None:
    """Why `value` does not fit `column` (None: it fits)."""
    if value is None:
        return None if column.nullable else "null is not allowed"
    kind = _json_type(value)
    if column.allowed and kind not in column.allowed and not (kind == "integer" and "number" in column.allowed):
        want = " or ".join(sorted(column.allowed))
        return f"expected {want}, got {kind} {orjson.dumps(value).decode()[:80]}"
    if column.kind in ("date-time", "date", "time") and isinstance(value, str):
        try:
            {"date-time": parse_datetime, "date": parse_date, "time": time.fromisoformat}[column.kind](value)
        except ValueError:
            return f"{value[:80]!r} is not a valid {column.kind}"
    if column.kind == "integer" and isinstance(value, int) and not -(2**63) <= value < 2**63:
        return f"{value} does not fit in 64 bits"
    return None


_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,), "integer": (int,),
    "number": (int, float),
}


def _python_types(allowed: frozenset[str]) -> set[type] | None:
    """The Python types JSON values of the `allowed` JSON types parse to (None: any)."""
    if not allowed:
        return None
    return {t for name in allowed for t in _PYTHON_TYPES.get(name, ())}


class Converter:
    """Converts lists of record dicts for one stream's columns."""

    def __init__(self, stream: str, columns: list[Column]) -> None:
        self.stream = stream
        self.columns = columns
        self.schema = pa.schema([c.arrow_field() for c in columns])

    def fail(self, number: int, column: Column, problem: str) -> RecordError:
        return RecordError(f"stream {self.stream}, record {number}: field {column.name!r}: {problem}")

    def batch(self, rows: list[dict[str, Any]], first_number: int) -> pa.RecordBatch:
        """Rows -> one record batch. `first_number` is the 1-based record number of rows[0] in its stream."""
        arrays = [self._column(rows, c, first_number) for c in self.columns]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _scan(self, values: list[Any], column: Column, first_number: int) -> RecordError:
        for i, value in enumerate(values):
            problem = _problem(value, column)
            if problem:
                return self.fail(first_number + i, column, problem)
        return self.fail(first_number, column, "values could not be converted")

    def _column(self, rows: list[dict[str, Any]], c: Column, first: int) -> pa.Array:
        name = c.name
        values = [r.get(name) for r in rows]
        try:
            array = self._convert(values, c)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError):
            raise self._scan(values, c, first) from None
        if array is None:
            raise self._scan(values, c, first)
        if array.null_count and (not c.nullable or c.required):
            for i in pc.indices_nonzero(array.is_null()).to_pylist():
                present = name in rows[i]
                if c.required and not present:
                    raise self.fail(first + i, c, "required property is missing")
                if present and not c.nullable and values[i] is None:
                    raise self.fail(first + i, c, "null is not allowed")
                if values[i] is not None:  # converted to null: not a valid value
                    raise self._scan(values, c, first)
        return array

    @staticmethod
    def _convert(values: list[Any], c: Column) -> pa.Array | None:
        """The Arrow array of `values`, or None / an exception if some value does not fit."""
        kind = c.kind
        target = c.arrow_type if kind in ARROW_TYPES else pa.string()
        if kind in ("integer", "number"):
            array = pa.array(values)
            t = array.type
            if pa.types.is_null(t):
                return array.cast(target)
            if pa.types.is_integer(t):
                return array.cast(target)
            if pa.types.is_floating(t):
                if kind == "number":
                    return array.cast(target)  # a decimal: to its places (floats print as written)
                if pc.all(pc.equal(array, pc.floor(array))).as_py() is not False:
                    return array.cast(target, safe=False)
                return None
            return None
        if kind in ("boolean", "string"):
            return pa.array(values, target)
        if kind == "json":
            allowed = _python_types(c.allowed)
            dumps = orjson.dumps
            out: list[str | None] = []
            append = out.append
            for v in values:
                if v is None:
                    append(None)
                elif allowed is None or type(v) in allowed:
                    append(dumps(v).decode())
                else:
                    return None
            return pa.array(out, pa.string())
        if kind == "text":
            types = c.allowed
            text: list[str | None] = []
            for v in values:
                if v is None or isinstance(v, str):
                    if v is not None and types and "string" not in types:
                        return None
                    text.append(v)
                else:
                    kind_of = _json_type(v)
                    if types and kind_of not in types and not (kind_of == "integer" and "number" in types):
                        return None
                    text.append(orjson.dumps(v).decode())
            return pa.array(text, pa.string())
        strings = pa.array(values, pa.string())
        try:
            return pc.cast(strings, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            parse = {"date-time": parse_datetime, "date": parse_date, "time": time.fromisoformat}[kind]
            return pa.array([None if v is None else parse(v) for v in values], target)
