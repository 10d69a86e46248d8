"""BigQuery: Parquet parts on GCS, one load job into a fresh staging table, then one transaction.

A load of one stream:
1. the job's rows are written as Parquet parts (JSON and nested values as text, plus the arrival
   order `_floe_seq`) and uploaded to `<stage>/<destination>/<source>/<stream>/<YYYY/MM/DD>/<load_id>/`;
2. DDL outside the transaction (BigQuery allows no DDL on permanent tables inside one): the target
   table (`PARTITION BY DATE(col)` and `CLUSTER BY` when configured), missing columns
   (`ADD COLUMN IF NOT EXISTS`), and a staging table `_floe_staging_<load_id>` that expires by itself;
3. one load job (`WRITE_TRUNCATE`, job id derived from the load id, so a retried insert is not
   run twice) fills the staging table from the parts;
4. one query job runs `BEGIN TRANSACTION; <append | replace | MERGE>; INSERT _floe_state;
   INSERT _floe_loads; COMMIT TRANSACTION;` with the state passed as query parameters (a group of
   streams, `load_group`: every stream's statements in that one transaction, parameters suffixed);
   each stream's state version check fails the script (which rolls the transaction back) unless the
   version the commit builds on is still the stream's latest;
5. the staging table is dropped and the GCS objects are deleted (paginated), committed or not.

A stream's lease is an object in the stage bucket (`<stage>/_floe_leases/<project>.<dataset>/
<source>/<stream>.json`), taken and renewed with `ifGenerationMatch` (see `leases.py`).

Quotas: every load job writes its own staging table, so the target table never takes a load job
(its changes are DML, which the daily table-modification limit does not count), and
`commit_interval_seconds` (default 300) folds a stream's checkpoints into at most one load per
interval: a stream run all day long uses at most 288 load jobs, against 100,000 per project.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import field_validator

from floe.config import DestinationConfig, ExpiringLeaseConfig
from floe.destinations.base import (
    SEQ,
    CommittedState,
    Destination,
    LoadJob,
    TableSpec,
    is_json,
    refresh_copy,
    staged_column,
    state_conflict,
)
from floe.destinations.bigquery_api import API, BigQueryApi, param, scalar_type
from floe.destinations.column_types import ColumnRules, narrowing_message, refused
from floe.destinations.leases import Holder, Lease, take_object_lease
from floe.destinations.objectstore import GCSStore, StoreUrl
from floe.destinations.sql import LOADS_TABLE, STATE_TABLE, arrow_type_key
from floe.engine.stage import StagedFile
from floe.engine.stream import RefreshScope
from floe.errors import DestinationError
from floe.secrets import redact

log = logging.getLogger("floe.bigquery")
# The version check's error: "floe_state_conflict <source>.<stream>: latest version <n>".
CONFLICT = "floe_state_conflict"

class BigQueryConfig(DestinationConfig, ExpiringLeaseConfig):
    type: str = "bigquery"
    project: str
    dataset: str
    stage: str  # gs://bucket/prefix
    location: str = "US"
    table_name: str = "{source}_{stream}"  # one dataset holds every source's tables
    partition_by: dict[str, str] = {}  # "<source>.<stream>" -> a TIMESTAMP/DATE column (daily partitions)
    cluster_by: dict[str, list[str]] = {}  # "<source>.<stream>" -> up to 4 columns
    commit_interval_seconds: float = 300.0
    rows_per_file: int = 1_000_000
    staging_expiration_hours: int = 24
    api_endpoint: str = API  # another endpoint (an emulator) is used without credentials
    keep_staged_files: bool = False

    @field_validator("stage")
    @classmethod
    def _gcs_url(cls, value: str) -> str:
        if not value.startswith("gs://") or not value[5:].strip("/"):
            raise ValueError("must be a GCS URL like gs://bucket/prefix")
        return value

    @field_validator("cluster_by")
    @classmethod
    def _four_columns(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for table, columns in value.items():
            if not 1 <= len(columns) <= 4:
                raise ValueError(f"{table}: BigQuery clusters by 1 to 4 columns")
        return value


TYPE_MAP: dict[str, str] = {
    "bool": "BOOL",
    "int32": "INT64",
    "int64": "INT64",
    "float64": "FLOAT64",
    "decimal": "BIGNUMERIC",
    "string": "STRING",
    "binary": "BYTES",
    "date": "DATE",
    "time": "TIME",
    "timestamp": "DATETIME",
    "timestamp_tz": "TIMESTAMP",
    "nested": "JSON",
}
# The load job's schema for the staging table: JSON arrives as text and is parsed in the transaction.
STAGE_TYPE = {**TYPE_MAP, "nested": "STRING"}
# What BigQuery's implicit coercions from the staging table's types keep exactly (INT64 -> NUMERIC,
# BIGNUMERIC, FLOAT64; NUMERIC -> BIGNUMERIC; DATE -> DATETIME); NUMERIC is NUMERIC(38, 9).
COLUMN_RULES = ColumnRules(
    holds={
        "BOOL": frozenset({"bool"}), "INT64": frozenset({"int32", "int64"}), "FLOAT64": frozenset({"float64", "int32"}),
        "STRING": frozenset({"string"}), "BYTES": frozenset({"binary"}), "DATE": frozenset({"date"}),
        "TIME": frozenset({"time"}), "DATETIME": frozenset({"timestamp", "date"}),
        "TIMESTAMP": frozenset({"timestamp_tz"}), "JSON": frozenset({"json", "nested"}),
    },
    decimals={"NUMERIC": (38, 9), "BIGNUMERIC": (76, 38)},
    aliases={"INTEGER": "INT64", "INT": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "DECIMAL": "NUMERIC",
             "BIGDECIMAL": "BIGNUMERIC"},
)


def quote(identifier: str) -> str:
    return "`" + identifier.replace("\\", "\\\\").replace("`", "\\`") + "`"


@dataclass
class LoadPlan:
    """Everything one load sends to BigQuery, as data (tested by parsing, run by `BigQueryApi`)."""

    table: str  # the target's `project.dataset.table`
    staging: str
    uris: list[str]
    ddl: list[str]
    load_job: dict[str, Any]
    body: list[str]  # the statements inside the transaction: rows, state, load row
    parameters: list[dict[str, Any]]
    after: list[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        return transaction_script([self])


def transaction_script(plans: list[LoadPlan]) -> str:
    """One query job committing every plan's rows, state and load row together (or none of them)."""
    return ";\n".join(["BEGIN TRANSACTION", *(s for plan in plans for s in plan.body), "COMMIT TRANSACTION"]) + ";"


