"""Arrow <-> JSON Schema, the two directions Singer needs.

- `arrow_to_json_schema`: a floe stream's Arrow schema as the JSON Schema of a SCHEMA message
  (timestamps and dates are RFC 3339 strings with `format: date-time` / `date`).
- `json_schema_to_arrow`: the JSON Schema of an incoming SCHEMA message (drafts 4 to 2020-12:
  `type` arrays, OpenAPI `nullable`, `anyOf`/`oneOf`, local `$ref` into `definitions`/`$defs`)
  as the Arrow schema the target loads. Objects, arrays and values of mixed type are kept as
  JSON documents; each field carries its `kind` (see `Kind`) for the record converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from floe.core.destination import is_json, json_field
from floe.core.errors import SourceError

# --- Arrow -> JSON Schema (tap) ---------------------------------------------------------------


def _nullable(schema: dict[str, Any], nullable: bool) -> dict[str, Any]:
    if nullable:
        kind = schema.get("type")
        if isinstance(kind, str):
            schema["type"] = [kind, "null"]
        elif kind is None and "anyOf" in schema:
            schema["anyOf"].append({"type": "null"})
    return schema


def arrow_type_to_json_schema(t: pa.DataType) -> dict[str, Any]:
    """The JSON Schema of one (non-null) value of Arrow type `t`."""
    if pa.types.is_boolean(t):
        return {"type": "boolean"}
    if pa.types.is_integer(t):
        return {"type": "integer"}
    if pa.types.is_floating(t) or pa.types.is_decimal(t):  # a decimal's digits: the SCHEMA extension
        return {"type": "number"}
    if pa.types.is_timestamp(t):
        return {"type": "string", "format": "date-time"}
    if pa.types.is_date(t):
        return {"type": "string", "format": "date"}
    if pa.types.is_time(t):  # a time of day without offset: RFC 3339 `time` would need one
        return {"type": "string"}
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return {"type": "string", "contentEncoding": "base64"}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return {"type": "array", "items": _nullable(arrow_type_to_json_schema(t.value_type), True)}
    if pa.types.is_struct(t):
        return {
            "type": "object",
            "properties": {f.name: arrow_field_to_json_schema(f) for f in t},
        }
    if pa.types.is_map(t):
        return {"type": "object", "additionalProperties": _nullable(arrow_type_to_json_schema(t.item_type), True)}
    if pa.types.is_null(t):
        return {"type": ["null", "string"]}
    return {"type": "string"}


def arrow_field_to_json_schema(f: pa.Field) -> dict[str, Any]:
    if is_json(f):  # a JSON document: any JSON value
        return {}
    return _nullable(arrow_type_to_json_schema(f.type), f.nullable and not pa.types.is_null(f.type))


def arrow_to_json_schema(schema: pa.Schema) -> dict[str, Any]:
    """The JSON Schema (an object with one property per column) of an Arrow schema."""
    return {"type": "object", "properties": {f.name: arrow_field_to_json_schema(f) for f in schema}}


# --- JSON Schema -> Arrow (target) ------------------------------------------------------------

# What the record converter does with a column's values.
KINDS = ("integer", "number", "boolean", "string", "date-time", "date", "time", "json", "text")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # one of KINDS; "text" = values of several scalar types, stored as their text
    nullable: bool
    required: bool
    allowed: frozenset[str]  # JSON types a value may have ("integer", "object", ...), empty = any
    scale: int | None = None  # a number with `multipleOf` 10^-scale: an exact decimal of that many places
    precision: int = 38  # its digits (JSON Schema does not say them; floe's SCHEMA extension does)

    def arrow_field(self) -> pa.Field:
        if self.kind == "json":
            return json_field(self.name)
        return pa.field(self.name, self.arrow_type)

    @property
    def arrow_type(self) -> pa.DataType:
        if self.kind == "number" and self.scale is not None:
            return pa.decimal128(self.precision, self.scale)
        return ARROW_TYPES[self.kind]


MAX_SCALE = 9  # the places BigQuery's NUMERIC keeps; a finer multipleOf stays a double


def decimal_scale(node: dict[str, Any]) -> int | None:
    """The places of a number schema whose `multipleOf` is 1, 0.1, 0.01, ... (None: any other)."""
    step = node.get("multipleOf")
    if isinstance(step, bool) or not isinstance(step, int | float) or step <= 0 or step > 1:
        return None
    for scale in range(MAX_SCALE + 1):
        if abs(step - 10.0 ** -scale) <= 1e-12 * 10.0 ** -scale:
            return scale
    return None


ARROW_TYPES: dict[str, pa.DataType] = {
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
    "string": pa.string(),
    "text": pa.string(),
    "date-time": pa.timestamp("us", tz="UTC"),
    "date": pa.date32(),
    "time": pa.time64("us"),
}


class _Resolver:
    def __init__(self, root: dict[str, Any], stream: str) -> None:
        self.root = root
        self.stream = stream

    def resolve(self, node: Any, depth: int = 0) -> dict[str, Any]:
        if not isinstance(node, dict):
            return {} if node is True or node is None else {"not": {}}
        ref = node.get("$ref")
        if ref is None:
            return node
        if depth > 32 or not isinstance(ref, str) or not ref.startswith("#/"):
            raise SourceError(f"stream {self.stream}: unsupported $ref {ref!r} (only local #/... references)")
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SourceError(f"stream {self.stream}: $ref {ref!r} points nowhere")
            target = target[part]
        merged = {**self.resolve(target, depth + 1), **{k: v for k, v in node.items() if k != "$ref"}}
        return merged


def _types(node: dict[str, Any], resolver: _Resolver) -> tuple[set[str], str | None]:
    """The JSON types a node allows (empty = any) and its string `format`, through anyOf/oneOf/allOf."""
    node = resolver.resolve(node)
    types: set[str] = set()
    fmt = node.get("format")
    kind = node.get("type")
    if isinstance(kind, str):
        types.add(kind)
    elif isinstance(kind, list):
        types.update(k for k in kind if isinstance(k, str))
    if node.get("nullable") is True:
        types.add("null")
    if "const" in node and node["const"] is None:
        types.add("null")
    if "enum" in node and None in (node["enum"] or []):
        types.add("null")
    for combinator in ("anyOf", "oneOf"):
        branches = node.get(combinator)
        if isinstance(branches, list):
            branch_types: set[str] = set()
            for branch in branches:
                t, f = _types(branch, resolver)
                if not t:  # one branch allows anything
                    return set(), None
                branch_types |= t
                fmt = fmt or f
            types = types & branch_types if types else branch_types
    for branch in node.get("allOf") or []:
        t, f = _types(branch, resolver)
        types = (types & t if types else t) if t else types
        fmt = fmt or f
    if not types and kind is None and ("properties" in node):
        types = {"object"}
    if not types and kind is None and "items" in node:
        types = {"array"}
    return types, fmt


def _kind(types: set[str], fmt: str | None) -> str:
    scalar = types - {"null"}
    if not scalar or scalar & {"object", "array"}:
        return "json"
    if scalar <= {"integer"}:
        return "integer"
    if scalar <= {"integer", "number"}:
        return "number"
    if scalar == {"boolean"}:
        return "boolean"
    if scalar == {"string"}:
        if fmt in ("date-time", "date", "time"):
            return fmt
        return "string"
    return "text"


def json_schema_columns(schema: Any, stream: str) -> list[Column]:
    """The columns of a SCHEMA message's schema (one per top-level property), in order."""
    if not isinstance(schema, dict):
        raise SourceError(f"stream {stream}: the schema must be a JSON object")
    resolver = _Resolver(schema, stream)
    root = resolver.resolve(schema)
    properties = root.get("properties") or {}
    if not isinstance(properties, dict):
        raise SourceError(f"stream {stream}: schema properties must be an object")
    required = set(root.get("required") or [])
    columns = []
    for name, node in properties.items():
        types, fmt = _types(node if isinstance(node, dict) else {}, resolver)
        nullable = not types or "null" in types
        allowed = frozenset(types - {"null"})
        if "number" in allowed:
            allowed = allowed | {"integer"}
        kind = _kind(types, fmt)
        scale = decimal_scale(resolver.resolve(node)) if kind == "number" and isinstance(node, dict) else None
        columns.append(Column(str(name), kind, nullable, name in required, allowed, scale))
    return columns


def columns_to_arrow(columns: list[Column]) -> pa.Schema:
    return pa.schema([c.arrow_field() for c in columns])


def json_schema_to_arrow(schema: Any, stream: str = "stream") -> pa.Schema:
    """The Arrow schema a target stores records of `schema` as."""
    return columns_to_arrow(json_schema_columns(schema, stream))
