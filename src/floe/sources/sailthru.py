"""Sailthru Data Exporter files (JSON Lines, optionally gzipped, loose or zipped) into tables.

Every stream reads the files of its collection in date order; each FILE is one commit, so a
bad line fails the stream with `file:line` and nothing of that file is committed, while the
files before it stay loaded. State per stream: `{"files": {name: sha256}}`. A file already
loaded is skipped; a file whose content changed under a known name is an error unless
`floe run --reprocess` is given.

Message files go through `sailthru_messages` (pyarrow's JSON reader, Arrow kernels: no per-row
Python while their lines hold only known keys). Profiles and blasts are parsed with orjson line
by line (their rows are few and irregular). Keys floe does not read land in each table's `extra`
JSON column; times written without a zone are read in `timezone` (US Eastern by default).
"""

from __future__ import annotations

import os
import threading
import zoneinfo
from abc import abstractmethod
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
import pyarrow as pa
from pydantic import Field, SecretStr, field_validator

from floe import secrets
from floe.config import SourceConfig
from floe.destinations.base import json_field
from floe.engine.stream import Batch, Context, Source, State, Stream
from floe.errors import ConfigError, FloeError, SourceError
from floe.pii import Pii
from floe.sources.sailthru_files import ExportFile, count_records, discover, iter_lines
from floe.sources.sailthru_messages import POOL, TS, MessageReader, localize, message_schema
from floe.threads import in_thread, iterate_in_thread

SALT_ENV = "FLOE_PII_SALT"
EASTERN = "America/New_York"


