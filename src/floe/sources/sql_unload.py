"""Redshift tables read through `UNLOAD ... TO 's3://...' FORMAT AS PARQUET MANIFEST` (`read_with: unload`).

A read of one table:
1. leftovers of earlier reads of this table that died (`<stage>/<source>/<table>/<YYYY/MM/DD>/<run>/`,
   older than a day) are deleted;
2. one `UNLOAD` writes the SELECT's rows as Parquet parts and a manifest under a prefix of this run
   only (no ALLOWOVERWRITE: an object already there fails the UNLOAD instead of mixing two reads).
   The SELECT is a string literal of the statement, its quotes and backslashes doubled (Redshift's
   `QUOTE_LITERAL` rule); its bookmark is a literal too (UNLOAD takes no bound parameters). A read
   with a replication key is `ORDER BY` it and `PARALLEL OFF`: Redshift then writes the parts one after
   another, sorted absolutely, so batches and checkpoints come in key order as on the other read
   paths; a full-table read is `PARALLEL ON` (parts per slice, in no order);
3. the manifest (`{"entries": [{"url", "meta": {"content_length"}}]}`) lists the parts; each must be
   in the listing with that size, and the rows read must be the count `pg_last_unload_count()` gave.
   A result without rows writes no part (and maybe no manifest): one empty batch;
4. the parts are read in manifest order by ranged requests, a row group at a time (memory is bounded
   by a row group, never a part), and given the stream's declared Arrow types (Redshift writes
   TIMESTAMPTZ without its zone: the values are UTC);
5. the run's objects are deleted, whether the read finished, failed or was stopped (a delete that
   fails is a warning: the read's own outcome stands, and a read a day later deletes them).

Columns of types Parquet cannot carry (TIME, VARBYTE, GEOMETRY, ...) are selected as text, SUPER as
`JSON_SERIALIZE`. Access keys go into the statement (as in the Redshift destination's COPY); they are
registered secrets, and the statement is never logged.
"""

from __future__ import annotations

import json
import logging
import secrets as tokens
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from floe.core import secrets
from floe.core.errors import SourceError
from floe.infra.objectread import open_object
from floe.infra.objectstore import S3Store, StoreUrl
from floe.infra.parts import delete_leftover_loads
from floe.infra.redshift_s3 import RedshiftS3Config, literal

log = logging.getLogger("floe.sources.sql")

LEFTOVER_AGE = 24 * 3600  # seconds: a read that started longer ago is not running any more
# udt_names UNLOAD writes to Parquet as themselves; other columns are selected as text
UNLOAD_UDTS = {"bool", "int2", "int4", "int8", "float4", "float8", "varchar", "bpchar", "text", "date",
               "timestamp", "timestamptz", "numeric"}


class SqlUnloadConfig(RedshiftS3Config):
    """Where and as whom UNLOAD writes (the stage's objects of a run are deleted after it)."""

    statement: ClassVar[str] = "UNLOAD"

    region: str | None = Field(default=None, description="The bucket's region, when not the cluster's (UNLOAD's REGION).")
    max_file_size_mb: int | None = Field(default=None, ge=5, le=6200, description="UNLOAD's MAXFILESIZE (default 6.2 GB).")


def unload_select(name: str, udt: str, declared: pa.DataType) -> str:
    """The column's SELECT expression in an UNLOAD: as itself where Parquet carries its type, else text."""
    column = '"' + name.replace('"', '""') + '"'
    if udt == "super":
        return f"JSON_SERIALIZE({column}) AS {column}"
    if udt in UNLOAD_UDTS and (udt != "numeric" or pa.types.is_decimal(declared)):
        return column
    return f"CAST({column} AS VARCHAR(65535)) AS {column}"


def _from_text(column: pa.Array, wanted: pa.DataType) -> pa.Array:
    if pa.types.is_time(wanted):  # HH:MM:SS[.ffffff]: as a time of 1970-01-01
        stamps = pc.cast(pc.binary_join_element_wise("1970-01-01T", column, ""), pa.timestamp("us"))
        return pc.cast(pc.cast(stamps, pa.int64()), wanted)
    if pa.types.is_binary(wanted):  # PostgreSQL's bytea text form \x<hex>
        return pa.array([None if v is None else bytes.fromhex(v[2:]) for v in column.to_pylist()], wanted)
    return pc.cast(column, wanted)


