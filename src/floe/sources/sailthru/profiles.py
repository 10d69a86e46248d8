"""The profile table (flat fields; the e-mail hashed, dropped or kept per `pii`) and its child
tables, one per map of a profile (geo, browser, lists_signup, vars), each replaced as a set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from floe.sources.sailthru.files import ExportFile
from floe.sources.sailthru.rows import SailthruStream, as_text, read_records, schema_of, typed_batch, unread

if TYPE_CHECKING:
    from floe.sources.sailthru import SailthruSource

PROFILE_MAPS = ("geo", "browser", "lists_signup", "vars")  # read by the child streams
PROFILE_FIELDS: dict[str, str] = {
    "id": "str", "optout_reason": "str", "optout_time": "ts", "signup_time": "ts", "create_date": "ts",
    "total_opens": "int", "total_clicks": "int", "total_unique_opens": "int", "total_unique_clicks": "int",
    "total_pageviews": "int", "total_messages": "int", "last_open": "ts", "last_click": "ts", "last_pageview": "ts",
}
PROFILE_READ = frozenset({*PROFILE_FIELDS, *PROFILE_MAPS, "email"})


class ProfileStream(SailthruStream):
    """The flat part of each profile; `email` is hashed (email_hash), dropped or kept per `pii`."""

    name = "profile"
    table = "profile"
    primary_key = ("id",)

    def __init__(self, source: SailthruSource) -> None:
        super().__init__(source)
        self.email_column = {"hash": "email_hash", "keep": "email", "drop": None}[source.config.email_mode]
        email = {self.email_column: "str"} if self.email_column else {}
        self.kinds = {"id": "str", **email, "geo_count": "int", **PROFILE_FIELDS, "extra": "json"}
        self.schema = schema_of(self.kinds)

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        pii = self.source.pii
        for lines, records in read_records(f, self.source.config.profile_lines):
            data = {name: [r.get(name) for r in records] for name in PROFILE_FIELDS}
            data["geo_count"] = [_mapping(r.get("geo")).get("count") for r in records]
            if self.email_column:
                data[self.email_column] = [pii.email(r.get("email")) for r in records]
            data["extra"] = unread(records, PROFILE_READ)
            yield typed_batch(data, self.kinds, self.zone, f.name, lines)


@dataclass(frozen=True)
class ChildTable:
    """One of a profile's maps as a table: its name, key, columns (kinds) and the rows of one profile."""

    name: str
    key: tuple[str, ...]
    kinds: dict[str, str]
    rows_of: Callable[[dict[str, Any]], Iterator[tuple[Any, ...]]]  # in `kinds` order


class ProfileChildStream(SailthruStream):
    """Rows of one of a profile's maps. When a profile is re-sent, all its earlier rows here are
    deleted and replaced by the new set (delete by parent `id`, then insert), so a removed key
    does not linger. A profile with an empty or missing map yields one parent marker row (only
    `id` set, see `TableSpec.parent_key`), which empties its set and is not stored."""

    table = "profile"
    parent_key = ("id",)

    def __init__(self, source: SailthruSource, child: ChildTable) -> None:
        super().__init__(source)
        self.name, self.primary_key, self.kinds, self.rows_of = child.name, child.key, child.kinds, child.rows_of
        self.schema = schema_of(child.kinds)

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        names = list(self.kinds)
        for lines, records in read_records(f, self.source.config.profile_lines):
            columns: list[list[Any]] = [[] for _ in names]
            origin: list[int] = []  # the line of each row
            marker_tail = (None,) * (len(names) - 1)
            for line, r in zip(lines, records, strict=True):
                rows = list(self.rows_of(r)) or [(r.get("id"), *marker_tail)]
                origin.extend([line] * len(rows))
                for row in rows:
                    for column, value in zip(columns, row, strict=True):
                        column.append(value)
            yield typed_batch(dict(zip(names, columns, strict=True)), self.kinds, self.zone, f.name, origin)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _geo_rows(r: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    for scope, labels in _mapping(r.get("geo")).items():
        if isinstance(labels, dict):
            for label, quantity in labels.items():
                yield r.get("id"), scope, label, quantity if isinstance(quantity, int) else None


def _browser_rows(r: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    for browser, quantity in _mapping(r.get("browser")).items():
        yield r.get("id"), browser, quantity if isinstance(quantity, int) else None


def _list_rows(r: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    for name, signup in _mapping(r.get("lists_signup")).items():
        yield r.get("id"), name, signup


def _var_rows(r: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    for name, value in _mapping(r.get("vars")).items():
        yield r.get("id"), name, as_text(value)


CHILD_TABLES = (
    ChildTable("profile_geo", ("id", "scope", "label"),
               {"id": "str", "scope": "str", "label": "str", "quantity": "int"}, _geo_rows),
    ChildTable("profile_browser", ("id", "browser"), {"id": "str", "browser": "str", "quantity": "int"}, _browser_rows),
    ChildTable("profile_lists_signup", ("id", "list"), {"id": "str", "list": "str", "signup_time": "ts"}, _list_rows),
    ChildTable("profile_vars", ("id", "var"), {"id": "str", "var": "str", "value": "str"}, _var_rows),
)
