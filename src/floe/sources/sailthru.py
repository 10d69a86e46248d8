"""Sailthru Data Exporter files (JSON Lines, optionally gzipped, loose or zipped) into tables.

Every stream reads the files of its collection in date order; each FILE is one commit, so a
bad line fails the stream with `file:line` and nothing of that file is committed, while the
files before it stay loaded. State per stream: `{"files": {name: sha256}}`. A file already
loaded is skipped; a file whose content changed under a known name is an error unless
`floe run --reprocess` is given.

Message files are read in chunks of whole lines, each parsed by pyarrow's JSON reader (in C,
multi-threaded) with an explicit schema and exploded into one row per action with Arrow compute
kernels: no per-row Python, and memory bounded by the chunk size whatever the file size.
Profiles and blasts are parsed with orjson line by line (their rows are few and irregular).
"""

from __future__ import annotations

import asyncio
import os
import threading
import zoneinfo
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from pydantic import Field, SecretStr, field_validator

from floe import secrets
from floe.config import SourceConfig
from floe.engine.stream import Batch, Context, Source, State, Stream
from floe.errors import ConfigError, FloeError, SourceError
from floe.pii import Pii
from floe.sources.sailthru_files import ExportFile, discover, iter_lines

SALT_ENV = "FLOE_PII_SALT"
TS = pa.timestamp("ms", "UTC")
POOL = pa.system_memory_pool()


class SailthruConfig(SourceConfig):
    type: str = "sailthru"
    path: str = Field(description="A folder of export files (and/or .zip files), one .zip, or one file.")
    pii: Literal["hash", "drop", "keep"] = Field("hash", description="What to do with e-mail addresses.")
    salt: SecretStr | None = Field(None, description=f"Salt for hashing e-mails (default: env {SALT_ENV}).")
    timezone: str = Field("UTC", description="Zone of times written without one (send_time, signup_time, ...).")
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

def localize(values: pa.Array, zone: str) -> pa.Array:
    """Naive timestamps read in `zone` -> UTC timestamps."""
    if pa.types.is_timestamp(values.type) and values.type.tz is None and zone != "UTC":
        values = pc.assume_timezone(values, zone, ambiguous="earliest", nonexistent="earliest")
    return values.cast(TS)


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


KINDS: dict[str, pa.DataType] = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def build_batch(records: list[dict[str, Any]], fields: dict[str, str], zone: str, extras: bool) -> pa.RecordBatch:
    """Columns of `fields` (name -> kind) from records; with `extras`, other scalar keys as text."""
    arrays: dict[str, pa.Array] = {}
    for name, kind in fields.items():
        values = [r.get(name) for r in records]
        try:
            if kind == "ts":
                arrays[name] = time_column(values, zone)
            elif kind == "date":
                arrays[name] = pa.array(values, pa.string()).cast(pa.date32())
            else:
                arrays[name] = pa.array(values, KINDS[kind])
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, KeyError) as exc:
            raise SourceError(f"field {name}: {exc}") from None
    if extras:
        other = sorted({k for r in records for k in r} - fields.keys())
        for name in other:
            arrays[name] = pa.array([as_text(r.get(name)) for r in records], pa.string())
    return pa.RecordBatch.from_pydict(arrays)


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
        for f in await asyncio.to_thread(self.source.files, self.table):
            digest = await asyncio.to_thread(self.source.checksum, f)
            known = done.get(f.name)
            if known == digest:
                continue
            if known is not None and not self.source.context.options.reprocess:
                raise SourceError(
                    f"{f.name}: changed since it was loaded (sha256 {known[:12]}... is now {digest[:12]}...); "
                    "run `floe run --reprocess` to load it again"
                )
            batches = self._scrubbed(f)
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                yield Batch(batch)
            done[f.name] = digest
            yield Batch(checkpoint={"files": dict(done)})


# --- messages: pyarrow JSON reader + vectorised explode -------------------------------------

_DATE = pa.struct([pa.field("$date", pa.int64())])
_OPENS = pa.list_(pa.struct([pa.field("ts", _DATE)]))
_CLICKS = pa.list_(pa.struct([pa.field("url", pa.string()), pa.field("ts", _DATE)]))
ACTION_FIELDS = [pa.field("action_name", pa.string()), pa.field("action_ts", TS), pa.field("action_url", pa.string())]


def message_schema(base_fields: list[pa.Field]) -> pa.Schema:
    """The table's columns: the message fields (send_time in UTC) plus the action fields."""
    return pa.schema([f.with_type(TS) if f.name == "send_time" else f for f in base_fields] + ACTION_FIELDS)


