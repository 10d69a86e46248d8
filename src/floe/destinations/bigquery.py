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
import threading
from collections.abc import Collection, Mapping
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import field_validator

from floe.core.destination import (
    CommittedState,
    Destination,
    LoadJob,
    StateChange,
    StateVersion,
    TableSpec,
    refresh_copy,
    staged_column,
    state_conflict,
)
from floe.core.errors import DestinationError
from floe.core.leases import Holder, Lease, take_object_lease
from floe.core.runs import RunRecord
from floe.core.secrets import redact
from floe.core.settings import DestinationConfig, ExpiringLeaseConfig, StateHistoryConfig
from floe.core.stream import RefreshScope
from floe.destinations.bigquery_api import API, BigQueryApi, param
from floe.destinations.bigquery_sql import (
    CONFLICT,
    RUN_TYPES,
    BigQuerySql,
    LoadPlan,
    quote,
    transaction_script,
)
from floe.destinations.drift import DRIFT_TABLE, ages_query
from floe.destinations.ledger import LEDGER_TABLE, with_ledger
from floe.destinations.rejected import RowRules, quarantined
from floe.destinations.run_log import RUNS_COLUMNS, RUNS_TABLE, is_missing_table, run_of, run_values
from floe.destinations.schema_changes import SchemaPlan, log_changes, routed, variant_refresh_error
from floe.destinations.sql import LOADS_TABLE, STATE_TABLE
from floe.destinations.state_ops import version_of
from floe.infra.objectstore import GCSStore, StoreUrl
from floe.infra.parts import PartFormat, load_prefix, upload_parts

log = logging.getLogger("floe.bigquery")
PARTS = PartFormat("parquet", compression="zstd")


class BigQueryConfig(DestinationConfig, ExpiringLeaseConfig, StateHistoryConfig):
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

    def places(self, base: Path) -> list[str]:  # the dataset holds every source's tables and the state
        return [f"the BigQuery dataset {self.project}.{self.dataset}"
                + (f" at {self.api_endpoint}" if self.api_endpoint != API else "")]

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


