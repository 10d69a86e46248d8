"""A stand-in for BigQuery's jobs API, backed by DuckDB, for end-to-end tests of floe's BigQuery loads.

It speaks the REST surface floe uses (jobs.insert with a caller-chosen job id and 409 on a repeat,
jobs.get, jobs.getQueryResults, datasets.get) and runs what floe sends: query jobs are parsed in
sqlglot's BigQuery dialect and executed on DuckDB (tables `project.dataset.t` -> schema `dataset`;
PARTITION BY / CLUSTER BY / OPTIONS dropped; named @parameters bound; a script's
BEGIN/COMMIT TRANSACTION is a real DuckDB transaction, rolled back on any error; INFORMATION_SCHEMA
column types are given BigQuery's names); load jobs read
the Parquet objects named in `sourceUris` from the GCS emulator. It checks floe's orchestration and
transaction, not BigQuery's own SQL semantics (the SQL is also parsed in the BigQuery dialect by
the unit tests).
"""

from __future__ import annotations

import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import duckdb
import sqlglot
from sqlglot import exp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class BigQueryEmulator:
    def __init__(self, dataset: str, location: str = "US", gcs_client: Any = None) -> None:
        self.db = duckdb.connect()
        self.db.execute(f'CREATE SCHEMA "{dataset}"')
        self.dataset, self.location, self.gcs = dataset, location, gcs_client
        self.jobs: dict[str, dict[str, Any]] = {}
        self.results: dict[str, list[list[Any]]] = {}
        self.fail_next: str | None = None  # a job id suffix whose next job fails (fault injection)
        # The next N DDL query jobs fail as BigQuery fails one of two jobs changing a table at once.
        self.ddl_races = 0
        self._lock = threading.Lock()
        base = "/bigquery/v2/projects/{project}"
        self.app = Starlette(routes=[
            Route(base + "/jobs", self.insert, methods=["POST"]),
            Route(base + "/jobs/{job}", self.get),
            Route(base + "/queries/{job}", self.query_results),
            Route(base + "/datasets/{dataset}", self.get_dataset),
        ])

    # --- HTTP ---------------------------------------------------------------------------------------
    async def insert(self, request: Request) -> JSONResponse:
        body = await request.json()
        job_id = body["jobReference"]["jobId"]
        if job_id in self.jobs:
            return JSONResponse({"error": {"code": 409, "message": f"Already Exists: Job {job_id}"}}, 409)
        status: dict[str, Any] = {"state": "DONE"}
        try:
            with self._lock:
                if self.fail_next and job_id.endswith(self.fail_next):
                    self.fail_next = None
                    raise RuntimeError("injected failure")
                query = body["configuration"].get("query", {}).get("query", "")
                if self.ddl_races and query.lstrip().upper().startswith(("CREATE", "ALTER")):
                    self.ddl_races -= 1
                    raise RuntimeError("Could not serialize access to table due to concurrent update")
                config = body["configuration"]
                if "load" in config:
                    self.run_load(config["load"])
                else:
                    self.results[job_id] = self.run_query(config["query"])
        except Exception as exc:  # noqa: BLE001 - reported the way BigQuery reports job errors
            status["errorResult"] = {"reason": "invalidQuery", "message": str(exc)}
        self.jobs[job_id] = {**body, "status": status}
        return JSONResponse(self.jobs[job_id])

    async def get(self, request: Request) -> JSONResponse:
        return JSONResponse(self.jobs[request.path_params["job"]])

    async def query_results(self, request: Request) -> JSONResponse:
        rows = self.results.get(request.path_params["job"], [])
        return JSONResponse({"jobComplete": True,
                             "rows": [{"f": [{"v": None if v is None else str(v)} for v in row]} for row in rows]})

    async def get_dataset(self, request: Request) -> JSONResponse:
        if request.path_params["dataset"] != self.dataset:
            return JSONResponse({"error": {"code": 404, "message": "Not found: Dataset"}}, 404)
        return JSONResponse({"location": self.location})

    # --- execution ----------------------------------------------------------------------------------
    def translate(self, statement: exp.Expression) -> list[str]:
        for table in statement.find_all(exp.Table):
            if "INFORMATION_SCHEMA" in table.sql("bigquery").upper():
                table.replace(exp.to_table("information_schema.columns"))
            else:
                table.set("catalog", None)
        if isinstance(statement, exp.Create):
            statement.set("properties", None)
        for data_type in statement.find_all(exp.DataType):  # BigQuery's NUMERIC is NUMERIC(38, 9), DuckDB's (18, 3)
            if data_type.this == exp.DataType.Type.DECIMAL and not data_type.expressions:
                data_type.set("expressions", [exp.DataTypeParam(this=exp.Literal.number(n)) for n in (38, 9)])
        if isinstance(statement, exp.Alter) and len(statement.args.get("actions") or []) > 1:
            out = []
            for action in statement.args["actions"]:
                single = statement.copy()
                single.set("actions", [action])
                out.append(single.sql("duckdb"))
            return out
        return [statement.sql("duckdb")]

    def run_query(self, query: dict[str, Any]) -> list[list[Any]]:
        params = {p["name"]: p["parameterValue"].get("value") for p in query.get("queryParameters", [])}
        kinds = {p["name"]: p["parameterType"]["type"] for p in query.get("queryParameters", [])}
        values = {k: (int(v) if kinds[k] == "INT64" and v is not None else v) for k, v in params.items()}
        rows: list[list[Any]] = []
        in_transaction = False
        try:
            for statement in sqlglot.parse(query["query"], read="bigquery"):
                if statement is None:
                    continue
                if isinstance(statement, exp.Transaction):
                    self.db.execute("BEGIN TRANSACTION")
                    in_transaction = True
                    continue
                if isinstance(statement, exp.Commit):
                    self.db.execute("COMMIT")
                    in_transaction = False
                    continue
                for sql in self.translate(statement):
                    used = {k: v for k, v in values.items() if re.search(rf"\${k}\b", sql)}
                    sql = sql.replace("information_schema.columns WHERE", f"information_schema.columns WHERE "
                                      f"table_schema = '{self.dataset}' AND")
                    cursor = self.db.execute(sql, used or None)
                    rows = [list(r) for r in cursor.fetchall()] if cursor.description else []
                    if cursor.description and "information_schema" in sql:
                        rows = self.bigquery_types(rows, [d[0] for d in cursor.description])
        except Exception:
            if in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return rows

    @staticmethod
    def bigquery_types(rows: list[list[Any]], names: list[str]) -> list[list[Any]]:
        """INFORMATION_SCHEMA.COLUMNS rows with `data_type` as BigQuery names it (DuckDB's BIGINT is INT64)."""
        if "data_type" not in names:
            return rows
        i = names.index("data_type")
        for row in rows:
            row[i] = exp.DataType.build(row[i], dialect="duckdb").sql("bigquery")
        return rows

    def run_load(self, load: dict[str, Any]) -> None:
        table = f'"{load["destinationTable"]["datasetId"]}"."{load["destinationTable"]["tableId"]}"'
        names = [f["name"] for f in load["schema"]["fields"]]
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for n, uri in enumerate(load["sourceUris"]):
                bucket, _, key = uri.removeprefix("gs://").partition("/")
                path = Path(tmp) / f"{n}.parquet"
                self.gcs.bucket(bucket).blob(key).download_to_filename(str(path))
                paths.append(f"'{path}'")
            columns = ", ".join(f'"{c}"' for c in names)
            self.db.execute("BEGIN TRANSACTION")
            try:
                if load.get("writeDisposition") == "WRITE_TRUNCATE":
                    self.db.execute(f"DELETE FROM {table}")
                self.db.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM read_parquet([{', '.join(paths)}])")
                self.db.execute("COMMIT")
            except Exception:
                self.db.execute("ROLLBACK")
                raise
