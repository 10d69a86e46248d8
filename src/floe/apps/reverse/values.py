"""Warehouse column types vs Pendo field types: the compatibility check and vectorised conversion.

| Pendo type | warehouse columns accepted            | sent as                     |
|------------|----------------------------------------|-----------------------------|
| string     | text, integer, decimal, date, timestamp| JSON string                 |
| integer    | integer                                | JSON number                 |
| float      | integer, floating point, decimal       | JSON number                 |
| boolean    | boolean                                | true / false                |
| time       | timestamp, date, integer (epoch ms), text (ISO 8601) | epoch milliseconds (text as is) |
An all-NULL column (no type) fits any field; NULL is sent as JSON null.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

_t = pa.types
_FAMILIES: dict[str, Callable[[pa.DataType], bool]] = {
    "string": lambda t: _t.is_string(t) or _t.is_large_string(t) or _t.is_integer(t) or _t.is_decimal(t)
    or _t.is_date(t) or _t.is_timestamp(t),
    "integer": _t.is_integer,
    "float": lambda t: _t.is_integer(t) or _t.is_floating(t) or _t.is_decimal(t),
    "boolean": _t.is_boolean,
    "time": lambda t: _t.is_timestamp(t) or _t.is_date(t) or _t.is_integer(t) or _t.is_string(t)
    or _t.is_large_string(t),
}


def compatible(arrow_type: pa.DataType, pendo_type: str) -> bool:
    """Can a column of `arrow_type` fill a Pendo field of `pendo_type`? Unknown Pendo types take anything."""
    if _t.is_null(arrow_type) or pendo_type not in _FAMILIES:
        return True
    return _FAMILIES[pendo_type](arrow_type)


def convert(column: pa.Array, pendo_type: str) -> pa.Array:
    """The column as the JSON values Pendo expects for `pendo_type` (see the module table)."""
    t = column.type
    if pendo_type == "string" and not (_t.is_string(t) or _t.is_large_string(t) or _t.is_null(t)):
        if _t.is_timestamp(t):
            return pc.strftime(column, format="%Y-%m-%dT%H:%M:%SZ" if t.tz else "%Y-%m-%dT%H:%M:%S")
        return pc.cast(column, pa.string())
    if pendo_type == "time" and (_t.is_timestamp(t) or _t.is_date(t)):
        if _t.is_date(t):
            column = pc.cast(pc.cast(column, pa.date32()), pa.timestamp("s"))
        return pc.cast(pc.cast(column, pa.timestamp("ms", t.tz if _t.is_timestamp(t) else None)), pa.int64())
    if pendo_type == "float" and _t.is_decimal(t):
        return pc.cast(column, pa.float64())
    if _t.is_decimal(t):  # decimal into an untyped field: a JSON number, not a Python Decimal
        return pc.cast(column, pa.float64())
    return column
