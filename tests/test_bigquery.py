"""BigQuery: the plan (DDL, load job, transaction script) parsed in sqlglot's BigQuery dialect, Parquet
parts written to a local GCS emulator and cleaned up, and the REST job calls against a local server
that answers like the BigQuery jobs API. BigQuery itself cannot be reached from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from sqlglot import exp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from floe.config import validate_model
from floe.core.destination import LoadJob, StagedFile, TableSpec, json_field
from floe.core.errors import DestinationError
from floe.destinations.bigquery import BigQueryApi, BigQueryConfig, BigQueryDestination
from floe.engine.pipeline import run_stream
from floe.infra.objectstore import GCSStore, StoreUrl
from floe.sandbox.server import serve_in_thread
from tests.bigquery_emulator import BigQueryEmulator
from tests.fixtures.core import OneStreamSource, ResentParentStream

SCHEMA = pa.schema([
    ("id", pa.int64()), ("name", pa.string()), ("amount", pa.decimal128(12, 2)),
    ("created_at", pa.timestamp("us", "UTC")), json_field("props"), ("tags", pa.list_(pa.string())),
])


def make(bucket: str = "bucket", **extra: Any) -> BigQueryDestination:
    settings = {"type": "bigquery", "project": "proj", "dataset": "raw", "stage": f"gs://{bucket}/floe",
                "partition_by": {"src.items": "created_at"}, "cluster_by": {"src.items": ["id"]}, **extra}
    return BigQueryDestination("bq", validate_model(BigQueryConfig, settings, "destinations.bq"))


def job_of(folder: Path, disposition: str = "merge", rows: int = 3, parent: tuple[str, ...] = (),
           records: list[dict[str, Any]] | None = None, load_id: str = "20261124T000000Z-abc123",
           checkpoint: dict[str, Any] | None = None, pk: tuple[str, ...] | None = None) -> LoadJob:
    table = pa.Table.from_pylist(records or [
        {"id": i % 2, "name": f"n{i}", "amount": None, "created_at": datetime(2024, 1, 1, tzinfo=UTC),
         "props": '{"a": 1}', "tags": ["x", "y"]} for i in range(rows)
    ], schema=SCHEMA)
    rows = table.num_rows
    path = folder / f"staged-{load_id}.parquet"
    pq.write_table(table, path)
    if pk is None:
        pk = ("id",) if disposition == "merge" else ()
    spec = TableSpec("src", "items", SCHEMA, pk, disposition, parent)  # type: ignore[arg-type]
    return LoadJob(load_id, "src", "items", spec, [StagedFile(path, rows, SCHEMA)],
                   checkpoint or {"cursor": "2024-01-02"}, datetime.now(UTC), {"pages": 2})


def parse_all(sql: str) -> list[exp.Expression]:
    return [e for e in sqlglot.parse(sql, read="bigquery") if e is not None]


def column_types(create: exp.Expression) -> dict[str, str]:
    return {c.name: c.args["kind"].sql("bigquery") for c in create.find_all(exp.ColumnDef)}


def test_target_ddl_has_bigquery_types_day_partitions_and_clustering(tmp_path):
    dest = make()
    plan = dest.plan(job_of(tmp_path), ["gs://bucket/floe/x/part-00000.parquet"], existing={})
    create = next(sqlglot.parse_one(s, read="bigquery") for s in plan.ddl if "`proj.raw.src_items`" in s)
    assert isinstance(create, exp.Create)
    types = column_types(create)
    assert types == {"id": "INT64", "name": "STRING", "amount": "NUMERIC(12, 2)", "created_at": "TIMESTAMP",
                     "props": "JSON", "tags": "JSON", "_floe_load_id": "STRING", "_floe_loaded_at": "TIMESTAMP"}
    text = create.sql("bigquery")
    assert "PARTITION BY DATE(`created_at`)" in text and "CLUSTER BY `id`" in text
    staging = sqlglot.parse_one(plan.ddl[-1], read="bigquery")
    assert column_types(staging)["props"] == "STRING" and column_types(staging)["_floe_seq"] == "INT64"
    assert "expiration_timestamp" in staging.sql("bigquery")
    for statement in plan.ddl + plan.after:
        assert parse_all(statement)


def test_new_columns_are_added_only_when_missing(tmp_path):
    dest = make()
    spec = job_of(tmp_path).table
    assert dest.add_columns_sql(spec, existing={}) == []  # a new table gets them from CREATE TABLE
    [alter] = dest.add_columns_sql(spec, existing={"id", "name", "amount", "created_at"})
    parsed = sqlglot.parse_one(alter, read="bigquery")
    assert isinstance(parsed, exp.Alter)
    assert alter.count("ADD COLUMN IF NOT EXISTS") == 2 and "`props` JSON" in alter and "`tags` JSON" in alter


def test_load_job_configuration_names_the_uploaded_uris_and_the_staging_table(tmp_path):
    dest = make()
    uris = [f"gs://bucket/floe/bq/src/items/l1/part-{i:05d}.parquet" for i in range(2)]
    plan = dest.plan(job_of(tmp_path), uris, existing={})
    load = plan.load_job["load"]
    assert load["sourceUris"] == uris and load["sourceFormat"] == "PARQUET"
    assert load["destinationTable"] == {"projectId": "proj", "datasetId": "raw", "tableId": plan.staging}
    assert load["writeDisposition"] == "WRITE_TRUNCATE" and load["createDisposition"] == "CREATE_NEVER"
    assert [f["name"] for f in load["schema"]["fields"]] == [*SCHEMA.names, "_floe_seq"]
    assert {f["name"]: f["type"] for f in load["schema"]["fields"]}["props"] == "STRING"


@pytest.mark.parametrize("disposition, parent, statement", [
    ("merge", (), exp.Merge), ("merge", ("id",), exp.Delete), ("append", (), exp.Insert), ("replace", (), exp.Delete),
])
def test_the_transaction_script_parses_and_holds_data_and_state_together(tmp_path, disposition, parent, statement):
    dest = make()
    plan = dest.plan(job_of(tmp_path, disposition, parent=parent), ["gs://bucket/x.parquet"], existing={})
    parsed = parse_all(plan.script)
    assert isinstance(parsed[0], exp.Transaction) and isinstance(parsed[-1], exp.Commit)
    assert isinstance(parsed[1], statement)
    state, loads = parsed[-3], parsed[-2]
    assert isinstance(state, exp.Insert) and state.find(exp.Table).name == "_floe_state"
    assert isinstance(loads, exp.Insert) and loads.find(exp.Table).name == "_floe_loads"
    assert "@state" in state.sql("bigquery") and "@load_id" in parsed[-4].sql("bigquery")  # rows stamped too
    if disposition == "merge" and not parent:
        merge = parsed[1].sql("bigquery")
        assert "ROW_NUMBER() OVER (PARTITION BY `id` ORDER BY _floe_seq DESC)" in merge
        assert "PARSE_JSON(S.`props`)" in merge and "WHEN NOT MATCHED THEN INSERT" in merge
    params = {p["name"]: p["parameterValue"]["value"] for p in plan.parameters}
    assert params["state"] == '{"cursor": "2024-01-02"}' and params["rows"] == "3"
    assert params["details"] == '{"pages": 2}'


def test_views_are_transpiled_to_bigquery(tmp_path):
    dest = make()
    spec = TableSpec("src", "items", SCHEMA, ("id",), "merge",
                     views=(("items_latest", 'SELECT {columns} FROM {table} WHERE "id" > 0'),))
    [view] = dest.views_sql(spec)
    assert view.startswith("CREATE OR REPLACE VIEW `proj.raw.src_items_latest` AS SELECT `id`")
    assert isinstance(sqlglot.parse_one(view, read="bigquery"), exp.Create)


def test_parts_go_to_gcs_and_are_deleted_after_the_load(gcs_server, gcs_bucket, tmp_path):
    dest = make(gcs_bucket, rows_per_file=2)
    job = job_of(tmp_path, rows=5)
    prefix, uris = dest.upload(job)
    assert len(uris) == 3 and all(u.startswith(f"gs://{gcs_bucket}/floe/bq/src/items/") for u in uris)
    first = pq.read_table(io.BytesIO(dest.store.get_bytes(uris[0].removeprefix(f"gs://{gcs_bucket}/")) or b""))
    assert first.column_names == [*SCHEMA.names, "_floe_seq"]
    assert first.column("_floe_seq").to_pylist() == [0, 1]
    assert first.column("tags").to_pylist() == ['["x","y"]', '["x","y"]']  # nested values become JSON text
    assert dest.store.delete_prefix(prefix) == 3
    assert list(dest.store.list("floe/")) == []


def test_gcs_store_follows_listing_pages_when_deleting(gcs_server, gcs_bucket):
    # GCS pages hold 1,000 objects; the emulator is slow, so pages of 10 stand in for them here
    # (S3's >1,000-object delete runs for real in test_redshift.py).
    store = GCSStore.connect(StoreUrl.parse(f"gs://{gcs_bucket}/p"), "test")
    store.page_size = 10
    for i in range(35):
        store.put_bytes(f"p/l/{i:05d}", b"x")
    store.put_bytes("keep/me", b"x")
    assert sum(1 for _ in store.list("p/")) == 35  # four listing pages
    assert store.delete_prefix("p/") == 35
    assert [k for k, _ in store.list("")] == ["keep/me"]


def test_gcs_check_names_a_missing_bucket(gcs_server):
    store = GCSStore.connect(StoreUrl.parse("gs://no-such-bucket-x/p"), "destinations.bq.stage")
    with pytest.raises(DestinationError, match="destinations.bq.stage: bucket gs://no-such-bucket-x does not exist"):
        store.check()


# --- the REST job calls, against a local server answering like the jobs API -----------------------
class JobsApi:
    """Jobs finish on the second GET; a query naming `boom` fails; a repeated job id answers 409."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.app = Starlette(routes=[
            Route("/bigquery/v2/projects/{project}/jobs", self.insert, methods=["POST"]),
            Route("/bigquery/v2/projects/{project}/jobs/{job}", self.get),
            Route("/bigquery/v2/projects/{project}/queries/{job}", self.results),
            Route("/bigquery/v2/projects/{project}/datasets/{dataset}", self.dataset),
        ])

    async def insert(self, request: Request) -> JSONResponse:
        body = await request.json()
        job_id = body["jobReference"]["jobId"]
        if job_id in self.jobs:
            return JSONResponse({"error": {"code": 409, "message": f"Already Exists: Job proj:US.{job_id}"}}, 409)
        self.jobs[job_id] = body
        self.polls[job_id] = 0
        return JSONResponse({**body, "status": {"state": "RUNNING"}})

    async def get(self, request: Request) -> JSONResponse:
        job_id = request.path_params["job"]
        self.polls[job_id] += 1
        body = self.jobs[job_id]
        status: dict[str, Any] = {"state": "DONE" if self.polls[job_id] >= 2 else "RUNNING"}
        if status["state"] == "DONE" and "boom" in body["configuration"].get("query", {}).get("query", ""):
            status["errorResult"] = {"reason": "invalidQuery", "message": "Unrecognized name: boom at [1:8]"}
        return JSONResponse({**body, "status": status})

    async def results(self, request: Request) -> JSONResponse:
        return JSONResponse({"jobComplete": True, "rows": [{"f": [{"v": "1"}, {"v": "a"}]}]})

    async def dataset(self, request: Request) -> JSONResponse:
        if request.path_params["dataset"] != "raw":
            return JSONResponse({"error": {"code": 404, "message": "Not found: Dataset proj:nope"}}, 404)
        return JSONResponse({"id": "proj:raw", "location": "EU"})


