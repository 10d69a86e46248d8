"""Which warehouse column types hold which staged values exactly: no load narrows, rounds or truncates.

Each destination declares, as data beside its `type_map`, the staged type keys each of its column
types holds without changing a value (`ColumnRules.holds`; keys are `arrow_type_key`'s, plus "json" for
a JSON document held as text) and which of its types are exact decimals. `compare` then judges one
column: staged values of Arrow field `new` go into an existing column of warehouse type `old`

* losslessly (`Verdict.lossless`): the warehouse's own cast keeps every value (int32 into BIGINT,
  a date into TIMESTAMPTZ as midnight UTC, DECIMAL(10,2) into DECIMAL(12,2), an integer into text);
* or only after the column is widened to `Verdict.widen_to`, a type of this warehouse that holds the
  old values and the new ones (INTEGER -> DECIMAL(12,2), DATE -> TIMESTAMPTZ);
* or not at all (`Verdict.incompatible`: BIGINT and double, no type holds both exactly).

What a load then does (widen the column, a variant column, or fail) is `schema_changes`' plan.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from floe.core.destination import arrow_type_key, is_json, json_field

if TYPE_CHECKING:
    import pyarrow as pa

# What a text column holds exactly, on warehouses whose cast to text writes the value itself.
TEXT_KEYS = frozenset({"string", "json", "bool", "int32", "int64", "decimal", "date", "time", "timestamp"})
# Type names as information_schema spells them out.
SPELLED_OUT = {
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ", "TIMESTAMP WITHOUT TIME ZONE": "TIMESTAMP",
    "TIME WITHOUT TIME ZONE": "TIME", "CHARACTER VARYING": "VARCHAR",
}

@functools.cache
def _representative() -> dict[str, pa.Field]:
    """One value type standing for each key, to ask whether a type holds everything another type holds.
    A JSON column's nested values are stored as JSON documents, so "nested" stands for a document too."""
    import pyarrow as pa

    return {
        "bool": pa.field("v", pa.bool_()), "int32": pa.field("v", pa.int32()), "int64": pa.field("v", pa.int64()),
        "float64": pa.field("v", pa.float64()), "decimal": pa.field("v", pa.decimal256(76, 38)),
        "string": pa.field("v", pa.string()), "json": json_field("v"), "nested": json_field("v"),
        "binary": pa.field("v", pa.binary()), "date": pa.field("v", pa.date32()), "time": pa.field("v", pa.time64("us")),
        "timestamp": pa.field("v", pa.timestamp("us")), "timestamp_tz": pa.field("v", pa.timestamp("us", "UTC")),
    }


def type_key(f: pa.Field) -> str:
    """The key of a staged field in `ColumnRules.holds`: "json" for a JSON document held as text."""
    return "json" if is_json(f) and arrow_type_key(f.type) == "string" else arrow_type_key(f.type)


def integer_digits(t: pa.DataType) -> int:
    """How many decimal digits the largest value of an integer type has (int64: 19)."""
    import pyarrow as pa

    width = t.bit_width if pa.types.is_integer(t) else 64
    largest = 2**width - 1 if pa.types.is_unsigned_integer(t) else 2 ** (width - 1) - 1
    return len(str(largest))


@dataclass(frozen=True)
class SqlType:
    """A warehouse column type, normalised: its base name (upper case, aliases resolved) and parameters."""

    name: str
    precision: int | None = None
    scale: int | None = None

    @classmethod
    def parse(cls, text: str, aliases: Mapping[str, str] = SPELLED_OUT) -> SqlType:
        """`NUMERIC(12, 2)`, `numeric(12,2)`, `timestamp with time zone`, `VARCHAR(65535)`, ..."""
        match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_ ]*?)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?\s*", text)
        if match is None:  # ARRAY<...>, STRUCT<...>, INTEGER[]: nothing floe creates
            return cls(text.strip().upper())
        name = " ".join(match.group(1).upper().split())
        precision, scale = match.group(2), match.group(3)
        return cls(aliases.get(name, name), int(precision) if precision else None, int(scale) if scale else None)

    def __str__(self) -> str:
        if self.precision is None:
            return self.name
        return f"{self.name}({self.precision}" + (f",{self.scale})" if self.scale is not None else ")")


