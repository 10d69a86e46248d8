"""Redshift: staged rows go to S3 as several files, one COPY through a manifest, then merge + state.

A load of one stream:
1. leftovers of earlier crashed loads of this stream under `<stage>/<destination>/<source>/<stream>/`
   are deleted (paginated: any number of keys), those younger than the lease expiry excepted: they
   may be another live run's;
2. the job's rows are written as `parts` files of about equal size, `parts` = the cluster's slice
   count (`SELECT COUNT(*) FROM stv_slices`, or the `slices` key) x `files_per_slice`, as Parquet
   (default) or gzip CSV, each row carrying its arrival order `_floe_seq`, and uploaded in parallel
   with a manifest listing exactly those files (`mandatory: true`, with content lengths);
3. in ONE transaction: a temporary staging table, `COPY ... MANIFEST` into it, the disposition
   (append, replace = delete + insert, merge = deduplicate + delete + insert), `_floe_state` and
   `_floe_loads`;
4. the load's S3 objects are deleted, whether the transaction committed or not.

Leases and versions: Redshift has neither advisory locks nor enforced unique constraints. A
stream's lease is a `_floe_leases` row with an expiry, taken, renewed and released in short
transactions that first `LOCK` the table; the load transaction `LOCK`s `_floe_state` right before
it checks that the version it builds on is still the latest. Statements use `GETDATE()` (Redshift
runs `CURRENT_TIMESTAMP` on the leader node only, not in statements that read tables).

Type limits: text is VARCHAR(65535) (bytes). `long_strings: fail` (default) refuses a load holding a
longer value and names the column; `truncate` cuts such values at 65,535 bytes (on a UTF-8 character
boundary) and counts them in `_floe_loads.details`. JSON goes into SUPER via JSON_PARSE, so a JSON
document may not exceed 65,535 bytes either (a truncated document would be invalid; always an error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import model_validator

from floe.core.destination import SEQ, LoadJob, StagedFile, TableSpec, is_json, staged_column
from floe.core.errors import DestinationError, LeaseLostError
from floe.core.leases import Holder, Lease
from floe.core.settings import ExpiringLeaseConfig
from floe.destinations.column_types import SPELLED_OUT, ColumnRules
from floe.destinations.merge import NULL_SAFE_OR
from floe.destinations.postgres import MERGE_STYLE, PostgresConfig, PostgresDestination
from floe.destinations.rejected import RowRules, quarantined
from floe.destinations.schema_changes import SchemaPlan, Widening, plan_schema, routed
from floe.destinations.sql import LEASES_TABLE, SqlDestination, arrow_type_key
from floe.infra.objectstore import S3Store, StoreUrl
from floe.infra.parts import PartFormat, delete_leftover_loads, load_prefix, upload_parts
from floe.infra.pgconn import SslMode
from floe.infra.redshift_s3 import RedshiftS3Config

VARCHAR_MAX = 65535
log = logging.getLogger("floe.redshift")


class RowLease(Lease):
    """A `_floe_leases` row with an expiry, renewed while held."""

    def __init__(self, owner: RedshiftDestination, source: str, stream: str, token: str, expiry: float) -> None:
        super().__init__(owner.lease_name(source, stream), expiry)
        self.owner, self.source, self.stream, self.token = owner, source, stream, token

    def _renew(self) -> None:
        if not self.owner.lease_sql(self.owner.renew_lease_sql(), (self.source, self.stream, self.token)):
            raise LeaseLostError(f"{self.what}: the lease expired and another run took it over")

    def _release(self) -> None:
        self.owner.lease_sql(self.owner.release_lease_sql(), (self.source, self.stream, self.token))


class RedshiftConfig(PostgresConfig, ExpiringLeaseConfig, RedshiftS3Config):
    type: str = "redshift"
    port: int = 5439
    sslmode: SslMode = "verify-full"
    statement: ClassVar[str] = "COPY"

    region: str = "us-east-1"
    file_format: Literal["parquet", "csv"] = "parquet"
    slices: int | None = None  # default: SELECT COUNT(*) FROM stv_slices
    files_per_slice: int = 1
    long_strings: Literal["fail", "truncate"] = "fail"
    keep_staged_files: bool = False

    @model_validator(mode="after")
    def _slices(self) -> RedshiftConfig:
        if self.slices is not None and self.slices < 1 or self.files_per_slice < 1:
            raise ValueError("slices and files_per_slice must be at least 1")
        return self


def fit_strings(column: pa.Array | pa.ChunkedArray, max_bytes: int) -> tuple[pa.Array, int]:
    """Cut values longer than `max_bytes` UTF-8 bytes at a character boundary; return (column, how many)."""
    lengths = pc.binary_length(column)
    too_long = pc.greater(lengths, max_bytes)
    count = pc.sum(too_long).as_py() or 0
    if not count:
        return column, 0
    cut = [
        None if v is None else v.encode()[:max_bytes].decode("utf-8", "ignore")
        for v in pc.filter(column, too_long).to_pylist()
    ]
    return pc.replace_with_mask(column, too_long, pa.array(cut, pa.string())), int(count)


class RedshiftDestination(PostgresDestination):
    Config: ClassVar[type[RedshiftConfig]] = RedshiftConfig
    type_map: ClassVar[dict[str, str]] = {
        "bool": "BOOLEAN",
        "int32": "INTEGER",
        "int64": "BIGINT",
        "float64": "DOUBLE PRECISION",
        "decimal": "NUMERIC(38,9)",
        "string": f"VARCHAR({VARCHAR_MAX})",
        "binary": f"VARBYTE({VARCHAR_MAX})",
        "date": "DATE",
        "time": "TIME",
        "timestamp": "TIMESTAMP",
        "timestamp_tz": "TIMESTAMPTZ",
        "nested": "SUPER",
    }
    # Redshift's implicit conversions from the staging table's types that keep every value (VARCHAR
    # takes numbers, dates and timestamps as their text; JSON goes through JSON_PARSE into SUPER only).
    column_rules: ClassVar[ColumnRules] = ColumnRules(
        holds={
            "BOOLEAN": frozenset({"bool"}), "INTEGER": frozenset({"int32"}), "BIGINT": frozenset({"int32", "int64"}),
            "DOUBLE PRECISION": frozenset({"float64", "int32"}),
            "VARCHAR": frozenset({"string", "int32", "int64", "decimal", "date", "timestamp"}),
            "VARBYTE": frozenset({"binary"}), "DATE": frozenset({"date"}), "TIME": frozenset({"time"}),
            "TIMESTAMP": frozenset({"timestamp", "date"}), "TIMESTAMPTZ": frozenset({"timestamp_tz", "timestamp", "date"}),
            "SUPER": frozenset({"json", "nested"}),
        },
        decimals={"NUMERIC": (18, 0)},
        aliases={**SPELLED_OUT, "DECIMAL": "NUMERIC", "BINARY VARYING": "VARBYTE", "VARBINARY": "VARBYTE",
                 "TEXT": "VARCHAR", "CHARACTER": "CHAR", "BPCHAR": "CHAR"},
    )
    # ALTER COLUMN changes only a VARCHAR's length: a new column, a copy, drop and rename, in the transaction.
    widening = Widening(alter=None)
    json_type = "SUPER"
    text_type = f"VARCHAR({VARCHAR_MAX})"
    timestamp_tz_type = "TIMESTAMPTZ"
    merge_style = dataclasses.replace(MERGE_STYLE, null_safe_equals=NULL_SAFE_OR)  # no IS NOT DISTINCT FROM
    direct_load = False  # every disposition goes through the COPYed staging table
    json_parse: ClassVar[str] = "JSON_PARSE({})"
    stage_json_type: ClassVar[str] = f"VARCHAR({VARCHAR_MAX})"
    now_sql = "GETDATE()"
    unique_state_versions = False  # Redshift does not enforce unique constraints
    lock_state_sql = "LOCK {table}"
    lease_session_sql = ()  # Redshift's sessions take no keepalive settings (its leases expire instead)

    def __init__(self, name: str, config: Any, context: Any = None) -> None:
        super().__init__(name, config, context)
        self.stage_url = StoreUrl.parse(config.stage)
        self._store: S3Store | None = None
        self._slices: int | None = config.slices
        self._manifests: dict[str, str] = {}  # load_id -> manifest URI of that load's files

    # --- S3 ------------------------------------------------------------------------------------------
    @property
    def store(self) -> S3Store:
        if self._store is None:
            c = self.config
            secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
            self._store = S3Store.connect(
                self.stage_url, f"destinations.{self.name}.stage", c.region, c.endpoint_url,
                secret(c.aws_access_key_id), secret(c.aws_secret_access_key), secret(c.aws_session_token),
            )
        return self._store

    def check(self) -> list[str]:
        lines = super().check()
        lines.append(f"{self.slice_count()} slices: {self.slice_count() * self.config.files_per_slice} files per load")
        lines.append(self.store.check())
        return lines

    def slice_count(self) -> int:
        if self._slices is None:
            self._slices = int(self.query("SELECT COUNT(*) FROM stv_slices")[0][0]) or 1
        return self._slices

    # --- leases ------------------------------------------------------------------------------------
    def lease_sql(self, statement: str, params: tuple[Any, ...]) -> int:
        """Run `statement` in a transaction that first locks `_floe_leases`; return the rows it touched."""
        def run(conn: Any) -> int:
            with conn.transaction():
                conn.execute(f"LOCK {self.qualified(self.meta_schema, LEASES_TABLE)}")
                return int(conn.execute(statement, params).rowcount)

        return self.lease_session(run)

    def _expires_sql(self) -> str:
        return f"{self.now_sql} + INTERVAL '{int(self.config.lease_expiry_seconds)} seconds'"

    def renew_lease_sql(self) -> str:
        """Params: source, stream, token. Touches no row once the lease expired or went to another run."""
        return (f"UPDATE {self.qualified(self.meta_schema, LEASES_TABLE)} SET expires_at = {self._expires_sql()} "
                f"WHERE source = %s AND stream = %s AND token = %s AND expires_at > {self.now_sql}")

    def release_lease_sql(self) -> str:
        return (f"DELETE FROM {self.qualified(self.meta_schema, LEASES_TABLE)} "
                "WHERE source = %s AND stream = %s AND token = %s")

    def try_lease(self, source: str, stream: str) -> Lease | Holder:
        self.prepare_meta()
        me, token = Holder.me(), secrets.token_hex(8)
        leases = self.qualified(self.meta_schema, LEASES_TABLE)

        def take(conn: Any) -> Holder | None:
            with conn.transaction():  # under LOCK: nobody else reads or writes the row in between
                conn.execute(f"LOCK {leases}")
                row = conn.execute(
                    f"SELECT host, pid, since, expires_at, CASE WHEN expires_at > {self.now_sql} THEN 1 ELSE 0 END "
                    f"FROM {leases} WHERE source = %s AND stream = %s ORDER BY expires_at DESC LIMIT 1",
                    (source, stream)).fetchone()
                if row and row[4]:
                    return Holder(*row[:4])
                conn.execute(f"DELETE FROM {leases} WHERE source = %s AND stream = %s", (source, stream))
                conn.execute(f"INSERT INTO {leases} (source, stream, destination, host, pid, since, expires_at, token) "
                             f"VALUES (%s, %s, %s, %s, %s, {self.now_sql}, {self._expires_sql()}, %s)",
                             (source, stream, self.name, me.host, me.pid, token))
            if row:
                log.warning("event=lease_taken_over lease=%r expired_holder=%r", self.lease_name(source, stream),
                            Holder(*row[:4]).describe())
            return None

        return self.lease_session(take) or RowLease(self, source, stream, token, self.config.lease_expiry_seconds)

    def is_ddl_race(self, exc: Exception) -> bool:
        # Redshift aborts one of two transactions that would not be serializable (error 1023): run it again.
        return super().is_ddl_race(exc) or "Serializable isolation violation" in str(exc)

    # --- types -------------------------------------------------------------------------------------
    def column_type(self, f: pa.Field) -> str | None:
        if pa.types.is_decimal(f.type):
            if f.type.precision <= 38:
                return f"NUMERIC({f.type.precision},{f.type.scale})"
            return self.text_type  # wider than Redshift's NUMERIC(38): exact digits as text
        return SqlDestination.column_type(self, f)

    def stage_type(self, f: pa.Field) -> str:
        t = self.column_type(f)
        assert t is not None
        return self.stage_json_type if t == self.json_type else t

    def value_sql(self, f: pa.Field) -> str:
        value = super().value_sql(f)
        return self.json_parse.format(value) if self.column_type(f) == self.json_type else value

    def ensure_table(self, cur: Any, spec: TableSpec, staged: Sequence[StagedFile] = ()) -> SchemaPlan:
        return SqlDestination.ensure_table(self, cur, spec, staged)  # Redshift has no indexes

    def preview(self, job: LoadJob) -> SchemaPlan:
        """The schema plan of `job` against the table as it is now: variant columns are known before the
        parts are written (the load's transaction plans again and finds them in place)."""
        spec = self.located(job.table)
        with self.transaction() as cur:
            existing = self.existing_columns(cur, spec.schema_name, spec.table)
        plan = plan_schema(self.column_rules, self.widening, spec, existing, [f.schema for f in job.files],
                           self.column_type)
        return SchemaPlan() if plan.refusals else plan  # the transaction raises them

    # --- SQL (pure) ------------------------------------------------------------------------------
    def stage_fields(self, spec: TableSpec) -> list[pa.Field]:
        return [f for f in spec.columns if not pa.types.is_null(f.type)]

    def staging_ddl(self, spec: TableSpec, staging: str) -> str:
        cols = [f"{self.quote(f.name)} {self.stage_type(f)}" for f in self.stage_fields(spec)]
        return f"CREATE TEMP TABLE {staging} ({', '.join([*cols, f'{SEQ} BIGINT'])})"

    def copy_sql(self, staging: str, spec: TableSpec, manifest_uri: str) -> str:
        """One COPY of every file of the load, listed in the manifest."""
        source = f"FROM '{manifest_uri}' {self.config.credentials_sql()} MANIFEST"
        tail = "COMPUPDATE OFF STATUPDATE OFF"  # a temporary staging table needs neither
        if self.config.file_format == "parquet":
            # Columnar COPY maps columns by position (the part files hold exactly the staging columns,
            # in order) and reads from a bucket in the cluster's region.
            return f"COPY {staging} {source} FORMAT AS PARQUET"
        names = ", ".join([*(self.quote(f.name) for f in self.stage_fields(spec)), SEQ])
        options = "FORMAT AS CSV GZIP EMPTYASNULL TIMEFORMAT 'auto' DATEFORMAT 'auto' ACCEPTINVCHARS"
        if self.config.long_strings == "truncate":
            options += " TRUNCATECOLUMNS"
        return f"COPY {staging} ({names}) {source} REGION '{self.config.region}' {options} {tail}"

    # --- files ---------------------------------------------------------------------------------
    def part_schema(self, spec: TableSpec) -> pa.Schema:
        fields = []
        for f in self.stage_fields(spec):
            t = f.type
            key = arrow_type_key(t)
            if is_json(f) or key in ("nested", "string", "time") or (
                pa.types.is_decimal(t) and t.precision > 38
            ):
                t = pa.string()
            elif pa.types.is_timestamp(t):
                # CSV gets UTC wall time without a zone (Redshift reads it as UTC; Arrow formats it fast).
                t = pa.timestamp("us", "UTC" if t.tz and self.config.file_format == "parquet" else None)
            elif key == "binary":
                t = pa.binary() if self.config.file_format == "parquet" else pa.string()
            elif pa.types.is_dictionary(t):
                t = t.value_type
            fields.append(pa.field(f.name, t))
        return pa.schema([*fields, pa.field(SEQ, pa.int64())])

    def conform(self, batch: pa.RecordBatch, schema: pa.Schema, first_seq: int, counts: dict[str, int]) -> pa.Table:
        """The batch as exactly `schema`: missing columns NULL, JSON/nested as text, strings within limits."""
        arrays = []
        for f in schema:
            column, source = staged_column(batch, f, first_seq)
            if source is None:
                arrays.append(column)
                continue
            if pa.types.is_binary(source.type) and f.type == pa.string():
                column = pa.array([None if v is None else v.hex() for v in column.to_pylist()], pa.string())
            elif column.type != f.type:
                column = column.cast(f.type)
            if pa.types.is_string(f.type):
                column = pc.replace_substring(column, "\x00", "")
                if (pc.max(pc.binary_length(column)).as_py() or 0) > VARCHAR_MAX:
                    column = self._fit(column, f.name, is_json(source) or arrow_type_key(source.type) == "nested",
                                       counts)
            arrays.append(column)
        return pa.Table.from_arrays(arrays, schema=schema)

    def _fit(self, column: pa.Array, name: str, json_doc: bool, counts: dict[str, int]) -> pa.Array:
        longest = pc.max(pc.binary_length(column)).as_py() or 0
        if longest <= VARCHAR_MAX:
            return column
        where = f"destinations.{self.name}: column {name!r}"
        if json_doc:
            raise DestinationError(f"{where} holds a JSON document of {longest} bytes; Redshift's JSON_PARSE "
                                   f"takes at most {VARCHAR_MAX}")
        if self.config.long_strings == "fail":
            raise DestinationError(f"{where} holds a value of {longest} bytes, over Redshift's VARCHAR({VARCHAR_MAX}) "
                                   "limit (set long_strings: truncate to cut such values)")
        column, cut = fit_strings(column, VARCHAR_MAX)
        counts[name] = counts.get(name, 0) + cut
        return column

    # --- the load ----------------------------------------------------------------------------------
    def stream_prefix(self, job: LoadJob) -> str:
        return self.stage_url.key(self.name, job.source, job.stream) + "/"

    def upload(self, job: LoadJob) -> tuple[str, str]:
        """Write and upload the parts and their manifest; return (the load's key prefix, manifest URI).

        About equal parts, one per slice x files_per_slice (empty parts are skipped)."""
        delete_leftover_loads(self.store, self.stream_prefix(job), self.config.lease_expiry_seconds)
        prefix = load_prefix(self.stage_url, self.name, job)
        schema = self.part_schema(job.table)
        per_part = max(1, math.ceil(job.rows / (self.slice_count() * self.config.files_per_slice)))
        part_format = PartFormat("parquet") if self.config.file_format == "parquet" else PartFormat("csv.gz")
        counts: dict[str, int] = {}
        parts = upload_parts(self.store, prefix, job, schema, per_part, part_format,
                             lambda batch, first_seq: self.conform(batch, schema, first_seq, counts))
        if counts:
            job.details["truncated_values"] = sum(counts.values())
        entries = [{"url": p.uri, "mandatory": True, "meta": {"content_length": p.size}} for p in parts]
        manifest_key = prefix + "manifest.json"
        self.store.put_bytes(manifest_key, json.dumps({"entries": entries}, indent=1).encode())
        return prefix, self.store.uri(manifest_key)

    def row_rules(self) -> RowRules:
        long_text = VARCHAR_MAX if self.config.long_strings == "fail" else None  # else truncated
        return RowRules(max_text_bytes=long_text, max_json_bytes=VARCHAR_MAX)

    def load_group(self, jobs: list[LoadJob]) -> None:
        """Upload every job's parts (less the rows quarantine leaves out), then COPY and commit them all
        in one transaction."""
        prefixes: list[str] = []
        try:
            with ExitStack() as routing:
                jobs = routing.enter_context(quarantined(jobs, self.row_rules(), self.name))
                jobs = [routing.enter_context(routed(job, self.preview(job))) for job in jobs]
                for job in jobs:
                    if job.files:
                        prefix, self._manifests[job.load_id] = self.upload(job)
                        prefixes.append(prefix)
            super().load_group(jobs)
        finally:
            for job in jobs:
                self._manifests.pop(job.load_id, None)
            if not self.config.keep_staged_files:
                for prefix in prefixes:
                    self.store.delete_prefix(prefix)

    def stage_rows(self, cur: Any, job: LoadJob, staging: str) -> str:
        cur.execute(self.staging_ddl(job.table, staging))
        manifest = self._manifests.get(job.load_id)
        if manifest is not None:
            self.run_copy(cur, staging, job.table, manifest)
        return SEQ

    def run_copy(self, cur: Any, staging: str, spec: TableSpec, manifest_uri: str) -> None:
        cur.execute(self.copy_sql(staging, spec, manifest_uri))