class MessageStream(SailthruStream):
    """One row per open or click (action_name/action_ts/action_url), or one row with null
    action fields for a message without any. A re-sent message (an `_update` file holds its
    activity so far) replaces its rows as a set: its NULL-action row goes once actions arrive."""

    parent_markers = False  # the NULL-action row of a message without actions is a real row

    base_fields: ClassVar[list[pa.Field]]  # as read from JSON (send_time naive, localised later)
    scrubs_itself = True  # before exploding: fewer rows to scan

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        schema = pa.schema([*self.base_fields, pa.field("opens", _OPENS), pa.field("clicks", _CLICKS)])
        parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        read = pj.ReadOptions(block_size=max(1 << 16, self.source.config.block_bytes // 4))
        # Whole-line chunks parsed one at a time (pyarrow's streaming reader grew to ~100 MB more
        # within a large file); the chunk's first line number makes errors exact without re-reading.
        with f.arrow_stream() as stream:
            for first_line, chunk in line_chunks(stream, self.source.config.block_bytes):
                try:
                    table = pj.read_json(pa.py_buffer(chunk), read_options=read, parse_options=parse,
                                         memory_pool=POOL)
                except pa.ArrowInvalid as exc:
                    raise locate_bad_line(f.name, first_line, chunk, exc) from None
                for batch in table.combine_chunks().to_batches():
                    yield from explode(batch, self.zone, self.schema, self.source.pii).to_batches()


def line_chunks(stream: Any, size: int) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, bytes of whole lines) of about `size` bytes; blank-only chunks skipped."""
    carry = b""
    line = 1
    while data := stream.read(size):
        data = carry + data
        cut = data.rfind(b"\n") + 1
        if not cut:
            carry = data
            continue
        chunk, carry = data[:cut], data[cut:]
        if chunk.strip():
            yield line, chunk
        line += chunk.count(b"\n")
    if carry.strip():
        yield line, carry


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


def locate_bad_line(name: str, first_line: int, chunk: bytes, error: Exception) -> SourceError:
    """Name the first line of `chunk` that is not a JSON object (or pass on pyarrow's message)."""
    for number, line in enumerate(chunk.split(b"\n"), first_line):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return SourceError(f"{name}:{number}: not valid JSON ({exc})")
        if not isinstance(value, dict):
            return SourceError(f"{name}:{number}: expected a JSON object, got {type(value).__name__}")
    return SourceError(f"{name}:{first_line}-{number}: {str(error).removeprefix('JSON parse error: ')}")


class MessageBlastStream(MessageStream):
    name = "message_blast"
    table = "message_blast"
    base_fields: ClassVar[list[pa.Field]] = [
        pa.field("profile_id", pa.string()), pa.field("send_time", pa.timestamp("ms")),
        pa.field("blast_id", pa.int64()), pa.field("message_id", pa.int64()), pa.field("device", pa.string()),
        pa.field("message_revenue", pa.float64()), pa.field("delivery_status", pa.string()),
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

def read_records(f: ExportFile, chunk: int) -> Iterator[list[dict[str, Any]]]:
    """Parsed lines in chunks; a bad line raises SourceError naming `file:line`."""
    records: list[dict[str, Any]] = []
    for number, line in iter_lines(f):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"{f.name}:{number}: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise SourceError(f"{f.name}:{number}: expected a JSON object, got {type(value).__name__}")
        records.append(value)
        if len(records) >= chunk:
            yield records
            records = []
    if records:
        yield records


class BlastStream(SailthruStream):
    name = "blast"
    table = "blast"
    primary_key = ("id",)
    fields: ClassVar[dict[str, str]] = {"id": "int", "name": "str", "day": "date"}
    schema = pa.schema([("id", pa.int64()), ("name", pa.string()), ("day", pa.date32())])

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        for records in read_records(f, 10_000):
            yield build_batch(records, self.fields, self.zone, extras=True)


PROFILE_MAPS = ("geo", "browser", "lists_signup", "vars")
PROFILE_FIELDS: dict[str, str] = {
    "id": "str", "optout_reason": "str", "optout_time": "ts", "signup_time": "ts", "create_date": "ts",
    "total_opens": "int", "total_clicks": "int", "total_unique_opens": "int", "total_unique_clicks": "int",
    "total_pageviews": "int", "total_messages": "int", "last_open": "ts", "last_click": "ts", "last_pageview": "ts",
}


class ProfileStream(SailthruStream):
    """The flat part of each profile; `email` is hashed (email_hash), dropped or kept per `pii`."""

    name = "profile"
    table = "profile"
    primary_key = ("id",)

    def __init__(self, source: SailthruSource) -> None:
        super().__init__(source)
        mode = source.config.pii
        self.email_column = {"hash": "email_hash", "keep": "email", "drop": None}[mode]
        fields = [pa.field(n, TS if k == "ts" else KINDS[k]) for n, k in PROFILE_FIELDS.items()]
        fields.insert(1, pa.field("geo_count", pa.int64()))
        if self.email_column:
            fields.insert(1, pa.field(self.email_column, pa.string()))
        self.schema = pa.schema(fields)

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        pii = self.source.pii
        for records in read_records(f, self.source.config.profile_lines):
            flat = []
            for r in records:
                row = {k: v for k, v in r.items() if k not in PROFILE_MAPS and k != "email"}
                row["geo_count"] = (r.get("geo") or {}).get("count")
                if self.email_column:
                    row[self.email_column] = pii.email(r.get("email"))
                flat.append(row)
            fields = dict(PROFILE_FIELDS, geo_count="int")
            if self.email_column:
                fields[self.email_column] = "str"
            yield build_batch(flat, fields, self.zone, extras=True)


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
        for records in read_records(f, self.source.config.profile_lines):
            columns: list[list[Any]] = [[] for _ in names]
            marker_tail = (None,) * (len(names) - 1)
            for r in records:
                rows = list(self.rows_of(r)) or [(r.get("id"), *marker_tail)]
                for row in rows:
                    for column, value in zip(columns, row, strict=True):
                        column.append(value)
            yield _columns_batch(dict(zip(names, columns, strict=True)), self.kinds, self.zone)


def _columns_batch(data: dict[str, list[Any]], kinds: dict[str, str], zone: str) -> pa.RecordBatch:
    arrays = {}
    for name, kind in kinds.items():
        try:
            arrays[name] = time_column(data[name], zone) if kind == "ts" else pa.array(data[name], KINDS[kind])
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, KeyError) as exc:
            raise SourceError(f"field {name}: {exc}") from None
    return pa.RecordBatch.from_pydict(arrays)


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
    schema = pa.schema([("id", pa.string()), ("scope", pa.string()), ("label", pa.string()), ("quantity", pa.int64())])


class ProfileBrowserStream(ProfileChildStream):
    name = "profile_browser"
    primary_key = ("id", "browser")
    kinds: ClassVar[dict[str, str]] = {"id": "str", "browser": "str", "quantity": "int"}
    rows_of = staticmethod(_browser_rows)
    schema = pa.schema([("id", pa.string()), ("browser", pa.string()), ("quantity", pa.int64())])


class ProfileListsSignupStream(ProfileChildStream):
    name = "profile_lists_signup"
    primary_key = ("id", "list")
    kinds: ClassVar[dict[str, str]] = {"id": "str", "list": "str", "signup_time": "ts"}
    rows_of = staticmethod(_list_rows)
    schema = pa.schema([("id", pa.string()), ("list", pa.string()), ("signup_time", TS)])


class ProfileVarsStream(ProfileChildStream):
    name = "profile_vars"
    primary_key = ("id", "var")
    kinds: ClassVar[dict[str, str]] = {"id": "str", "var": "str", "value": "str"}
    rows_of = staticmethod(_var_rows)
    schema = pa.schema([("id", pa.string()), ("var", pa.string()), ("value", pa.string())])


# --- exports: the freshness table -------------------------------------------------------------

class ExportsStream(SailthruStream):
    """One row per file floe has read: its name, collection, export date (from the name), lines
    and when it was ingested. Dashboards show `MAX(export_date)` as the data's freshness."""

    name = "exports"
    table = ""
    primary_key = ("name",)
    schema = pa.schema([
        ("name", pa.string()), ("collection", pa.string()), ("client_id", pa.string()),
        ("export_date", pa.date32()), ("rows", pa.int64()), ("bytes", pa.int64()),
        ("sha256", pa.string()), ("ingested_at", TS),
    ])

    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        lines = size = 0
        last = b"\n"
        with f.arrow_stream() as stream:
            while chunk := stream.read(1 << 20):
                lines += chunk.count(b"\n")
                size += len(chunk)
                last = chunk[-1:]
        if last != b"\n":
            lines += 1
        yield pa.RecordBatch.from_pylist([{
            "name": f.name, "collection": f.info.collection, "client_id": f.info.client_id,
            "export_date": f.info.export_date, "rows": lines, "bytes": size, "sha256": self.source.checksum(f),
            "ingested_at": datetime.now(UTC),
        }], schema=self.schema)


STREAMS: list[type[SailthruStream]] = [
    BlastStream, MessageBlastStream, MessageTransactionalStream, ProfileStream, ProfileGeoStream,
    ProfileBrowserStream, ProfileListsSignupStream, ProfileVarsStream, ExportsStream,
]