@dataclass(frozen=True)
class Verdict:
    """Whether staged values fit an existing column exactly; if not, what it would have to become."""

    lossless: bool
    widen_to: str | None = None  # a type holding the old and the new values exactly (None: there is none)

    @property
    def incompatible(self) -> bool:
        return not self.lossless and self.widen_to is None


LOSSLESS = Verdict(True)


@dataclass(frozen=True)
class ColumnRules:
    """One warehouse's rule: which staged type keys each of its column types holds exactly.

    `decimals` names its exact decimal types with the (precision, scale) they have when written
    without parameters (None: unbounded, like PostgreSQL's NUMERIC); they hold decimals of at most as
    many integer and fraction digits, and integers of at most as many integer digits."""

    holds: Mapping[str, frozenset[str]]
    decimals: Mapping[str, tuple[int, int] | None] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=lambda: SPELLED_OUT)

    def parse(self, text: str) -> SqlType:
        return SqlType.parse(text, self.aliases)

    def holds_field(self, column: SqlType, f: pa.Field) -> bool:
        """Whether a column of type `column` holds every value of staged field `f` exactly."""
        import pyarrow as pa

        if column.name in self.decimals:
            bounds = self.decimals[column.name]
            if column.precision is not None:
                bounds = (column.precision, column.scale or 0)
            t = f.type
            if pa.types.is_decimal(t) or pa.types.is_integer(t):
                if bounds is None:
                    return True
                digits, scale = (t.precision - t.scale, t.scale) if pa.types.is_decimal(t) else (integer_digits(t), 0)
                return scale <= bounds[1] and digits <= bounds[0] - bounds[1]
        return type_key(f) in self.holds.get(column.name, frozenset())

    def holds_all(self, column: SqlType, old: SqlType) -> bool:
        """Whether a column of type `column` holds every value a column of type `old` may hold."""
        import pyarrow as pa

        if old.name in self.decimals:
            bounds = self.decimals[old.name] if old.precision is None else (old.precision, old.scale or 0)
            if bounds is None:  # unbounded: only another unbounded decimal type holds it all
                return column.name in self.decimals and column.precision is None and self.decimals[column.name] is None
            precision, scale = bounds
            return self.holds_field(column, pa.field("v", pa.decimal256(max(precision, scale, 1), scale)))
        keys = self.holds.get(old.name, frozenset())
        return bool(keys) and all(self.holds_field(column, _representative()[k]) for k in keys)


def decimal_supertype(old: SqlType, new: pa.DataType, rules: ColumnRules) -> pa.DataType | None:
    """The narrowest Arrow decimal holding an exact-number column of type `old` and values of type `new`."""
    import pyarrow as pa

    if old.name in rules.decimals:
        bounds = rules.decimals[old.name] if old.precision is None else (old.precision, old.scale or 0)
        if bounds is None:
            return None
        old_digits, old_scale = bounds[0] - bounds[1], bounds[1]
    elif rules.holds.get(old.name) and rules.holds[old.name] <= {"int32", "int64"}:  # an integer column
        old_digits, old_scale = integer_digits(pa.int64() if "int64" in rules.holds[old.name] else pa.int32()), 0
    else:
        return None
    if pa.types.is_decimal(new):
        new_digits, new_scale = new.precision - new.scale, new.scale
    elif pa.types.is_integer(new):
        new_digits, new_scale = integer_digits(new), 0
    else:
        return None
    scale = max(old_scale, new_scale)
    precision = max(old_digits, new_digits) + scale
    return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(min(precision, 76), scale)


def compare(rules: ColumnRules, old: str, new: pa.Field, create: Callable[[pa.Field], str | None]) -> Verdict:
    """Judge staged field `new` against an existing column of warehouse type `old`.

    `create(field)` is the type the warehouse gives a new column of that field: the first widening
    candidate; a decimal wide enough for both sides is the other."""
    import pyarrow as pa

    column = rules.parse(old)
    if rules.holds_field(column, new):
        return LOSSLESS
    candidates = [create(new)]
    if (decimal := decimal_supertype(column, new.type, rules)) is not None:
        candidates.append(create(pa.field(new.name, decimal)))
    for candidate in candidates:
        if candidate is None:
            continue
        wider = rules.parse(candidate)
        if rules.holds_field(wider, new) and rules.holds_all(wider, column):
            return Verdict(False, str(wider))
    return Verdict(False)