@pytest.fixture(scope="module")
def jobs_api():
    api = JobsApi()
    with serve_in_thread(api.app) as server:
        yield api, server.url


def test_jobs_are_polled_until_done_and_a_repeated_job_id_is_awaited_not_rerun(jobs_api):
    api, url = jobs_api
    client = BigQueryApi(make(api_endpoint=url).config, "destinations.bq")
    assert client.query("SELECT 1, 'a'", job_id="q1") == [["1", "a"]]
    assert api.polls["q1"] == 2
    client.run_job("q1", {"query": {"query": "SELECT 1"}}, poll=0.01)  # 409: awaited, not inserted again
    assert api.jobs["q1"]["configuration"]["query"]["query"] == "SELECT 1, 'a'"
    with pytest.raises(DestinationError, match=r"job q2 failed: Unrecognized name: boom"):
        client.query("SELECT boom", job_id="q2")


def test_check_says_which_dataset_is_missing_or_misplaced(jobs_api):
    _, url = jobs_api
    with pytest.raises(DestinationError, match=r"datasets/nope: HTTP 404: Not found: Dataset proj:nope"):
        make(api_endpoint=url, dataset="nope").check()
    with pytest.raises(DestinationError, match=r"is in EU, not in the configured location US"):
        make(api_endpoint=url).check()


