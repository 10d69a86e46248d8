"""SQL warehouse source (PostgreSQL or Redshift): tables of one schema as streams.

Discovery reads `information_schema` (tables, columns, primary keys) with bound parameters.
A table with a `replication_key` is read INCREMENTAL: `WHERE key >= bookmark ORDER BY key`, the
bookmark being the largest key value committed; rows equal to the bookmark are read again (rows
written in the same instant as the bookmark are never missed). A table with a primary key merges them
away; a table without one is appended to, and the state keeps a digest of each committed row equal
to the bookmark (`BoundaryRows`), so those rows are skipped when read again and only new ones land.
A table without a replication key is read FULL_TABLE and replaces the previous copy.

Rows stream in Arrow batches, never a whole table in memory. PostgreSQL tables are read with
binary COPY (`floe.infra.pgcopy.copy_batches`), columns of types it does not decode selected as text;
Redshift, which cannot COPY to the client, through a server-side cursor
(`floe.infra.pgconn.read_batches`), or, with `unload:` settings, by UNLOAD to S3 and reading the
Parquet parts back (`floe.sources.sql_unload`). All give the same batches: timestamps with time zone
as UTC, dates as dates, numeric(p, s) as decimals, and types without an Arrow equivalent (intervals,
arrays, enums, ...) as their text form.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Generator, Iterator
from datetime import date, datetime
from decimal import Decimal
from functools import partial
from typing import Any, ClassVar, Literal, cast
from urllib.parse import urlparse

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, SecretStr

from floe.core import secrets
from floe.core.destination import json_field
from floe.core.errors import ConfigError, SourceError
from floe.core.settings import Model, SourceConfig
from floe.core.stream import Batch, Context, DayRange, RefreshScope, Source, State, Stream
from floe.infra.pgconn import PostgresConnection, connect_postgres, describe, read_batches, url_keys
from floe.infra.pgcopy import copy_batches
from floe.infra.redshift_s3 import literal
from floe.infra.threads import in_thread, iterate_in_thread
from floe.sources.sql_unload import SqlUnloadConfig, Unloader, unload_select

ReadWith = Literal["copy", "cursor", "unload"]


class SqlTable(Model):
    name: str
    replication_key: str | None = Field(default=None, description="Column read incrementally (>= bookmark).")
    primary_key: list[str] | None = Field(default=None, description="Overrides the discovered primary key.")
    read_with: ReadWith | None = Field(
        default=None, description="This table's way of reading, instead of the source's `read_with` "
        "(e.g. unload for the large tables of a Redshift source and cursor for the small ones).")


class SqlSourceConfig(SourceConfig):
    type: Literal["sql"] = "sql"
    url: SecretStr = Field(description="postgresql://user:password@host:port/db or redshift://...")
    schema_: str = Field(default="public", alias="schema")
    tables: list[SqlTable | str] | None = Field(default=None, description="Tables to read (default: all).")
    batch_rows: int = Field(default=50_000, gt=0)
    read_with: ReadWith | None = Field(
        default=None, description="copy (binary COPY, PostgreSQL's default), cursor (Redshift's default) or unload "
        "(Redshift: UNLOAD to S3, the default once `unload` is set).")
    unload: SqlUnloadConfig | None = Field(
        default=None, description="Redshift: where and as whom UNLOAD writes (S3 stage, IAM role or access keys).")


log = logging.getLogger("floe.sources.sql")

# udt_name -> Arrow type of the value as `read_batches` delivers it; anything else is read as text.
UDT_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(), "int2": pa.int16(), "int4": pa.int32(), "int8": pa.int64(), "oid": pa.int64(),
    "float4": pa.float32(), "float8": pa.float64(), "text": pa.string(), "varchar": pa.string(),
    "bpchar": pa.string(), "char": pa.string(), "name": pa.string(), "uuid": pa.string(),
    "date": pa.date32(), "time": pa.time64("us"), "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", "UTC"), "bytea": pa.binary(),
}
JSON_UDTS = {"json", "jsonb", "super"}
TIME_UDTS = {"date", "timestamp", "timestamptz"}  # replication keys a backfill can select days of
# udt_names whose binary COPY values `floe.infra.pgcopy` decodes; COPY selects the other columns as text
COPY_UDTS = {"bool", "int2", "int4", "int8", "oid", "float4", "float8", "text", "varchar", "bpchar", "name",
             "date", "time", "timestamp", "timestamptz", "bytea", "json", "jsonb"}


def connection_settings(url: str, where: str) -> PostgresConnection:
    """Connection keys from a postgresql:// or redshift:// URL (the password is registered as a secret)."""
    try:
        keys = url_keys(url)
    except ValueError as exc:
        raise ConfigError(f"{where}.url: {exc}") from None
    return PostgresConnection.model_validate(keys)


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _arrow_field(name: str, udt: str, precision: int | None, scale: int | None) -> pa.Field:
    if udt in JSON_UDTS:
        return json_field(name)
    if udt == "numeric":
        if precision and precision <= 38:
            return pa.field(name, pa.decimal128(precision, scale or 0))
        return pa.field(name, pa.string())
    return pa.field(name, UDT_TYPES.get(udt, pa.string()))