def conform(batch: pa.RecordBatch, schema: pa.Schema, where: str) -> pa.RecordBatch:
    """A batch of an UNLOAD part as exactly `schema` (columns by position: the SELECT's order)."""
    if batch.num_columns != len(schema):
        raise SourceError(f"{where}: an UNLOAD part has {batch.num_columns} columns, the table {len(schema)}")
    arrays = []
    for column, f in zip(batch.columns, schema, strict=True):
        try:
            if column.type == f.type:
                pass
            elif pa.types.is_timestamp(column.type) and pa.types.is_timestamp(f.type):
                column = column.cast(f.type)  # a naive TIMESTAMPTZ holds UTC wall time
            elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = _from_text(column, f.type)
            else:
                column = column.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
            raise SourceError(f"{where}, column {f.name!r}: UNLOAD wrote {column.type}, which does not give "
                              f"{f.type}: {exc}") from None
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class Unloader:
    """UNLOADs of one source's tables to its S3 stage, and reading them back."""

    def __init__(self, config: SqlUnloadConfig, source: str, where: str) -> None:
        self.config, self.source, self.where = config, source, where
        self.url = StoreUrl.parse(config.stage)
        self._store: S3Store | None = None
        for value in (config.aws_access_key_id, config.aws_secret_access_key, config.aws_session_token):
            if value is not None:
                secrets.register(value.get_secret_value())

    @property
    def store(self) -> S3Store:
        if self._store is None:
            c = self.config
            secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
            self._store = S3Store.connect(self.url, f"{self.where}.unload.stage", c.region, c.endpoint_url,
                                          secret(c.aws_access_key_id), secret(c.aws_secret_access_key),
                                          secret(c.aws_session_token))
        return self._store

    def statement(self, select: str, target: str, ordered: bool) -> str:
        """The UNLOAD of `select` to the `target` prefix (s3://bucket/.../run/)."""
        sql = (f"UNLOAD ({literal(select)}) TO {literal(target)} {self.config.credentials_sql()} FORMAT AS PARQUET MANIFEST "
               f"PARALLEL {'OFF' if ordered else 'ON'}")
        if self.config.max_file_size_mb is not None:
            sql += f" MAXFILESIZE {self.config.max_file_size_mb} MB"
        if self.config.region is not None:
            sql += f" REGION {literal(self.config.region)}"
        return sql

    def table_prefix(self, table: str) -> str:
        return self.url.key(self.source, table) + "/"

    def batches(self, table: str, schema: pa.Schema, select: str, order_key: str | None,
                run: Callable[[str], int], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """`select`'s rows, UNLOADed by `run(statement)` (which returns the rows unloaded), as `schema`'s batches."""
        where = f"{self.where}: table {table}"
        stream_prefix = self.table_prefix(table)
        delete_leftover_loads(self.store, stream_prefix, LEFTOVER_AGE)
        now = datetime.now(UTC)
        prefix = f"{stream_prefix}{now:%Y/%m/%d}/{now:%Y%m%dT%H%M%SZ}-{tokens.token_hex(4)}/"
        try:
            log.info("event=unload table=%s to=%s ordered=%s", table, self.store.uri(prefix), order_key is not None)
            unloaded = run(self.statement(select, self.store.uri(prefix), order_key is not None))
            read = 0
            last: Any = None
            for batch in self._read(prefix, schema, unloaded, batch_rows, where):
                if order_key is not None and batch.num_rows and not pa.types.is_string(batch.schema.field(order_key).type):
                    last = self._in_order(batch.column(order_key), last, where)  # (text: the server's collation)
                read += batch.num_rows
                yield batch
            if read != unloaded:
                raise SourceError(f"{where}: UNLOAD wrote {unloaded} rows, its parts hold {read}")
        finally:
            try:
                self.store.delete_prefix(prefix)
            except Exception as exc:  # never instead of the read's own outcome; a read a day later deletes them
                log.warning("event=unload_cleanup_failed table=%s prefix=%s error=%s", table, self.store.uri(prefix),
                            secrets.redact(str(exc)))

    @staticmethod
    def _in_order(column: pa.Array, last: Any, where: str) -> Any:
        """The batch's largest key, after checking the batch does not start below the one before."""
        low, high = pc.min(column).as_py(), pc.max(column).as_py()
        if low is not None and last is not None and low < last:
            raise SourceError(f"{where}: the UNLOAD parts are not in key order ({low} after {last}); "
                              "the checkpoints would skip rows")
        return high if high is not None else last

    def manifest(self, prefix: str, unloaded: int, where: str) -> list[tuple[str, int]]:
        """The (key, size) of each part the manifest lists, in its order."""
        data = self.store.get_bytes(prefix + "manifest")
        if data is None:
            if unloaded:
                raise SourceError(f"{where}: UNLOAD wrote {unloaded} rows but no manifest at "
                                  f"{self.store.uri(prefix + 'manifest')}")
            return []  # no rows: UNLOAD writes no files
        try:
            entries = json.loads(data)["entries"]
            bucket = f"s3://{self.url.bucket}/"
            parts = [(str(e["url"]), int(e["meta"]["content_length"])) for e in entries]
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{where}: the UNLOAD manifest is not what Redshift writes: {exc!r}") from None
        for url, _ in parts:
            if not url.startswith(bucket + prefix):
                raise SourceError(f"{where}: the UNLOAD manifest lists {url}, outside {self.store.uri(prefix)}")
        return [(url.removeprefix(bucket), size) for url, size in parts]

    def _read(self, prefix: str, schema: pa.Schema, unloaded: int, batch_rows: int,
              where: str) -> Iterator[pa.RecordBatch]:
        listed = {info.key: info for info in self.store.objects(prefix)}
        parts = self.manifest(prefix, unloaded, where)
        for key, size in parts:  # every part is there, whole, before any is read
            info = listed.get(key)
            if info is None or info.size != size:
                found = "missing" if info is None else f"{info.size} bytes"
                raise SourceError(f"{where}: UNLOAD part {self.store.uri(key)} of {size} bytes is {found}")
        yielded = False
        for key, _ in parts:
            with open_object(self.store, listed[key]) as handle:
                part = pq.ParquetFile(handle, pre_buffer=True, coerce_int96_timestamp_unit="us")  # (INT96: years 1-9999)
                for batch in part.iter_batches(batch_size=batch_rows):
                    yielded = True
                    yield conform(batch, schema, where)
        if not yielded:  # an empty result still tells the caller its columns
            yield pa.RecordBatch.from_pylist([], schema=schema)
