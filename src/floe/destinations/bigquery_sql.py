"""BigQuery's statements and job configurations, built from the config alone (no I/O).

`BigQueryDestination` (floe.destinations.bigquery) runs them; tests parse them in sqlglot's
BigQuery dialect. Identifiers are quoted with backticks; JSON and nested values are staged as
text and parsed in the transaction (`PARSE_JSON`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from floe.core.destination import SEQ, LoadJob, StagedFile, StateChange, TableSpec, is_json
from floe.core.errors import DestinationError
from floe.core.stream import RefreshScope
from floe.destinations import ledger, merge
from floe.destinations.bigquery_api import param, scalar_type
from floe.destinations.column_types import ColumnRules
from floe.destinations.drift import BIGQUERY, DRIFT_TABLE, drift_ddl, drift_statement
from floe.destinations.ledger import LEDGER_TABLE
from floe.destinations.merge import NULL_SAFE_OR, RANK, MergeStyle
from floe.destinations.rejected import REJECTED_TABLE
from floe.destinations.run_log import RUNS_COLUMNS, RUNS_TABLE
from floe.destinations.schema_changes import SchemaPlan, Widening, plan_schema
from floe.destinations.sql import LOADS_TABLE, STATE_TABLE, arrow_type_key
from floe.destinations.state_ops import CHANGE_STATUS

if TYPE_CHECKING:
    from floe.destinations.bigquery import BigQueryConfig

# The version check's error: "floe_state_conflict <source>.<stream>: latest version <n>".
CONFLICT = "floe_state_conflict"

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

# ALTER COLUMN SET DATA TYPE changes a column to a type its values coerce to (and NUMERIC's parameters up);
# it is DDL, which BigQuery runs outside transactions: before the load's transaction, kept if that fails.
WIDENING = Widening("ALTER TABLE {table} ALTER COLUMN {column} SET DATA TYPE {type}", becomes={
    "INT64": frozenset({"NUMERIC", "BIGNUMERIC"}), "NUMERIC": frozenset({"NUMERIC", "BIGNUMERIC"}),
    "BIGNUMERIC": frozenset({"BIGNUMERIC"}), "DATE": frozenset({"DATETIME"}),
})

# No DELETE ... USING and no IS NOT DISTINCT FROM; a merge without a parent key is one MERGE statement.
RUN_TYPES = {"text": "STRING", "timestamp": "TIMESTAMP", "int": "INT64"}  # of RUNS_COLUMNS
MERGE_STYLE = MergeStyle(
    latest_rows=f"SELECT * EXCEPT ({RANK}) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {{keys}} "
                f"ORDER BY {{latest}}) AS {RANK} FROM {{staging}}) WHERE {RANK} = 1",
    dedupe="inline", delete="exists", null_safe_equals=NULL_SAFE_OR, alias="S",
    delete_all="DELETE FROM {target} WHERE TRUE", upsert_statement=True,
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


class BigQuerySql:
    """The statements of a load into `config.project`.`config.dataset`, as strings and dicts."""

    name: str
    config: BigQueryConfig
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
            "error STRING, details STRING, run_id STRING)",
            f"ALTER TABLE {self.ref(LOADS_TABLE)} ADD COLUMN IF NOT EXISTS run_id STRING",  # made by an older floe
            f"CREATE TABLE IF NOT EXISTS {self.ref(LEDGER_TABLE)} (source STRING, stream STRING, entry STRING, "
            "value STRING, version INT64, load_id STRING)",
            f"CREATE TABLE IF NOT EXISTS {self.ref(RUNS_TABLE)} ("
            + ", ".join(f"{name} {RUN_TYPES[kind]}" for name, kind in RUNS_COLUMNS) + ")",
            drift_ddl(self.ref(DRIFT_TABLE), BIGQUERY),
        ]

    def ledger_sql(self, job: LoadJob, suffix: str = "") -> tuple[list[str], list[dict[str, Any]]]:
        """The statements (after the state version's INSERT) appending the job's ledger entries as that
        version's (a full refresh's: replacing the ledger), and their parameters (see `ledger`)."""
        entries = ledger.split_ledger(job.checkpoint)[1]
        source, stream = f"@source{suffix}", f"@stream{suffix}"
        statements = [f"DELETE FROM {self.ref(LEDGER_TABLE)} WHERE source = {source} AND stream = {stream}"] \
            if job.details.get("full_refresh") else []
        if not entries:
            return statements, []
        version = f"(SELECT MAX(version) FROM {self.ref(STATE_TABLE)} WHERE source = {source} AND stream = {stream})"
        rows = ", ".join(f"({source}, {stream}, @entry{suffix}_{i}, @value{suffix}_{i}, {version}, @load_id{suffix})"
                         for i in range(len(entries)))
        statements.append(f"INSERT INTO {self.ref(LEDGER_TABLE)} (source, stream, entry, value, version, load_id) "
                          f"VALUES {rows}")
        parameters = [p for i, (entry, value) in enumerate(entries.items())
                      for p in (param(f"entry{suffix}_{i}", "STRING", entry), param(f"value{suffix}_{i}", "STRING", value))]
        return statements, parameters

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

    def disposition_sql(self, spec: TableSpec, staging: str, suffix: str = "") -> list[str]:
        """`suffix` ends the names of the job's query parameters (each job of a group has its own)."""
        columns = [(quote(f.name), self.value_sql(f)) for f in self.fields(spec)]
        return merge.disposition_sql(MERGE_STYLE, spec, self.ref(self.table_name(spec)), self.ref(staging),
                                     columns=columns, order=SEQ, load_id=f"@load_id{suffix}",
                                     now="CURRENT_TIMESTAMP()", quote=quote)

    @staticmethod
    def scope_sql(scope: RefreshScope, name: str, suffix: str = "") -> tuple[str, list[dict[str, Any]]]:
        """The condition true for the rows of `scope`, and its query parameters (`@<name>_start`,
        `@<name>_end`, ended with `suffix`)."""
        column = quote(scope.column)
        where = f"{column} >= @{name}_start{suffix}"
        parameters = [param(f"{name}_start{suffix}", scalar_type(scope.start), scope.start)]
        if scope.end is not None:
            where += f" AND {column} < @{name}_end{suffix}"
            parameters.append(param(f"{name}_end{suffix}", scalar_type(scope.end), scope.end))
        return where, parameters

    def version_check_sql(self, suffix: str = "") -> str:
        """Fails the script (ERROR) unless the stream's latest state version is still @base_version."""
        source, stream = f"@source{suffix}", f"@stream{suffix}"
        latest = f"COALESCE((SELECT MAX(version) FROM {self.ref(STATE_TABLE)} WHERE source = {source} AND " \
                 f"stream = {stream}), 0)"
        return (f"SELECT IF({latest} = @base_version{suffix}, 0, ERROR(CONCAT('{CONFLICT} ', {source}, '.', "
                f"{stream}, ': latest version ', CAST({latest} AS STRING))))")

    def state_sql(self, suffix: str = "", refresh: bool = False, checked: bool = False,
                  status: str = "committed") -> list[str]:
        """The new state version (`checked`: after the version check) and the load row (of `status`); a
        full refresh's commits to its copy write no state."""
        if refresh:
            return [self.load_row_sql("'refreshing'", "NULL", suffix)]
        state = self.ref(STATE_TABLE)
        source, stream = f"@source{suffix}", f"@stream{suffix}"
        return [
            *([self.version_check_sql(suffix)] if checked else []),
            f"INSERT INTO {state} (source, stream, version, state, load_id, committed_at) "
            f"SELECT {source}, {stream}, COALESCE(MAX(version), 0) + 1, @state{suffix}, @load_id{suffix}, "
            f"CURRENT_TIMESTAMP() FROM {state} WHERE source = {source} AND stream = {stream}",
            *self.prune_sql(source, stream),
            self.load_row_sql(f"'{status}'", "NULL", suffix),
        ]

    def prune_sql(self, source: str, stream: str) -> list[str]:
        """With `state_history_days`: delete the stream's versions older than that, except the latest."""
        days = self.config.state_history_days
        if not days:
            return []
        state, where = self.ref(STATE_TABLE), f"source = {source} AND stream = {stream}"
        return [f"DELETE FROM {state} WHERE {where} AND committed_at < TIMESTAMP_SUB(CURRENT_TIMESTAMP(), "
                f"INTERVAL {int(days)} DAY) AND version < (SELECT MAX(version) FROM {state} WHERE {where})"]

    def state_log_sql(self, limit: int | None = None) -> str:
        """A stream's state versions (@source, @stream), newest first, with their load rows (see `version_of`)."""
        return (f"SELECT s.version, s.committed_at, s.load_id, s.state, l.rows, l.status, l.details FROM "
                f"{self.ref(STATE_TABLE)} s LEFT JOIN {self.ref(LOADS_TABLE)} l ON l.load_id = s.load_id AND "
                "l.source = s.source AND l.stream = s.stream AND l.status IN ('committed', 'reverted', 'reset') "
                "WHERE s.source = @source AND s.stream = @stream ORDER BY s.version DESC"
                + (f" LIMIT {int(limit)}" if limit else ""))

    def deleted_rows_where(self, change: StateChange) -> str:
        """The WHERE clause of the rows `change` deletes (parameters @source, @stream, @delete_after):
        those whose load committed a version after `delete_after` (every row after version 0)."""
        if not change.delete_after:
            return " WHERE TRUE"
        return (f" WHERE _floe_load_id IN (SELECT load_id FROM {self.ref(STATE_TABLE)} WHERE source = @source "
                "AND stream = @stream AND version > @delete_after)")

    def change_state_script(self, change: StateChange, job: LoadJob, table_exists: bool) -> tuple[str, list[Any]]:
        """The one transaction of a state change (`job`: `change.job(...)`): the version check, the rows'
        DELETE (when the table exists), the new state version and the load row; and its parameters."""
        delete = [f"DELETE FROM {self.ref(self.table_name(change.table))}{self.deleted_rows_where(change)}"]
        check, *bookkeeping = self.state_sql(checked=True, status=CHANGE_STATUS[change.action])
        undo = (f"DELETE FROM {self.ref(LEDGER_TABLE)} WHERE source = @source AND stream = @stream "
                "AND version > @ledger_after")  # the ledger entries of the undone versions (a reset: all)
        body = [check, *(delete if table_exists and change.delete_after is not None else []), *bookkeeping, undo]
        parameters = [*self.parameters(job, self.name), param("delete_after", "INT64", change.delete_after or 0),
                      param("ledger_after", "INT64", 0 if change.state is None else change.delete_after or 0)]
        return ";\n".join(["BEGIN TRANSACTION", *body, "COMMIT TRANSACTION"]) + ";", parameters

    def load_row_sql(self, status: str, error: str, suffix: str = "") -> str:
        values = ", ".join(f"@{name}{suffix}" for name in ("load_id", "source", "stream", "destination", "rows",
                                                            "started_at"))
        return (f"INSERT INTO {self.ref(LOADS_TABLE)} (load_id, source, stream, destination, rows, started_at, "
                f"finished_at, status, error, details, run_id) VALUES ({values}, CURRENT_TIMESTAMP(), {status}, "
                f"{error}, @details{suffix}, @run_id{suffix})")

    @staticmethod
    def parameters(job: LoadJob, destination: str, suffix: str = "") -> list[dict[str, Any]]:
        return [param(name + suffix, kind, value) for name, kind, value in [
            ("source", "STRING", job.source), ("stream", "STRING", job.stream),
            ("state", "STRING", json.dumps(ledger.split_ledger(job.checkpoint)[0], sort_keys=True)),
            ("load_id", "STRING", job.load_id), ("destination", "STRING", destination),
            ("rows", "INT64", job.rows), ("started_at", "TIMESTAMP", job.started_at.isoformat()),
            ("details", "STRING", json.dumps(job.details, sort_keys=True) if job.details else None),
            ("run_id", "STRING", job.run_id),
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

    def schema_plan(self, spec: TableSpec, files: list[StagedFile], existing: Mapping[str, str]) -> SchemaPlan:
        """What loading `files` changes in the table of columns `existing` (floe.destinations.schema_changes)."""
        return plan_schema(COLUMN_RULES, WIDENING, spec, existing, [f.schema for f in files], self.column_type)

    def evolve_sql(self, spec: TableSpec, files: list[StagedFile], existing: Mapping[str, str]) -> list[str]:
        """The DDL adding and widening the columns `files` need (their variant columns already in `spec`);
        raises DestinationError naming each column that would change otherwise (or at all, with freeze)."""
        plan = self.schema_plan(spec, files, existing)
        if plan.refusals:
            raise DestinationError("; ".join(plan.refusals))
        table = self.ref(self.table_name(spec))
        return [*self.add_columns_sql(spec, existing),
                *(s for name, t in plan.widen.items() for s in WIDENING.statements(table, quote(name), t, ""))]

    def plan(self, job: LoadJob, uris: list[str], existing: Mapping[str, str], meta_ready: bool = False,
             suffix: str = "") -> LoadPlan:
        """The load's statements; DDL known to be done already (meta tables, an existing table) is left out.
        `suffix` ends its query parameters' names (each job of a group has its own). `existing`: the
        target's columns and their BigQuery types; raises DestinationError if one of them would not
        hold the staged values exactly."""
        spec = job.table
        evolve = self.evolve_sql(spec, job.files, existing)
        staging = f"_floe_staging_{job.load_id.replace('-', '_')}"
        ddl = [*([] if meta_ready else self.meta_ddl()), *([] if existing else [self.create_table_sql(spec)]), *evolve]
        body = self.disposition_sql(spec, staging, suffix) if uris or spec.disposition == "replace" else []
        drift = None if job.refresh or not uris else drift_statement(
            job, BIGQUERY, target=self.ref(self.table_name(spec)), staging=self.ref(staging), quote=quote,
            drift_table=self.ref(DRIFT_TABLE), values=(f"@source{suffix}", f"@stream{suffix}", f"@load_id{suffix}"))
        if drift is not None:  # its parameters are the load's own
            body = [drift.sql, *body] if drift.before_rows else [*body, drift.sql]
        parameters = self.parameters(job, self.name, suffix)
        if job.replaces is not None:  # a backfill: the range's rows go, its re-read rows come in
            where, scoped = self.scope_sql(job.replaces, "backfill", suffix)
            body.insert(0, f"DELETE FROM {self.ref(self.table_name(spec))} WHERE {where}")
            parameters += scoped
        if job.rejected:  # `bad_rows: quarantine`
            ddl.append(f"CREATE TABLE IF NOT EXISTS {self.ref(REJECTED_TABLE)} (source STRING, stream STRING, "
                       "load_id STRING, reason STRING, record STRING, rejected_at TIMESTAMP)")
            rows = ", ".join(f"(@source{suffix}, @stream{suffix}, @load_id{suffix}, @rejected_reason{suffix}_{i}, "
                             f"@rejected_record{suffix}_{i}, CURRENT_TIMESTAMP())" for i in range(len(job.rejected)))
            body.append(f"INSERT INTO {self.ref(REJECTED_TABLE)} (source, stream, load_id, reason, record, "
                        f"rejected_at) VALUES {rows}")
            for i, (reason, record) in enumerate(zip(job.rejected.reasons, job.rejected.rows, strict=True)):
                parameters += [param(f"rejected_reason{suffix}_{i}", "STRING", reason),
                               param(f"rejected_record{suffix}_{i}", "STRING", record)]
        if uris or spec.disposition == "replace":
            ddl.append(self.staging_ddl(spec, staging))
        entries, entry_parameters = ([], []) if job.refresh else self.ledger_sql(job, suffix)
        return LoadPlan(
            table=f"{self.config.project}.{self.config.dataset}.{self.table_name(spec)}", staging=staging,
            uris=uris, ddl=ddl, load_job=self.load_job_config(spec, staging, uris),
            body=[*body, *self.state_sql(suffix, job.refresh, job.base_version is not None), *entries],
            parameters=[*parameters, *entry_parameters],
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