def _select(name: str, udt: str, copy: bool, redshift: bool = False) -> str:
    """The column's SELECT expression: as itself where the reader has a mapping for its type, else text
    (on Redshift VARCHAR(65535): its TEXT is a VARCHAR(256), too short for a GEOMETRY's text)."""
    native = udt in COPY_UDTS if copy else (udt in UDT_TYPES or udt in JSON_UDTS or udt == "numeric")
    text = "VARCHAR(65535)" if redshift else "text"
    return quote(name) if native else f"CAST({quote(name)} AS {text}) AS {quote(name)}"


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


class BoundaryRows:
    """The rows an append table committed at its bookmark, as digests with counts (state key
    `boundary_rows`): a run skips as many rows of each digest among those equal to the bookmark it
    reads again, and records the rows equal to the new bookmark. A digest is of every column's value;
    a column added to the table meanwhile makes those rows new once."""

    STATE_KEY = "boundary_rows"

    def __init__(self, key: str, bookmark: Any, committed: dict[str, int] | None) -> None:
        self.key, self.bookmark = key, bookmark
        self.skip = Counter(committed or {}) if bookmark is not None else Counter()
        self.rows: Counter[str] = Counter(self.skip)  # the committed rows equal to `bookmark`
        self.skipping = bool(self.skip)

    @staticmethod
    def digest(row: dict[str, Any]) -> str:
        return hashlib.blake2b(repr(sorted(row.items())).encode(), digest_size=10).hexdigest()

    def new_rows(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """`batch` less the rows committed before (they come first: the read is ordered by the key)."""
        if not self.skipping or not batch.num_rows:
            return batch
        column = batch.column(self.key)
        first = pc.min(column)
        if _json_value(first.as_py()) != self.bookmark:
            self.skipping = False
            return batch
        at_bookmark = pc.fill_null(pc.equal(column, first), False)
        keep = [True] * batch.num_rows
        for i, row in zip(pc.indices_nonzero(at_bookmark).to_pylist(), batch.filter(at_bookmark).to_pylist(),
                          strict=True):
            digest = self.digest(row)
            if self.skip[digest] > 0:
                self.skip[digest] -= 1
                keep[i] = False
        self.skipping = at_bookmark.true_count == batch.num_rows and sum(self.skip.values()) > 0
        return batch.filter(pa.array(keep))

    def advance(self, batch: pa.RecordBatch, top: Any) -> dict[str, int]:
        """Record `batch`'s rows equal to its largest key value `top` (JSON form); the state's value."""
        if top is None:
            return dict(self.rows)
        if top != self.bookmark:
            self.bookmark, self.rows = top, Counter()
        column = batch.column(self.key)
        at_top = pc.fill_null(pc.equal(column, pc.max(column)), False)
        self.rows.update(self.digest(row) for row in batch.filter(at_top).to_pylist())
        return dict(self.rows)


class SqlStream(Stream):
    def __init__(self, source: SqlSource, table: str, schema: pa.Schema, udts: dict[str, str],
                 primary_key: tuple[str, ...], replication_key: str | None, read_with: ReadWith = "cursor") -> None:
        self.source = source
        self.read_with = read_with
        self.name = table
        self.schema = schema
        self.udts = udts
        self.primary_key = primary_key
        self.cursor_field = replication_key
        self.disposition = ("merge" if primary_key else "append") if replication_key else "replace"
        if replication_key is not None and udts[replication_key] in TIME_UDTS:
            self.range_column = replication_key  # a backfill reads days of it

    def query(self, state: State | None, copy: bool = False, scope: RefreshScope | None = None,
              unload: bool = False) -> tuple[str, list[Any]]:
        """The SELECT of a run from `state`, or (`scope`) of a backfill's range of the replication key;
        for an UNLOAD (`unload`) with its values as literals (UNLOAD takes no parameters)."""
        table = f"{quote(self.source.config.schema_)}.{quote(self.name)}"
        selects = [unload_select(name, udt, f.type) if unload
                   else _select(name, udt, copy, self.source.redshift)
                   for (name, udt), f in zip(self.udts.items(), self.schema, strict=True)]
        sql, params = f"SELECT {', '.join(selects)} FROM {table}", cast(list[Any], [])
        key = self.cursor_field
        if key is None:
            return sql, params

        def value(v: Any) -> str:
            if unload:
                return f"CAST({literal(str(v))} AS {self.udts[key]})"
            params.append(v)
            return f"CAST(%s AS {self.udts[key]})"

        bookmark = self.bookmark(state)
        if scope is not None:
            sql += f" WHERE {quote(key)} >= {value(_json_value(scope.start))} AND {quote(key)} < {value(_json_value(scope.end))}"
        elif bookmark is not None:
            sql += f" WHERE {quote(key)} >= {value(bookmark)}"
        return sql + f" ORDER BY {quote(key)}", params

    def bookmark(self, state: State | None) -> Any:
        """The committed largest replication key value (None: none yet, or of another key)."""
        return (state or {}).get("replication_key_value") if (state or {}).get("replication_key") == self.cursor_field \
            else None

    def backfill_scope(self, days: DayRange, state: State | None) -> RefreshScope:
        key = self.cursor_field
        assert key is not None
        udt = self.udts[key]
        start, end = ((days.first, days.end.date()) if udt == "date" else (days.start, days.end) if udt == "timestamptz"
                      else (days.start.replace(tzinfo=None), days.end.replace(tzinfo=None)))
        bookmark = self.bookmark(state)
        if self.disposition == "append" and (bookmark is None or str(bookmark) < _json_value(end)):
            loaded = f"is loaded up to {key} = {bookmark}" if bookmark is not None else "is not loaded yet"
            raise ConfigError(f"{self.source.where}: table {self.name} (appended, no primary key) {loaded}: "
                              f"--to {days.last} must end before it, or the next run would append those rows again")
        return RefreshScope(key, start, end)

    def read_range(self, scope: RefreshScope) -> AsyncIterator[Batch]:
        return self._read(self.query(None, self.read_with == "copy", scope, self.read_with == "unload"), None)

    def typed(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """A COPY batch with the columns read as text but declared otherwise (numeric) cast to their type."""
        for i, (f, wanted) in enumerate(zip(batch.schema, self.schema, strict=True)):
            if pa.types.is_string(f.type) and pa.types.is_decimal(wanted.type):
                try:
                    batch = batch.set_column(i, wanted, batch.column(i).cast(wanted.type))
                except pa.ArrowInvalid as exc:  # NaN
                    raise SourceError(f"{self.source.where}: table {self.name}, column {f.name!r}: {exc}") from None
        return batch

    def read(self, state: State | None) -> AsyncIterator[Batch]:
        return self._read(self.query(state, self.read_with == "copy", unload=self.read_with == "unload"), state)

    async def _read(self, query: tuple[str, list[Any]], state: State | None) -> AsyncIterator[Batch]:
        sql, params = query
        key = self.cursor_field
        bookmark = self.bookmark(state)
        boundary = BoundaryRows(key, bookmark, (state or {}).get(BoundaryRows.STATE_KEY)) \
            if key is not None and self.disposition == "append" else None
        rows = partial(self.source.batches, self, sql, params)
        async with iterate_in_thread(rows, name=f"sql:{self.name}") as batches:
            async for batch in batches:
                if key is None:
                    yield Batch(batch)
                    continue
                if boundary is not None:
                    batch = boundary.new_rows(batch)
                top = _json_value(pc.max(batch.column(key)).as_py()) if batch.num_rows else None
                bookmark = top if top is not None else bookmark
                checkpoint = {"replication_key": key, "replication_key_value": bookmark}
                if boundary is not None:
                    checkpoint[BoundaryRows.STATE_KEY] = boundary.advance(batch, top)
                yield Batch(batch, checkpoint)
        if key is None:
            yield Batch(checkpoint={"full_table": True})


class SqlSource(Source):
    Config: ClassVar[type[SqlSourceConfig]] = SqlSourceConfig

    def __init__(self, name: str, config: SqlSourceConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        self.where = f"sources.{name}"
        self.connection = connection_settings(config.url.get_secret_value(), self.where)
        self.redshift = urlparse(config.url.get_secret_value()).scheme == "redshift"
        if config.unload is not None and not self.redshift:
            raise ConfigError(f"{self.where}: UNLOAD is Redshift's (a redshift:// url); PostgreSQL reads with COPY")
        self._check_read_with(config.read_with, f"{self.where}.read_with")
        for i, table in enumerate(config.tables or []):
            if isinstance(table, SqlTable):
                self._check_read_with(table.read_with, f"{self.where}.tables[{i}].read_with")
        # decided by discovery: COPY unless configured otherwise or the server is Redshift (8.0.2)
        self.reads_with_copy = config.read_with == "copy"
        self.unloader = Unloader(config.unload, name, self.where) if config.unload is not None else None
        self._streams: list[Stream] | None = None

    def _check_read_with(self, read_with: ReadWith | None, key: str) -> None:
        if read_with == "copy" and self.redshift:
            raise ConfigError(f"{key}: Redshift cannot COPY to the client; use cursor or unload")
        if read_with == "unload" and not self.redshift:
            raise ConfigError(f"{key}: UNLOAD is Redshift's (a redshift:// url); PostgreSQL reads with COPY")
        if read_with == "unload" and self.config.unload is None:
            raise ConfigError(f"{self.where}.unload: read_with: unload needs the S3 stage and credentials "
                              "(unload: {stage: s3://bucket/prefix, iam_role: arn:aws:iam::...})")

    def read_with(self, table: SqlTable | None) -> ReadWith:
        """How `table` is read: its own `read_with`, else the source's (UNLOAD once `unload` is set), else
        COPY or a cursor as discovery found the server."""
        chosen = (table.read_with if table else None) or self.config.read_with
        if chosen is None and self.unloader is not None:
            return "unload"
        return chosen or ("copy" if self.reads_with_copy else "cursor")

    def connect(self) -> Any:
        return connect_postgres(self.connection, where=self.where, error=SourceError, application_name="floe-sql")

    def batches(self, stream: SqlStream, sql: str, params: list[Any]) -> Generator[pa.RecordBatch, None, None]:
        """`stream`'s rows, selected by `sql`, as Arrow batches read with binary COPY, a cursor or an
        UNLOAD (as the source reads), on a connection of their own (closed when the iterator is)."""
        try:
            if stream.read_with == "unload":
                assert self.unloader is not None  # checked with the config
                yield from self.unloader.batches(stream.name, stream.schema, sql, stream.cursor_field, self.run_unload,
                                                 self.config.batch_rows)
            else:
                yield from self._session_batches(stream, sql, params)
        except SourceError:
            raise
        except Exception as exc:
            hint = ""
            if stream.read_with == "copy" and isinstance(exc, psycopg.errors.QueryCanceled) and "timeout" in str(exc):
                hint = (" (a table is read by one COPY statement, which statement_timeout ends: raise it for "
                        f"this user, or set {self.where}.read_with: cursor)")
            raise SourceError(f"{self.where}: reading table {stream.name} from {describe(self.connection)} failed: "
                              f"{secrets.redact(str(exc)).strip()}{hint}") from None

    def _session_batches(self, stream: SqlStream, sql: str, params: list[Any]) -> Iterator[pa.RecordBatch]:
        conn = self.connect()
        try:
            conn.read_only = True
            if stream.read_with == "copy":
                for batch in copy_batches(conn, sql, params, self.config.batch_rows):
                    yield stream.typed(batch)
            else:
                yield from read_batches(conn, sql, params, self.config.batch_rows)
            conn.commit()
        finally:
            conn.close()

    def run_unload(self, statement: str) -> int:
        """Run one UNLOAD on a session of its own; the rows it wrote (`pg_last_unload_count()`)."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                cur.execute("SELECT pg_last_unload_count()")
                row = cur.fetchone()
            conn.commit()
            return int(row[0]) if row else 0
        finally:
            conn.close()

    def discover(self) -> list[Stream]:
        schema = self.config.schema_
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY table_name",
                    (schema,),
                )
                tables = [r[0] for r in cur.fetchall()]
                cur.execute(
                    "SELECT table_name, column_name, udt_name, numeric_precision, numeric_scale "
                    "FROM information_schema.columns WHERE table_schema = %s ORDER BY table_name, ordinal_position",
                    (schema,),
                )
                columns: dict[str, list[tuple[str, str, int | None, int | None]]] = {}
                for table, column, udt, precision, scale in cur.fetchall():
                    columns.setdefault(table, []).append((column, udt, precision, scale))
                cur.execute(
                    "SELECT kc.table_name, kc.column_name FROM information_schema.table_constraints tc "
                    "JOIN information_schema.key_column_usage kc ON kc.constraint_schema = tc.constraint_schema "
                    "AND kc.constraint_name = tc.constraint_name AND kc.table_schema = tc.table_schema "
                    "AND kc.table_name = tc.table_name "
                    "WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = %s "
                    "ORDER BY kc.table_name, kc.ordinal_position",
                    (schema,),
                )
                keys: dict[str, list[str]] = {}
                for table, column in cur.fetchall():
                    keys.setdefault(table, []).append(column)
            conn.commit()
            if self.config.read_with is None:
                self.reads_with_copy = not self.redshift and conn.info.server_version >= 90000
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{self.where}: discovery failed on {describe(self.connection)}: "
                              f"{secrets.redact(str(exc)).strip()}") from None
        finally:
            conn.close()
        wanted = self._wanted(tables)
        streams: list[Stream] = []
        for i, (table, spec) in enumerate(wanted):
            where = f"{self.where}.tables[{i}]"
            if table not in tables:
                raise ConfigError(f"{where}: no table {table!r} in schema {schema!r} "
                                  f"(it has {', '.join(tables) or 'no tables'})")
            cols = columns.get(table, [])
            fields = [_arrow_field(column, udt, precision, scale) for column, udt, precision, scale in cols]
            udts = {column: udt for column, udt, _, _ in cols}
            names = {c[0] for c in cols}
            pk = tuple(spec.primary_key) if spec and spec.primary_key else tuple(keys.get(table, []))
            rk = spec.replication_key if spec else None
            for key, what in [*((k, "primary_key") for k in pk), *(((rk, "replication_key"),) if rk else ())]:
                if key not in names:
                    raise ConfigError(f"{where}.{what}: table {table} has no column {key!r}")
            streams.append(SqlStream(self, table, pa.schema(fields), udts, pk, rk, self.read_with(spec)))
        return streams

    def _wanted(self, tables: list[str]) -> list[tuple[str, SqlTable | None]]:
        if self.config.tables is None:
            return [(t, None) for t in tables]
        return [(t, None) if isinstance(t, str) else (t.name, t) for t in self.config.tables]

    def streams(self) -> list[Stream]:
        if self._streams is None:
            self._streams = self.discover()
        return self._streams

    async def check(self) -> list[str]:
        streams = await in_thread(self.streams)  # connects, reads the catalog, checks the tables and keys
        lines = [f"{describe(self.connection)}: connected, {len(streams)} tables to read in schema {self.config.schema_}"]
        unloading = any(isinstance(s, SqlStream) and s.read_with == "unload" for s in streams)
        if self.unloader is not None and unloading:  # floe reads and deletes what UNLOAD writes there
            lines.append(await in_thread(self.unloader.store.check))
        return lines