class SailthruConfig(SourceConfig):
    type: str = "sailthru"
    path: str = Field(description="A folder of export files (and/or .zip files), one .zip, or one file.")
    pii: Literal["hash", "drop", "keep"] = Field("hash", description="What to do with e-mail addresses.")
    salt: SecretStr | None = Field(None, description=f"Salt for hashing e-mails (default: env {SALT_ENV}).")
    timezone: str = Field(EASTERN, description="Zone of times written without one (send_time, signup_time, ...); "
                                              "Sailthru's exporter works in US Eastern time.")
    client_id: str | None = Field(None, description="Only files of this client id (unprefixed files too).")
    block_bytes: int = Field(4 << 20, ge=1 << 16, description="Bytes of message JSON parsed per batch.")
    profile_lines: int = Field(1000, ge=1, description="Profiles parsed per batch.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("client_id", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


# --- conversions ----------------------------------------------------------------------------

def time_column(values: list[Any], zone: str) -> pa.Array:
    """ISO strings without zone (read in `zone`) or Mongo `{"$date": ms}` (UTC) -> UTC timestamps."""
    if any(isinstance(v, dict) for v in values):
        out = [datetime.fromtimestamp(v["$date"] / 1000, UTC) if isinstance(v, dict) else None for v in values]
        texts = [v if isinstance(v, str) else None for v in values]
        parsed = localize(pa.array(texts, pa.string()).cast(pa.timestamp("ms")), zone).to_pylist()
        return pa.array([o or p for o, p in zip(out, parsed, strict=True)], TS)
    return localize(pa.array(values, pa.string()).cast(pa.timestamp("ms")), zone)


def as_text(value: Any) -> str | None:
    """Strings as they are; other JSON values as JSON text (true, 12, {"a": 1})."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def unread(records: list[dict[str, Any]], known: Collection[str]) -> list[str | None]:
    """Per record: its non-null values at keys not in `known`, as one JSON object (None: none)."""
    return [orjson.dumps(rest).decode() if (rest := {k: v for k, v in r.items() if k not in known and v is not None})
            else None for r in records]


KINDS: dict[str, pa.DataType] = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
_REFUSED = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, KeyError, OverflowError)


def schema_of(kinds: dict[str, str]) -> pa.Schema:
    """The Arrow schema of columns named with kinds (str, int, float, bool, ts, date, json)."""
    types = {**KINDS, "ts": TS, "date": pa.date32()}
    return pa.schema([json_field(name) if kind == "json" else pa.field(name, types[kind]) for name, kind in kinds.items()])


def typed(values: list[Any], kind: str, zone: str) -> pa.Array:
    if kind == "ts":
        return time_column(values, zone)
    if kind == "date":
        return pa.array(values, pa.string()).cast(pa.date32())
    return pa.array(values, pa.string() if kind == "json" else KINDS[kind])


def typed_batch(data: dict[str, list[Any]], kinds: dict[str, str], zone: str, file: str,
                lines: Sequence[int]) -> pa.RecordBatch:
    """Columns of `kinds` from `data`; a value that does not fit its column is a SourceError
    naming `file:line` (`lines[i]`: the line that row i came from) and the field."""
    arrays = []
    for name, kind in kinds.items():
        try:
            arrays.append(typed(data[name], kind, zone))
        except _REFUSED as exc:
            for i, value in enumerate(data[name]):  # find the row at fault, for its line and its error
                try:
                    typed([value], kind, zone)
                except _REFUSED as own:
                    raise SourceError(f"{file}:{lines[i]}: field {name}: {own}") from None
            raise SourceError(f"{file}: field {name}: {exc}") from None
    return pa.RecordBatch.from_arrays(arrays, schema=schema_of(kinds))


# --- the source ---------------------------------------------------------------------------------

class SailthruSource(Source):
    Config: ClassVar[type[SailthruConfig]] = SailthruConfig

    def __init__(self, name: str, config: SailthruConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        salt = config.salt.get_secret_value() if config.salt else os.environ.get(SALT_ENV)
        if config.pii == "hash" and not salt:
            raise ConfigError(f"sources.{name}.salt: is required when pii is hash (or set {SALT_ENV})")
        secrets.register(salt)
        # The system allocator hands freed Arrow buffers back to the OS; the default (mimalloc)
        # keeps them, which added ~100 MB to the peak RSS of a large load.
        pa.set_memory_pool(POOL)
        self.pii = Pii(config.pii, salt)
        self.root: Path = self.context.path(config.path)
        self._files: list[ExportFile] | None = None
        self._lock = threading.Lock()  # streams ask from worker threads; scan (and warn) once
        self._digests: dict[str, str] = {}

    def files(self, table: str) -> list[ExportFile]:
        """The export files feeding `table` ('' for all), in load order; the folder is scanned once."""
        with self._lock:
            if self._files is None:
                self._files = discover(self.root, self.config.client_id)
        return [f for f in self._files if not table or f.info.table == table]

    def checksum(self, f: ExportFile) -> str:
        """SHA-256 of the file as delivered, computed once per run however many streams ask."""
        with self._lock:
            known = self._digests.get(f.name)
        if known is None:
            known = f.checksum()
            with self._lock:
                self._digests[f.name] = known
        return known

    def streams(self) -> list[Stream]:
        return [cls(self) for cls in STREAMS]


class SailthruStream(Stream):
    """A table fed by the files of one collection; one commit per file."""

    table: ClassVar[str] = ""  # the collection whose files this stream reads ('' = all)
    disposition = "merge"
    scrubs_itself: ClassVar[bool] = False  # True: batches() already replaced e-mail addresses

    def __init__(self, source: SailthruSource) -> None:
        self.source = source
        self.zone: str = source.config.timezone

    @abstractmethod
    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        """The rows of one export file of this stream's collection."""

    def _scrubbed(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        pii = self.source.pii
        try:
            for batch in self.batches(f):
                yield batch if self.scrubs_itself else pii.scrub_batch(batch)
        except FloeError as exc:
            message = str(exc)
            raise SourceError(pii.scrub_text(message if message.startswith(f.name) else f"{f.name}: {message}")) from None
        except (OSError, EOFError, pa.ArrowException, ValueError) as exc:
            raise SourceError(pii.scrub_text(f"{f.name}: {type(exc).__name__}: {exc}")) from None

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        done: dict[str, str] = dict((state or {}).get("files", {}))
        for f in await in_thread(self.source.files, self.table):
            digest = await in_thread(self.source.checksum, f)
            known = done.get(f.name)
            if known == digest:
                continue
            if known is not None and not self.source.context.options.reprocess:
                raise SourceError(
                    f"{f.name}: changed since it was loaded (sha256 {known[:12]}... is now {digest[:12]}...); "
                    "run `floe run --reprocess` to load it again"
                )
            async with iterate_in_thread(partial(self._scrubbed, f), name=f"sailthru:{f.name}") as batches:
                async for batch in batches:
                    yield Batch(batch)
            done[f.name] = digest
            yield Batch(checkpoint={"files": dict(done)})


# --- messages: pyarrow JSON reader + vectorised explode (sailthru_messages) ---------------------

class MessageStream(SailthruStream):
    """One row per open or click (action_name/action_ts/action_url), or one row with null
    action fields for a message without any. A re-sent message (an `_update` file holds its
    activity so far) replaces its rows as a set: its NULL-action row goes once actions arrive."""

    parent_markers = False  # the NULL-action row of a message without actions is a real row

    base_fields: ClassVar[list[pa.Field]]  # as read from JSON (send_time naive, localised later)
    scrubs_itself = True  # before exploding: fewer rows to scan

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        config = self.source.config
        reader = MessageReader(self.base_fields, self.schema, self.zone, self.source.pii, config.block_bytes)
        return reader.batches(f)


class MessageBlastStream(MessageStream):
    name = "message_blast"
    table = "message_blast"
    base_fields: ClassVar[list[pa.Field]] = [
        pa.field("profile_id", pa.string()), pa.field("send_time", pa.timestamp("ms")),
        pa.field("blast_id", pa.int64()), pa.field("message_id", pa.int64()), pa.field("device", pa.string()),
        pa.field("message_revenue", pa.float64()), pa.field("delivery_status", pa.string()),
        pa.field("id", pa.string()),  # absent from the reference sample; Sailthru's own id when present
    ]
    primary_key = ("profile_id", "blast_id", "action_name", "action_ts", "action_url")
    parent_key = ("profile_id", "blast_id")
    schema = message_schema(base_fields)


class MessageTransactionalStream(MessageStream):
    name = "message_transactional"
    table = "message_transactional"
    base_fields: ClassVar[list[pa.Field]] = [
        pa.field("id", pa.string()), pa.field("profile_id", pa.string()), pa.field("template", pa.string()),
        pa.field("send_time", pa.timestamp("ms")), pa.field("device", pa.string()),
        pa.field("message_revenue", pa.float64()), pa.field("delivery_status", pa.string()),
    ]
    primary_key = ("id", "action_name", "action_ts", "action_url")
    parent_key = ("id",)
    schema = message_schema(base_fields)


# --- blasts and profiles: orjson line by line -----------------------------------------------

def read_records(f: ExportFile, chunk: int) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
    """(line numbers, parsed lines) in chunks; a bad line raises SourceError naming `file:line`."""
    lines: list[int] = []
    records: list[dict[str, Any]] = []
    for number, line in iter_lines(f):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"{f.name}:{number}: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise SourceError(f"{f.name}:{number}: expected a JSON object, got {type(value).__name__}")
        lines.append(number)
        records.append(value)
        if len(records) >= chunk:
            yield lines, records
            lines, records = [], []
    if records:
        yield lines, records


class BlastStream(SailthruStream):
    name = "blast"
    table = "blast"
    primary_key = ("id",)
    kinds: ClassVar[dict[str, str]] = {"id": "int", "name": "str", "day": "date", "extra": "json"}
    schema = schema_of(kinds)

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        read = ("id", "name", "day")
        for lines, records in read_records(f, 10_000):
            data = {name: [r.get(name) for r in records] for name in read}
            yield typed_batch({**data, "extra": unread(records, read)}, self.kinds, self.zone, f.name, lines)


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
        self.email_column = {"hash": "email_hash", "keep": "email", "drop": None}[source.config.pii]
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


class ProfileChildStream(SailthruStream):
    """Rows of one of a profile's maps. When a profile is re-sent, all its earlier rows here are
    deleted and replaced by the new set (delete by parent `id`, then insert), so a removed key
    does not linger. A profile with an empty or missing map yields one parent marker row (only
    `id` set, see `TableSpec.parent_key`), which empties its set and is not stored."""

    table = "profile"
    parent_key = ("id",)

    kinds: ClassVar[dict[str, str]]

    @staticmethod
    @abstractmethod
    def rows_of(r: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
        """The rows (in `kinds` order) of one profile."""

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


class ProfileGeoStream(ProfileChildStream):
    name = "profile_geo"
    primary_key = ("id", "scope", "label")
    kinds: ClassVar[dict[str, str]] = {"id": "str", "scope": "str", "label": "str", "quantity": "int"}
    rows_of = staticmethod(_geo_rows)
    schema = schema_of(kinds)


class ProfileBrowserStream(ProfileChildStream):
    name = "profile_browser"
    primary_key = ("id", "browser")
    kinds: ClassVar[dict[str, str]] = {"id": "str", "browser": "str", "quantity": "int"}
    rows_of = staticmethod(_browser_rows)
    schema = schema_of(kinds)


class ProfileListsSignupStream(ProfileChildStream):
    name = "profile_lists_signup"
    primary_key = ("id", "list")
    kinds: ClassVar[dict[str, str]] = {"id": "str", "list": "str", "signup_time": "ts"}
    rows_of = staticmethod(_list_rows)
    schema = schema_of(kinds)


class ProfileVarsStream(ProfileChildStream):
    name = "profile_vars"
    primary_key = ("id", "var")
    kinds: ClassVar[dict[str, str]] = {"id": "str", "var": "str", "value": "str"}
    rows_of = staticmethod(_var_rows)
    schema = schema_of(kinds)


# --- exports: the freshness table -------------------------------------------------------------

class ExportsStream(SailthruStream):
    """One row per file floe has read: its name, collection, export date (from the name), records
    (non-blank lines) and when it was ingested. Dashboards show `MAX(export_date)` as the data's freshness."""

    name = "exports"
    table = ""
    primary_key = ("name",)
    schema = pa.schema([
        ("name", pa.string()), ("collection", pa.string()), ("client_id", pa.string()),
        ("export_date", pa.date32()), ("rows", pa.int64()), ("bytes", pa.int64()),
        ("sha256", pa.string()), ("ingested_at", TS),
    ])

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        with f.arrow_stream() as stream:
            records, size = count_records(stream)
        yield pa.RecordBatch.from_pylist([{
            "name": f.name, "collection": f.info.collection, "client_id": f.info.client_id,
            "export_date": f.info.export_date, "rows": records, "bytes": size, "sha256": self.source.checksum(f),
            "ingested_at": datetime.now(UTC),
        }], schema=self.schema)


STREAMS: list[type[SailthruStream]] = [
    BlastStream, MessageBlastStream, MessageTransactionalStream, ProfileStream, ProfileGeoStream,
    ProfileBrowserStream, ProfileListsSignupStream, ProfileVarsStream, ExportsStream,
]