class BigQueryDestination(Destination):
    Config: ClassVar[type[BigQueryConfig]] = BigQueryConfig
    group_size = 98  # a transaction changes at most 100 tables, and _floe_state and _floe_loads are two

    def __init__(self, name: str, config: Any, context: Any = None) -> None:
        super().__init__(name, config, context)
        self.commit_interval = config.commit_interval_seconds
        self.stage_url = StoreUrl.parse(config.stage)
        self.where = f"destinations.{name}"
        self._store: GCSStore | None = None
        self._api: BigQueryApi | None = None
        self._lock = threading.Lock()  # one transaction at a time: they all write _floe_state
        self._meta_ready = False  # _floe_state and _floe_loads exist

    @property
    def store(self) -> GCSStore:
        if self._store is None:
            self._store = GCSStore.connect(self.stage_url, f"{self.where}.stage", self.config.project)
        return self._store

    @property
    def api(self) -> BigQueryApi:
        if self._api is None:
            self._api = BigQueryApi(self.config, self.where)
        return self._api

    # --- names and types ------------------------------------------------------------------------
    def ref(self, table: str) -> str:
        return quote(f"{self.config.project}.{self.config.dataset}.{table}")

    def table_name(self, spec: TableSpec) -> str:
        return self.config.table_name.format(source=spec.schema_name, stream=spec.table)

    @staticmethod
    def column_type(f: pa.Field, types: dict[str, str] = TYPE_MAP) -> str | None:
        if pa.types.is_null(f.type):
            return None
        if is_json(f):
            return types["nested"]
        if pa.types.is_decimal(f.type) and f.type.precision <= 38 and f.type.scale <= 9:
            return f"NUMERIC({f.type.precision}, {f.type.scale})" if types is TYPE_MAP else "NUMERIC"
        return types.get(arrow_type_key(f.type), "STRING")

    def fields(self, spec: TableSpec) -> list[pa.Field]:
        return [f for f in spec.columns if not pa.types.is_null(f.type)]

    # --- SQL and job configuration (pure) -------------------------------------------------------
    def create_table_sql(self, spec: TableSpec) -> str:
        key = f"{spec.schema_name}.{spec.table}"
        columns = [f"{quote(f.name)} {self.column_type(f)}" for f in self.fields(spec)]
        columns += ["_floe_load_id STRING", "_floe_loaded_at TIMESTAMP"]
        sql = f"CREATE TABLE IF NOT EXISTS {self.ref(self.table_name(spec))} ({', '.join(columns)})"
        if key in self.config.partition_by:
            sql += f" PARTITION BY DATE({quote(self.config.partition_by[key])})"
        if key in self.config.cluster_by:
            sql += " CLUSTER BY " + ", ".join(quote(c) for c in self.config.cluster_by[key])
        return sql

    def add_columns_sql(self, spec: TableSpec, existing: Collection[str]) -> list[str]:
        missing = [f for f in self.fields(spec) if f.name not in existing]
        if not missing or not existing:
            return []
        adds = ", ".join(f"ADD COLUMN IF NOT EXISTS {quote(f.name)} {self.column_type(f)}" for f in missing)
        return [f"ALTER TABLE {self.ref(self.table_name(spec))} {adds}"]

    def staging_ddl(self, spec: TableSpec, staging: str) -> str:
        columns = [f"{quote(f.name)} {self.column_type(f, STAGE_TYPE)}" for f in self.fields(spec)]
        columns.append(f"{SEQ} INT64")
        return (f"CREATE TABLE IF NOT EXISTS {self.ref(staging)} ({', '.join(columns)}) OPTIONS (expiration_timestamp"
                f" = TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL {self.config.staging_expiration_hours} HOUR))")

    def meta_ddl(self) -> list[str]:
        return [
            f"CREATE TABLE IF NOT EXISTS {self.ref(STATE_TABLE)} (source STRING, stream STRING, version INT64, "
            "state STRING, load_id STRING, committed_at TIMESTAMP)",
            f"CREATE TABLE IF NOT EXISTS {self.ref(LOADS_TABLE)} (load_id STRING, source STRING, stream STRING, "
            "destination STRING, rows INT64, started_at TIMESTAMP, finished_at TIMESTAMP, status STRING, "
            "error STRING, details STRING)",
        ]

    def load_job_config(self, spec: TableSpec, staging: str, uris: list[str]) -> dict[str, Any]:
        schema = [{"name": f.name, "type": self.column_type(f, STAGE_TYPE), "mode": "NULLABLE"}
                  for f in self.fields(spec)]
        schema.append({"name": SEQ, "type": "INT64", "mode": "NULLABLE"})
        return {"load": {
            "sourceUris": uris,
            "sourceFormat": "PARQUET",
            "destinationTable": {"projectId": self.config.project, "datasetId": self.config.dataset,
                                 "tableId": staging},
            "schema": {"fields": schema},
            "writeDisposition": "WRITE_TRUNCATE",  # a retried job replaces, never doubles, the staged rows
            "createDisposition": "CREATE_NEVER",
            "parquetOptions": {"enableListInference": True},
        }}

    def value_sql(self, f: pa.Field) -> str:
        value = f"S.{quote(f.name)}"
        return f"PARSE_JSON({value})" if self.column_type(f) == "JSON" else value

    def dedup_sql(self, spec: TableSpec, staging: str) -> str:
        keys = ", ".join(quote(k) for k in spec.primary_key)
        return (f"SELECT * EXCEPT (_floe_rank) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {keys} "
                f"ORDER BY {SEQ} DESC) AS _floe_rank FROM {self.ref(staging)}) WHERE _floe_rank = 1")

    def disposition_sql(self, spec: TableSpec, staging: str, suffix: str = "") -> list[str]:
        """`suffix` ends the names of the job's query parameters (each job of a group has its own)."""
        target = self.ref(self.table_name(spec))
        fields = self.fields(spec)
        names = ", ".join([*(quote(f.name) for f in fields), "_floe_load_id", "_floe_loaded_at"])
        values = ", ".join([*(self.value_sql(f) for f in fields), f"@load_id{suffix}", "CURRENT_TIMESTAMP()"])
        if spec.disposition in ("append", "replace"):
            insert = f"INSERT INTO {target} ({names}) SELECT {values} FROM {self.ref(staging)} AS S"
            return ([f"DELETE FROM {target} WHERE TRUE"] if spec.disposition == "replace" else []) + [insert]
        if not spec.primary_key:
            raise DestinationError(f"{spec.schema_name}.{spec.table}: merge needs a primary key")

        def match(keys: tuple[str, ...]) -> str:
            return " AND ".join(f"(T.{quote(k)} = S.{quote(k)} OR (T.{quote(k)} IS NULL AND S.{quote(k)} IS NULL))"
                                for k in keys)

        if spec.parent_key:  # a re-sent parent replaces all its child rows
            return [
                f"DELETE FROM {target} AS T WHERE EXISTS (SELECT 1 FROM {self.ref(staging)} AS S "
                f"WHERE {match(spec.parent_key)})",
                f"INSERT INTO {target} ({names}) SELECT {values} FROM ({self.dedup_sql(spec, staging)}) AS S "
                f"WHERE {spec.not_marker_sql(lambda k: f'S.{quote(k)}') or 'TRUE'}",
            ]
        updates = ", ".join([*(f"{quote(f.name)} = {self.value_sql(f)}" for f in fields),
                             f"_floe_load_id = @load_id{suffix}", "_floe_loaded_at = CURRENT_TIMESTAMP()"])
        return [
            f"MERGE {target} AS T USING ({self.dedup_sql(spec, staging)}) AS S ON {match(spec.primary_key)} "
            f"WHEN MATCHED THEN UPDATE SET {updates} "
            f"WHEN NOT MATCHED THEN INSERT ({names}) VALUES ({values})"
        ]

    def version_check_sql(self, suffix: str = "") -> str:
        """Fails the script (ERROR) unless the stream's latest state version is still @base_version."""
        source, stream = f"@source{suffix}", f"@stream{suffix}"
        latest = f"COALESCE((SELECT MAX(version) FROM {self.ref(STATE_TABLE)} WHERE source = {source} AND " \
                 f"stream = {stream}), 0)"
        return (f"SELECT IF({latest} = @base_version{suffix}, 0, ERROR(CONCAT('{CONFLICT} ', {source}, '.', "
                f"{stream}, ': latest version ', CAST({latest} AS STRING))))")

    def state_sql(self, suffix: str = "", refresh: bool = False, checked: bool = False) -> list[str]:
        """The new state version (`checked`: after the version check) and the load row; a full
        refresh's commits to its copy write no state."""
        if refresh:
            return [self.load_row_sql("'refreshing'", "NULL", suffix)]
        state = self.ref(STATE_TABLE)
        source, stream = f"@source{suffix}", f"@stream{suffix}"
        return [
            *([self.version_check_sql(suffix)] if checked else []),
            f"INSERT INTO {state} (source, stream, version, state, load_id, committed_at) "
            f"SELECT {source}, {stream}, COALESCE(MAX(version), 0) + 1, @state{suffix}, @load_id{suffix}, "
            f"CURRENT_TIMESTAMP() FROM {state} WHERE source = {source} AND stream = {stream}",
            self.load_row_sql("'committed'", "NULL", suffix),
        ]

    def load_row_sql(self, status: str, error: str, suffix: str = "") -> str:
        values = ", ".join(f"@{name}{suffix}" for name in ("load_id", "source", "stream", "destination", "rows",
                                                            "started_at"))
        return (f"INSERT INTO {self.ref(LOADS_TABLE)} (load_id, source, stream, destination, rows, started_at, "
                f"finished_at, status, error, details) VALUES ({values}, CURRENT_TIMESTAMP(), {status}, {error}, "
                f"@details{suffix})")

    @staticmethod
    def parameters(job: LoadJob, destination: str, suffix: str = "") -> list[dict[str, Any]]:
        return [param(name + suffix, kind, value) for name, kind, value in [
            ("source", "STRING", job.source), ("stream", "STRING", job.stream),
            ("state", "STRING", json.dumps(job.checkpoint, sort_keys=True)),
            ("load_id", "STRING", job.load_id), ("destination", "STRING", destination),
            ("rows", "INT64", job.rows), ("started_at", "TIMESTAMP", job.started_at.isoformat()),
            ("details", "STRING", json.dumps(job.details, sort_keys=True) if job.details else None),
            *([("base_version", "INT64", job.base_version)] if job.base_version is not None else []),
        ]]

    def views_sql(self, spec: TableSpec) -> list[str]:
        """The stream's views, transpiled from their portable (PostgreSQL) SQL to BigQuery."""
        import sqlglot

        statements = []
        columns = ", ".join(f'"{f.name}"' for f in self.fields(spec)) + ', "_floe_load_id", "_floe_loaded_at"'
        for name, template in spec.views:
            sql = template.format(table=f'"{self.config.dataset}"."{self.table_name(spec)}"', columns=columns)
            body = sqlglot.transpile(sql, read="postgres", write="bigquery")[0]
            view = self.config.table_name.format(source=spec.schema_name, stream=name)
            statements.append(f"CREATE OR REPLACE VIEW {self.ref(view)} AS {body}")
        return statements

    def refuse_narrowing(self, spec: TableSpec, files: list[StagedFile], existing: Mapping[str, str]) -> None:
        """Raise DestinationError if a column would not hold the spec's or a staged file's values exactly."""
        planned = {f.name: t for f in spec.columns if (t := self.column_type(f)) is not None}
        refusals = refused(COLUMN_RULES, {**planned, **existing}, spec.columns, [f.schema for f in files],
                           self.column_type)
        if refusals:
            raise DestinationError(narrowing_message(refusals))

    def plan(self, job: LoadJob, uris: list[str], existing: Mapping[str, str], meta_ready: bool = False,
             suffix: str = "") -> LoadPlan:
        """The load's statements; DDL known to be done already (meta tables, an existing table) is left out.
        `suffix` ends its query parameters' names (each job of a group has its own). `existing`: the
        target's columns and their BigQuery types; raises DestinationError if one of them would not
        hold the staged values exactly."""
        spec = job.table
        self.refuse_narrowing(spec, job.files, existing)
        staging = f"_floe_staging_{job.load_id.replace('-', '_')}"
        ddl = [*([] if meta_ready else self.meta_ddl()), *([] if existing else [self.create_table_sql(spec)]),
               *self.add_columns_sql(spec, existing)]
        body = self.disposition_sql(spec, staging, suffix) if uris or spec.disposition == "replace" else []
        if uris or spec.disposition == "replace":
            ddl.append(self.staging_ddl(spec, staging))
        return LoadPlan(
            table=f"{self.config.project}.{self.config.dataset}.{self.table_name(spec)}", staging=staging,
            uris=uris, ddl=ddl, load_job=self.load_job_config(spec, staging, uris),
            body=[*body, *self.state_sql(suffix, job.refresh, job.base_version is not None)],
            parameters=self.parameters(job, self.name, suffix),
            after=[*self.views_sql(spec), f"DROP TABLE IF EXISTS {self.ref(staging)}"],
        )

    # --- files ----------------------------------------------------------------------------------
    def part_schema(self, spec: TableSpec) -> pa.Schema:
        out = []
        for f in self.fields(spec):
            key = arrow_type_key(f.type)
            if is_json(f) or key in ("nested", "string") or pa.types.is_dictionary(f.type):
                t: pa.DataType = pa.string()
            elif pa.types.is_timestamp(f.type):
                t = pa.timestamp("us", "UTC" if f.type.tz else None)
            else:
                t = f.type
            out.append(pa.field(f.name, t))
        return pa.schema([*out, pa.field(SEQ, pa.int64())])

    def write_parts(self, job: LoadJob, folder: Path) -> list[Path]:
        schema = self.part_schema(job.table)
        paths: list[Path] = []
        writer: pq.ParquetWriter | None = None
        in_part = seq = 0
        for staged in job.files:
            for batch in pq.ParquetFile(staged.path).iter_batches(batch_size=65_536):
                arrays = []
                for f in schema:
                    column, _ = staged_column(batch, f, seq)
                    arrays.append(column if column.type == f.type else column.cast(f.type))
                table = pa.Table.from_arrays(arrays, schema=schema)
                seq += batch.num_rows
                offset = 0
                while offset < table.num_rows:
                    if writer is None:
                        paths.append(folder / f"part-{len(paths):05d}.parquet")
                        writer, in_part = pq.ParquetWriter(paths[-1], schema, compression="zstd"), 0
                    take = min(self.config.rows_per_file - in_part, table.num_rows - offset)
                    writer.write_table(table.slice(offset, take))
                    offset, in_part = offset + take, in_part + take
                    if in_part >= self.config.rows_per_file:
                        writer.close()
                        writer = None
        if writer is not None:
            writer.close()
        return paths

    def upload(self, job: LoadJob) -> tuple[str, list[str]]:
        day = datetime.now(UTC)
        prefix = self.stage_url.key(self.name, job.source, job.stream, f"{day:%Y/%m/%d}", job.load_id) + "/"
        with tempfile.TemporaryDirectory(prefix="floe-bigquery-") as tmp:
            paths = self.write_parts(job, Path(tmp))
            keys = [prefix + p.name for p in paths]
            self.store.put_files(list(zip(keys, paths, strict=True)))
        return prefix, [self.store.uri(k) for k in keys]

    # --- running --------------------------------------------------------------------------------
    def job_id(self, job: LoadJob, step: str) -> str:
        return f"floe_{self.name}_{job.source}_{job.stream}_{job.load_id}_{step}".replace("-", "_")[:1024]

    def existing_columns(self, spec: TableSpec) -> dict[str, str]:
        """The table's columns (none: no table) and their types as BigQuery names them (`NUMERIC(12, 2)`)."""
        rows = self.api.query(
            f"SELECT column_name, data_type FROM {quote(f'{self.config.project}.{self.config.dataset}')}"
            ".INFORMATION_SCHEMA.COLUMNS WHERE table_name = @table",
            [{"name": "table", "parameterType": {"type": "STRING"},
              "parameterValue": {"value": self.table_name(spec)}}],
        )
        return {r[0]: r[1] for r in rows}

    def load(self, job: LoadJob) -> None:
        self.load_group([job])

    def load_group(self, jobs: list[LoadJob]) -> None:
        """Every job's rows, state and load row in ONE transaction script (BigQuery's transactions span
        tables); each job's DDL, staging table and load job come before it."""
        # A full refresh's rows wait in the table's refresh copy until finish_refresh.
        jobs = [dataclasses.replace(job, table=refresh_copy(job.table)) if job.refresh else job for job in jobs]
        prefixes: list[str] = []
        plans: list[LoadPlan] = []
        try:
            for n, job in enumerate(jobs):
                uris: list[str] = []
                if job.files:
                    prefix, uris = self.upload(job)
                    prefixes.append(prefix)
                plans.append(self.plan(job, uris, self.existing_columns(job.table), self._meta_ready or n > 0,
                                       f"_{n + 1}" if n else ""))
            with self._lock:
                for job, plan in zip(jobs, plans, strict=True):
                    for statement in plan.ddl:
                        self.api.ddl(statement)
                    self._meta_ready = True
                    if plan.uris:
                        self.api.run_job(self.job_id(job, "load"), plan.load_job)
                for job in jobs:
                    job.check_lease()
                self.api.query(transaction_script(plans), [p for plan in plans for p in plan.parameters],
                               job_id=self.job_id(jobs[0], "commit"))
        except DestinationError as exc:
            self.raise_conflict(exc, jobs)
            tables = ", ".join(f"{j.table.schema_name}.{j.table.table}" for j in jobs)
            raise DestinationError(f"{self.name}: loading {tables} failed, nothing committed: {exc}") from None
        finally:
            if not self.config.keep_staged_files:
                for prefix in prefixes:
                    self.store.delete_prefix(prefix)
        # Committed. Views and the staging tables' removal are tidying: a failure is logged, not raised
        # (staging tables expire by themselves).
        for statement in (s for plan in plans for s in plan.after):
            try:
                self.api.query(statement)
            except DestinationError as exc:
                log.warning("event=bigquery_after_commit_failed destination=%s error=%s", self.name, exc)

    # --- full refresh: rows wait in a copy of the table, which replaces its rows in one transaction ---
    def begin_refresh(self, table: TableSpec) -> None:
        self.api.query(f"DROP TABLE IF EXISTS {self.ref(self.table_name(refresh_copy(table)))}")

    def refresh_plan(self, job: LoadJob, existing: Mapping[str, str], copied: Collection[str],
                     scope: RefreshScope | None, meta_ready: bool = False) -> LoadPlan:
        """The statements that swap a full refresh in: `existing` are the target's columns and types,
        `copied` the refresh copy's columns. Raises DestinationError if a column would narrow a value."""
        spec = job.table
        self.refuse_narrowing(spec, job.files, existing)
        target, copy = self.ref(self.table_name(spec)), self.ref(self.table_name(refresh_copy(spec)))
        ddl = [*([] if meta_ready else self.meta_ddl()), *([] if existing else [self.create_table_sql(spec)]),
               *self.add_columns_sql(spec, existing)]
        names = "".join(f"{quote(c)}, " for c in copied if c not in ("_floe_load_id", "_floe_loaded_at"))
        parameters = self.parameters(job, self.name)
        delete = f"DELETE FROM {target} WHERE TRUE"
        if scope is not None:
            delete = f"DELETE FROM {target} WHERE {quote(scope.column)} >= @refresh_start"
            parameters.append(param("refresh_start", scalar_type(scope.start), scope.start))
        body = [delete, f"INSERT INTO {target} ({names}_floe_load_id, _floe_loaded_at) "
                        f"SELECT {names}@load_id, CURRENT_TIMESTAMP() FROM {copy}"]
        return LoadPlan(table=f"{self.config.project}.{self.config.dataset}.{self.table_name(spec)}",
                        staging=self.table_name(refresh_copy(spec)), uris=[], ddl=ddl, load_job={},
                        body=[*body, *self.state_sql(checked=job.base_version is not None)], parameters=parameters,
                        after=[*self.views_sql(spec), f"DROP TABLE IF EXISTS {copy}"])

    def finish_refresh(self, job: LoadJob, scope: RefreshScope | None = None) -> None:
        try:
            plan = self.refresh_plan(job, self.existing_columns(job.table),
                                     self.existing_columns(refresh_copy(job.table)), scope, self._meta_ready)
            with self._lock:
                for statement in plan.ddl:
                    self.api.ddl(statement)
                self._meta_ready = True
                job.check_lease()
                self.api.query(plan.script, plan.parameters, job_id=self.job_id(job, "commit"))
        except DestinationError as exc:
            self.raise_conflict(exc, [job])
            raise DestinationError(f"{self.name}: replacing {job.table.schema_name}.{job.table.table} by its full "
                                   f"refresh failed, nothing committed: {exc}") from None
        for statement in plan.after:
            try:
                self.api.query(statement)
            except DestinationError as exc:
                log.warning("event=bigquery_after_commit_failed destination=%s error=%s", self.name, exc)

    def record_failure(self, job: LoadJob, error: str) -> None:
        """Best effort: a `failed` row in `_floe_loads` (nothing of the failed load was committed)."""
        params = [p for p in self.parameters(job, self.name) if p["name"] != "state"]
        params.append(param("error", "STRING", redact(error)[:4000]))
        try:
            self.ensure_meta()
            self.api.query(self.load_row_sql("'failed'", "@error"), params)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never hide the original error
            log.warning("event=bigquery_record_failure_failed destination=%s error=%s", self.name, redact(str(exc)))

    def raise_conflict(self, exc: DestinationError, jobs: list[LoadJob]) -> None:
        """Raise StateConflictError if `exc` is the version check of one of `jobs` failing."""
        for job in jobs:
            if found := re.search(rf"{CONFLICT} {re.escape(f'{job.source}.{job.stream}')}: latest version (\d+)",
                                  str(exc)):
                raise state_conflict(self.name, job, int(found[1])) from None

    def ensure_meta(self) -> None:
        if not self._meta_ready:
            for statement in self.meta_ddl():
                self.api.ddl(statement)
            self._meta_ready = True

    def read_state(self, source: str, stream: str) -> CommittedState:
        self.ensure_meta()
        rows = self.api.query(
            f"SELECT version, state FROM {self.ref(STATE_TABLE)} WHERE source = @source AND stream = @stream "
            "ORDER BY version DESC LIMIT 1",
            [param("source", "STRING", source), param("stream", "STRING", stream)],
        )
        return CommittedState(int(rows[0][0]), json.loads(rows[0][1])) if rows else CommittedState()

    def try_lease(self, source: str, stream: str) -> Lease | Holder:
        key = self.stage_url.key("_floe_leases", f"{self.config.project}.{self.config.dataset}", source,
                                 f"{stream}.json")
        return take_object_lease(self.store, key, self.lease_name(source, stream), self.config.lease_expiry_seconds)

    def states(self) -> list[dict[str, Any]]:
        self.ensure_meta()
        rows = self.api.query(
            f"SELECT source, stream, version, state, load_id, committed_at FROM {self.ref(STATE_TABLE)} WHERE TRUE "
            "QUALIFY ROW_NUMBER() OVER (PARTITION BY source, stream ORDER BY version DESC) = 1 ORDER BY source, stream"
        )
        return [{"source": r[0], "stream": r[1], "version": int(r[2]), "state": json.loads(r[3]), "load_id": r[4],
                 "committed_at": r[5]} for r in rows]

    def check(self) -> list[str]:
        dataset = self.api.call("GET", f"/datasets/{self.config.dataset}")
        location = dataset.get("location", "?")
        if location.upper() != self.config.location.upper():
            raise DestinationError(f"{self.where}: dataset {self.config.project}.{self.config.dataset} is in "
                                   f"{location}, not in the configured location {self.config.location}")
        return [f"dataset {self.config.project}.{self.config.dataset} reachable ({location})", self.store.check()]

    def close(self) -> None:
        if self._api is not None:
            self._api.http.close()
            self._api = None