def test_config_rejects_a_non_gcs_stage_and_wide_clustering():
    with pytest.raises(Exception, match=r"stage: .*GCS URL"):
        validate_model(BigQueryConfig, {"type": "bigquery", "project": "p", "dataset": "d", "stage": "s3://b/p"}, "d.bq")
    with pytest.raises(Exception, match="1 to 4 columns"):
        validate_model(BigQueryConfig, {"type": "bigquery", "project": "p", "dataset": "d", "stage": "gs://b",
                                        "cluster_by": {"s.t": ["a", "b", "c", "d", "e"]}}, "d.bq")


# --- end to end, against the DuckDB-backed jobs API (tests/bigquery_emulator.py) ----------------
@pytest.fixture
def bigquery(gcs_server, gcs_bucket):
    emulator = BigQueryEmulator("raw", "US", gcs_server.client())
    with serve_in_thread(emulator.app) as server:
        dest = make(gcs_bucket, api_endpoint=server.url)
        yield dest, emulator
        dest.close()


def record(i: int | None, name: str, props: str | None = None) -> dict[str, Any]:
    return {"id": i, "name": name, "amount": None, "created_at": datetime(2024, 1, 2, tzinfo=UTC), "props": props,
            "tags": None}


def test_merge_loads_end_to_end_commit_data_and_state_together(bigquery, tmp_path):
    dest, emulator = bigquery
    dest.load(job_of(tmp_path, records=[record(1, "a"), record(2, "b")], load_id="20261124T000001Z-000001",
                     checkpoint={"n": 1}))
    dest.load(job_of(tmp_path, records=[record(2, "b1"), record(None, "n1"), record(2, "b2", '{"x": 1}'),
                                        record(None, "n2"), record(3, "c")],
                     load_id="20261124T000002Z-000002", checkpoint={"n": 2}))
    rows = emulator.db.execute("SELECT id, name, CAST(props AS VARCHAR), _floe_load_id FROM raw.src_items "
                               "ORDER BY id NULLS LAST").fetchall()
    assert rows == [(1, "a", None, "20261124T000001Z-000001"), (2, "b2", '{"x":1}', "20261124T000002Z-000002"),
                    (3, "c", None, "20261124T000002Z-000002"), (None, "n2", None, "20261124T000002Z-000002")]
    assert dest.get_state("src", "items") == {"n": 2}
    assert [s["version"] for s in dest.states()] == [2]
    tables = {r[0] for r in emulator.db.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert tables == {"src_items", "_floe_state", "_floe_loads", "_floe_files", "_floe_runs", "_floe_drift"}  # staging dropped
    assert list(dest.store.list("floe/")) == []  # parts deleted
    load_jobs = [j for j in emulator.jobs.values() if "load" in j["configuration"]]
    assert len(load_jobs) == 2 and all(j["configuration"]["load"]["destinationTable"]["tableId"].startswith(
        "_floe_staging_") for j in load_jobs)  # the target table itself never takes a load job
    queries = [j["configuration"]["query"]["query"] for j in emulator.jobs.values() if "query" in j["configuration"]]
    assert sum("CREATE TABLE IF NOT EXISTS `proj.raw._floe_state`" in q for q in queries) == 1  # once per run
    assert sum("CREATE TABLE IF NOT EXISTS `proj.raw.src_items`" in q for q in queries) == 1  # only while missing


def test_checkpoints_of_a_child_stream_are_never_folded(bigquery, tmp_path):
    # commit_interval folds checkpoints; folded into one commit, parent 1 would keep a, b and c.
    dest, emulator = bigquery
    stream = ResentParentStream()
    result = asyncio.run(run_stream(OneStreamSource(stream), stream, dest, tmp_path / "stage"))
    assert result.ok and result.commits == 2
    assert emulator.db.execute("SELECT id, v FROM raw.src_items ORDER BY id, v").fetchall() == [(1, "c"), (2, "x")]


def test_a_failed_commit_job_leaves_data_and_state_as_they_were(bigquery, tmp_path):
    dest, emulator = bigquery
    dest.load(job_of(tmp_path, records=[record(1, "a")], load_id="20261124T000001Z-000001", checkpoint={"n": 1}))
    emulator.fail_next = "_commit"
    failing = job_of(tmp_path, records=[record(1, "changed"), record(5, "e")], load_id="20261124T000002Z-000002",
                     checkpoint={"n": 2})
    with pytest.raises(DestinationError, match="injected failure") as info:
        dest.load(failing)
    dest.record_failure(failing, str(info.value))  # what the pipeline does with the error
    assert emulator.db.execute("SELECT id, name FROM raw.src_items").fetchall() == [(1, "a")]
    assert dest.get_state("src", "items") == {"n": 1}
    loads = emulator.db.execute("SELECT load_id, status, rows, error LIKE '%injected failure%' FROM raw._floe_loads "
                                "ORDER BY load_id").fetchall()
    assert loads == [("20261124T000001Z-000001", "committed", 1, None),
                     ("20261124T000002Z-000002", "failed", 2, True)]
    assert list(dest.store.list("floe/")) == []
    dest.load(job_of(tmp_path, records=[record(1, "changed")], load_id="20261124T000003Z-000003",
                     checkpoint={"n": 3}))
    assert emulator.db.execute("SELECT id, name FROM raw.src_items").fetchall() == [(1, "changed")]


def test_a_retried_load_job_id_is_not_run_twice(bigquery, tmp_path):
    dest, emulator = bigquery
    job = job_of(tmp_path, "append", records=[record(1, "a")], load_id="20261124T000001Z-000001")
    dest.load(job)
    dest.load(job)  # a retry of the same load: its load and commit jobs exist (409), so they are awaited, not rerun
    assert emulator.db.execute("SELECT COUNT(*) FROM raw.src_items").fetchone() == (1,)
    assert emulator.db.execute("SELECT COUNT(*) FROM raw._floe_state").fetchone() == (1,)


def test_missing_google_credentials_are_named(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    dest = make()
    with pytest.raises(DestinationError, match=r"destinations.bq: no usable Google Cloud credentials in the environment"):
        dest.check()
    with pytest.raises(DestinationError, match=r"destinations.bq.stage: no Google Cloud credentials in the environment"):
        _ = dest.store


def test_a_group_of_streams_commits_in_one_transaction_script_or_not_at_all(bigquery, tmp_path):
    dest, emulator = bigquery

    def job(stream: str, load_id: str, n: int, name: str | None) -> LoadJob:
        base = job_of(tmp_path, "append", records=[record(n, name)], load_id=load_id, checkpoint={"n": n})
        return dataclasses.replace(base, stream=stream, table=dataclasses.replace(base.table, table=stream))

    dest.load_group([job("items", "20261124T000001Z-000001", 1, "a"), job("other", "20261124T000001Z-000002", 1, "b")])
    emulator.db.execute("ALTER TABLE raw.src_other ALTER COLUMN name SET NOT NULL")
    with pytest.raises(DestinationError, match="loading src.items, src.other failed, nothing committed"):
        dest.load_group([job("items", "20261124T000002Z-000003", 2, "c"),
                         job("other", "20261124T000002Z-000004", 2, None)])  # fails in the second table
    for table in ("src_items", "src_other"):
        assert emulator.db.execute(f"SELECT id FROM raw.{table}").fetchall() == [(1,)]
    assert dest.get_state("src", "items") == dest.get_state("src", "other") == {"n": 1}
    commits = [j for j in emulator.jobs.values() if j["jobReference"]["jobId"].endswith("_commit")]
    assert len(commits) == 2 and all("`proj.raw.src_other`" in j["configuration"]["query"]["query"] for j in commits)

def test_the_plan_widens_a_column_before_the_transaction_or_refuses_with_freeze(tmp_path):
    dest = make()
    job = job_of(tmp_path)  # amount is decimal(12, 2)
    existing = {"id": "INT64", "name": "STRING", "amount": "INT64", "created_at": "TIMESTAMP", "props": "JSON",
                "tags": "JSON"}
    plan = dest.plan(job, ["gs://bucket/x.parquet"], existing=existing)
    alter = "ALTER TABLE `proj.raw.src_items` ALTER COLUMN `amount` SET DATA TYPE NUMERIC(21,2)"
    assert alter in plan.ddl and alter not in plan.script  # DDL: BigQuery runs none inside a transaction
    assert sqlglot.parse_one(alter, read="bigquery").key == "alter"
    frozen = dataclasses.replace(job, table=dataclasses.replace(job.table, schema_changes="freeze"))
    with pytest.raises(DestinationError, match=r"column 'amount' is INT64 in the warehouse and the new values are "
                                               r"decimal128\(12, 2\) and schema_changes is freeze"):
        dest.plan(frozen, ["gs://bucket/x.parquet"], existing=existing)
    widened = dest.plan(job, ["gs://bucket/x.parquet"], existing={**existing, "amount": "NUMERIC(14, 2)"})
    assert not any("ALTER" in s and "src_items" in s for s in widened.ddl)  # NUMERIC(14, 2) holds decimal(12, 2)


def test_a_widening_bigquery_does_not_allow_keeps_the_values_in_a_variant_column(tmp_path):
    # DATE -> TIMESTAMP: no coercion; the instants go to `created_at__v_timestamp` (a TIMESTAMP column).
    dest = make()
    job = job_of(tmp_path)
    existing = {"id": "INT64", "name": "STRING", "amount": "NUMERIC(12, 2)", "created_at": "DATE", "props": "JSON",
                "tags": "JSON"}
    schema = dest.schema_plan(job.table, job.files, existing)
    assert schema.renames == [{"created_at": "created_at__v_timestamp"}] and not schema.widen
    assert [c.describe() for c in schema.changes] == [
        "values of column 'created_at' (DATE) that it cannot hold go to new column 'created_at__v_timestamp' TIMESTAMP"]


def test_a_type_change_end_to_end_commits_nothing_and_names_the_column(bigquery, tmp_path):
    dest, emulator = bigquery
    dest.load(job_of(tmp_path, records=[record(1, "a")], load_id="20261124T000001Z-000001", checkpoint={"n": 1}))
    table = pa.table({"id": pa.array([2], pa.float64()), "name": ["b"]})
    path = tmp_path / "changed.parquet"
    pq.write_table(table, path)
    spec = TableSpec("src", "items", table.schema, ("id",), "merge")
    changed = LoadJob("20261124T000002Z-000002", "src", "items", spec, [StagedFile(path, 1, table.schema)], {"n": 2},
                      datetime.now(UTC))
    with pytest.raises(DestinationError, match=r"bq: loading src.items failed, nothing committed: column 'id' is "
                                               r"INT64 in the warehouse and the new values are double"):
        dest.load(changed)
    assert emulator.db.execute("SELECT id, name FROM raw.src_items").fetchall() == [(1, "a")]
    assert dest.get_state("src", "items") == {"n": 1}
    assert list(dest.store.list("floe/")) == []


def test_the_full_refresh_swap_is_one_transaction_that_parses(tmp_path):
    from floe.core.stream import RefreshScope

    dest = make()
    job = job_of(tmp_path, "append")
    existing = {"id": "INT64", "name": "STRING", "amount": "NUMERIC(12, 2)", "created_at": "TIMESTAMP",
                "props": "JSON", "tags": "JSON"}
    scope = RefreshScope("created_at", datetime(2024, 1, 1, tzinfo=UTC))
    plan = dest.refresh_plan(job, existing, [*existing, "_floe_load_id", "_floe_loaded_at"], scope, meta_ready=True)
    parsed = parse_all(plan.script)
    assert isinstance(parsed[0], exp.Transaction) and isinstance(parsed[-1], exp.Commit)
    delete, insert, state = parsed[1], parsed[2], parsed[3]
    assert isinstance(delete, exp.Delete) and "`created_at` >= @refresh_start" in delete.sql("bigquery")
    assert isinstance(insert, exp.Insert) and "FROM `proj.raw.src__floe_refresh_items`" in insert.sql("bigquery")
    assert isinstance(state, exp.Insert) and state.find(exp.Table).name == "_floe_state"
    start = next(p for p in plan.parameters if p["name"] == "refresh_start")
    assert start["parameterType"]["type"] == "TIMESTAMP"
    assert plan.ddl == [] and plan.after == ["DROP TABLE IF EXISTS `proj.raw.src__floe_refresh_items`"]
    whole = dest.refresh_plan(job, existing, list(existing), None, meta_ready=True)
    assert "DELETE FROM `proj.raw.src_items` WHERE TRUE" in whole.script  # without a scope: every row


def test_ddl_refused_while_another_job_changes_the_table_is_run_again(bigquery, tmp_path):
    dest, emulator = bigquery
    dest.load(job_of(tmp_path, records=[record(1, "a")], load_id="20261124T000001Z-000001", checkpoint={"n": 1}))
    emulator.ddl_races = 1  # the staging table's CREATE: BigQuery says another job is changing the dataset
    dest.load(job_of(tmp_path, records=[record(2, "b")], load_id="20261124T000002Z-000002", checkpoint={"n": 2}))
    assert emulator.ddl_races == 0
    assert emulator.db.execute("SELECT id FROM raw.src_items ORDER BY id").fetchall() == [(1,), (2,)]
    assert dest.get_state("src", "items") == {"n": 2}