class BigQueryDestination(BigQuerySql, Destination):
    Config: ClassVar[type[BigQueryConfig]] = BigQueryConfig
    # A transaction changes at most 100 tables; floe's own are five (state, loads, ledger, drift, rejected).
    group_size = 95
    records_drift = True
    keeps_ledger = True

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

    def upload(self, job: LoadJob) -> tuple[str, list[str]]:
        """Write and upload the job's Parquet parts; return (the load's key prefix, the parts' URIs)."""
        prefix = load_prefix(self.stage_url, self.name, job)
        schema = self.part_schema(job.table)

        def conform(batch: pa.RecordBatch, first_seq: int) -> pa.Table:
            columns = [staged_column(batch, f, first_seq)[0] for f in schema]
            return pa.Table.from_arrays([c if c.type == f.type else c.cast(f.type) for c, f in zip(
                columns, schema, strict=True)], schema=schema)

        parts = upload_parts(self.store, prefix, job, schema, self.config.rows_per_file, PARTS, conform)
        return prefix, [p.uri for p in parts]

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
        """The jobs (less the rows their streams quarantine: JSON columns that are not JSON) committed by
        `commit_group`."""
        with quarantined(jobs, RowRules(), self.name) as checked:
            self.commit_group(checked)

    def commit_group(self, jobs: list[LoadJob]) -> None:
        """Every job's rows, state and load row in ONE transaction script (BigQuery's transactions span
        tables); each job's DDL, staging table and load job come before it."""
        # A full refresh's rows wait in the table's refresh copy until finish_refresh.
        jobs = [dataclasses.replace(job, table=refresh_copy(job.table)) if job.refresh else job for job in jobs]
        prefixes: list[str] = []
        plans: list[LoadPlan] = []
        routing = ExitStack()
        try:
            for n, job in enumerate(jobs):
                existing = self.existing_columns(job.table)
                schema = self.schema_plan(job.table, job.files, existing)  # variant columns named in the parts
                jobs[n] = job = routing.enter_context(routed(job, SchemaPlan() if schema.refusals else schema))
                uris: list[str] = []
                if job.files:
                    prefix, uris = self.upload(job)
                    prefixes.append(prefix)
                plans.append(self.plan(job, uris, existing, self._meta_ready or n > 0, f"_{n + 1}" if n else ""))
            routing.close()
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
            routing.close()
            if not self.config.keep_staged_files:
                for prefix in prefixes:
                    self.store.delete_prefix(prefix)
        for job in jobs:
            log_changes(self.name, job)
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
        if self.schema_plan(spec, job.files, existing).reshaped:
            raise variant_refresh_error(self.name, spec)
        evolve = self.evolve_sql(spec, job.files, existing)
        target, copy = self.ref(self.table_name(spec)), self.ref(self.table_name(refresh_copy(spec)))
        ddl = [*([] if meta_ready else self.meta_ddl()), *([] if existing else [self.create_table_sql(spec)]), *evolve]
        names = "".join(f"{quote(c)}, " for c in copied if c not in ("_floe_load_id", "_floe_loaded_at"))
        parameters = self.parameters(job, self.name)
        delete = f"DELETE FROM {target} WHERE TRUE"
        if scope is not None:
            where, scoped = self.scope_sql(scope, "refresh")
            delete = f"DELETE FROM {target} WHERE {where}"
            parameters += scoped
        body = [delete, f"INSERT INTO {target} ({names}_floe_load_id, _floe_loaded_at) "
                        f"SELECT {names}@load_id, CURRENT_TIMESTAMP() FROM {copy}"]
        entries, entry_parameters = self.ledger_sql(job)
        parameters += entry_parameters
        return LoadPlan(table=f"{self.config.project}.{self.config.dataset}.{self.table_name(spec)}",
                        staging=self.table_name(refresh_copy(spec)), uris=[], ddl=ddl, load_job={},
                        body=[*body, *self.state_sql(checked=job.base_version is not None), *entries],
                        parameters=parameters,
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

    def record_recovery(self, job: LoadJob) -> None:
        self.ensure_meta()
        self.api.query(self.load_row_sql("'recovered'", "NULL"), [p for p in self.parameters(job, self.name)
                                                                  if p["name"] != "state"])

    def last_load_status(self, source: str, stream: str, before: datetime) -> str | None:
        sql = (f"SELECT status FROM {self.ref(LOADS_TABLE)} WHERE source = @source AND stream = @stream "
               "AND destination = @destination AND started_at < @before ORDER BY finished_at DESC LIMIT 1")
        params = [param("source", "STRING", source), param("stream", "STRING", stream),
                  param("destination", "STRING", self.name), param("before", "TIMESTAMP", before.isoformat())]
        try:
            rows = self.api.query(sql, params)
        except DestinationError:  # no bookkeeping table yet: never failed
            return None
        return str(rows[0][0]) if rows else None

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
        if not rows:
            return CommittedState()
        entries = self.api.query(
            f"SELECT entry, value FROM {self.ref(LEDGER_TABLE)} WHERE source = @source AND stream = @stream "
            "ORDER BY version", [param("source", "STRING", source), param("stream", "STRING", stream)])
        return CommittedState(int(rows[0][0]), with_ledger(json.loads(rows[0][1]), {e: v for e, v in entries}))

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
        entries: dict[tuple[str, str], dict[str, str]] = {}
        for source, stream, entry, value in self.api.query(
                f"SELECT source, stream, entry, value FROM {self.ref(LEDGER_TABLE)} ORDER BY version"):
            entries.setdefault((source, stream), {})[entry] = value
        return [{"source": r[0], "stream": r[1], "version": int(r[2]), "load_id": r[4], "committed_at": r[5],
                 "state": with_ledger(json.loads(r[3]), entries.get((r[0], r[1]), {}))} for r in rows]

    def state_log(self, source: str, stream: str, limit: int | None = None) -> list[StateVersion]:
        self.ensure_meta()
        rows = self.api.query(self.state_log_sql(limit), [param("source", "STRING", source),
                                                          param("stream", "STRING", stream)])
        return [version_of(*row) for row in rows]

    def change_state(self, change: StateChange) -> int:
        """The rows to delete are counted first (the caller's lease keeps loads out until the commit)."""
        self.ensure_meta()
        exists = bool(self.existing_columns(change.table))
        deleted = 0
        if exists and change.delete_after is not None:
            where = self.deleted_rows_where(change)
            deleted = int(self.api.query(
                f"SELECT COUNT(*) FROM {self.ref(self.table_name(change.table))}{where}",
                [param("source", "STRING", change.source), param("stream", "STRING", change.stream),
                 param("delete_after", "INT64", change.delete_after)])[0][0])
        job = change.job(deleted)
        script, parameters = self.change_state_script(change, job, exists)
        try:
            with self._lock:
                job.check_lease()
                self.api.query(script, parameters, job_id=self.job_id(job, change.action))
        except DestinationError as exc:
            self.raise_conflict(exc, [job])
            raise DestinationError(f"{self.name}: {change.action} of {change.source}.{change.stream} failed, "
                                   f"nothing changed: {exc}") from None
        return deleted

    def record_run(self, run: RunRecord) -> None:
        self.ensure_meta()
        table, names = self.ref(RUNS_TABLE), [name for name, _ in RUNS_COLUMNS]
        script = ";\n".join([
            "BEGIN TRANSACTION", f"DELETE FROM {table} WHERE run_id = @run_id AND destination = @destination",
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('@' + n for n in names)})",
            "COMMIT TRANSACTION"]) + ";"
        values = [v.isoformat() if isinstance(v, datetime) else v for v in run_values(run)]
        self.api.query(script, [param(name, RUN_TYPES[kind], value)
                                for (name, kind), value in zip(RUNS_COLUMNS, values, strict=True)])

    def runs(self, limit: int = 20) -> list[RunRecord]:
        try:
            rows = self.api.query(f"SELECT {', '.join(name for name, _ in RUNS_COLUMNS)} FROM {self.ref(RUNS_TABLE)} "
                                  f"WHERE destination = @destination ORDER BY started_at DESC, run_id DESC "
                                  f"LIMIT {int(limit)}", [param("destination", "STRING", self.name)])
        except DestinationError as exc:
            if is_missing_table(exc):
                return []
            raise
        return [run_of(row) for row in rows]

    def drift_ages(self, source: str, stream: str) -> list[tuple[Any, ...]]:
        try:
            rows = self.api.query(ages_query(self.ref(DRIFT_TABLE), "@source", "@stream"),
                                  [param("source", "STRING", source), param("stream", "STRING", stream)])
        except DestinationError as exc:
            if is_missing_table(exc):
                return []
            raise
        return [tuple(row) for row in rows]

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
