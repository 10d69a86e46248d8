"""Singer catalogs: built from a floe source's streams (discovery) and read back (selection).

Stream metadata (breadcrumb `[]`): `selected-by-default` (true: floe loads every stream unless
told otherwise), `inclusion: available`, `table-key-properties`, `valid-replication-keys`,
`forced-replication-method` (FULL_TABLE for `replace` streams, INCREMENTAL otherwise).
Field metadata: `inclusion` (`automatic` for key and replication-key fields) and
`selected-by-default: true`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from floe.apps.singer.schema import arrow_to_json_schema
from floe.core.errors import ConfigError
from floe.core.stream import Stream


def replication_method(stream: Stream) -> str:
    return "FULL_TABLE" if stream.disposition == "replace" else "INCREMENTAL"


def automatic_fields(stream: Stream) -> set[str]:
    return set(stream.primary_key) | ({stream.cursor_field} if stream.cursor_field else set())


def catalog_entry(stream: Stream) -> dict[str, Any]:
    schema = arrow_to_json_schema(stream.landed_schema)
    automatic = automatic_fields(stream)
    stream_meta: dict[str, Any] = {
        "inclusion": "available",
        "selected-by-default": True,
        "table-key-properties": list(stream.primary_key),
        "forced-replication-method": replication_method(stream),
        "valid-replication-keys": [stream.cursor_field] if stream.cursor_field else [],
    }
    metadata: list[dict[str, Any]] = [{"breadcrumb": [], "metadata": stream_meta}]
    for f in stream.landed_schema:
        metadata.append({
            "breadcrumb": ["properties", f.name],
            "metadata": {"inclusion": "automatic" if f.name in automatic else "available",
                         "selected-by-default": True},
        })
    return {
        "tap_stream_id": stream.name,
        "stream": stream.name,
        "table_name": stream.name,
        "schema": schema,
        "key_properties": list(stream.primary_key),
        "replication_method": replication_method(stream),
        **({"replication_key": stream.cursor_field} if stream.cursor_field else {}),
        "metadata": metadata,
    }


def build_catalog(streams: list[Stream]) -> dict[str, Any]:
    return {"streams": [catalog_entry(s) for s in streams]}


@dataclass(frozen=True)
class Selection:
    """What a catalog selects of one stream: its fields (None = all) and replication method."""

    fields: frozenset[str] | None
    replication_method: str | None = None


def _metadata_map(entry: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for item in entry.get("metadata") or []:
        if isinstance(item, dict) and isinstance(item.get("metadata"), dict):
            out[tuple(item.get("breadcrumb") or [])] = item["metadata"]
    return out


def _is_selected(meta: dict[str, Any], legacy: Any = None) -> bool:
    if meta.get("inclusion") == "unsupported":
        return False
    if meta.get("inclusion") == "automatic":
        return True
    if "selected" in meta:
        return bool(meta["selected"])
    if legacy is not None:
        return bool(legacy)
    return bool(meta.get("selected-by-default", False))


def read_selection(catalog: Any, streams: list[Stream], where: str = "catalog") -> dict[str, Selection]:
    """The selected streams of a catalog (by `tap_stream_id`, else `stream`), with their fields.

    Streams the source does not have are an error naming them; streams the catalog leaves out
    are not selected."""
    if not isinstance(catalog, dict) or not isinstance(catalog.get("streams"), list):
        raise ConfigError(f"{where}: a catalog is an object with a `streams` list")
    known = {s.name: s for s in streams}
    selected: dict[str, Selection] = {}
    for i, entry in enumerate(catalog["streams"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: streams[{i}] must be an object")
        name = entry.get("tap_stream_id") or entry.get("stream")
        if name not in known:
            raise ConfigError(f"{where}: streams[{i}]: no stream {name!r} in this source "
                              f"(it has {', '.join(sorted(known))})")
        meta = _metadata_map(entry)
        schema: dict[str, Any] = entry["schema"] if isinstance(entry.get("schema"), dict) else {}
        if not _is_selected(meta.get((), {}), schema.get("selected")):
            continue
        stream = known[name]
        automatic = automatic_fields(stream)
        fields = set()
        props = schema.get("properties") or {}
        for f in stream.landed_schema:
            field_meta = meta.get(("properties", f.name), {})
            legacy = props.get(f.name, {}).get("selected") if isinstance(props.get(f.name), dict) else None
            if f.name in automatic or _is_selected({"selected-by-default": True, **field_meta}, legacy):
                fields.add(f.name)
        method = meta.get((), {}).get("replication-method") or entry.get("replication_method")
        all_fields = fields >= {f.name for f in stream.landed_schema}
        selected[name] = Selection(None if all_fields else frozenset(fields), method)
    return selected
