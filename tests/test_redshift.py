"""Redshift: S3 staging against moto's S3 server, SQL checked in sqlglot's Redshift dialect, and the
load transaction (staging table, merge, state) executed for real on PostgreSQL.

Redshift itself cannot be reached: `RedshiftOnPostgres` (tests/fixtures/redshift.py) replays it on
PostgreSQL, COPY included (from the manifest and the objects on S3).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from sqlglot import exp

from floe.config import validate_model
from floe.core.destination import LoadJob, StagedFile, TableSpec, json_field
from floe.core.errors import DestinationError
from floe.destinations.redshift import VARCHAR_MAX, RedshiftConfig, RedshiftDestination, fit_strings
from floe.infra.objectstore import S3Store, StoreUrl
from floe.infra.stage import new_load_id
from tests.fixtures.core import VersionedRows
from tests.fixtures.redshift import SECRET, RedshiftOnPostgres, redshift_settings


@pytest.fixture(params=["parquet", "csv"])
def redshift(request, postgres_db, s3_server, s3_bucket, tmp_path):
    config = validate_model(RedshiftConfig, redshift_settings(
        postgres_db, s3_server, s3_bucket, file_format=request.param), "destinations.rs")
    dest = RedshiftOnPostgres("rs", config)
    yield dest
    dest.close()


def job_of(folder: Path, n: int, *tables: pa.Table, disposition: str = "merge",
           pk: tuple[str, ...] = ("id",)) -> LoadJob:
    files = []
    for i, table in enumerate(tables):
        path = folder / f"job{n}-{i}.parquet"
        pq.write_table(table, path)
        files.append(StagedFile(path, table.num_rows, table.schema))
    fields: dict[str, pa.Field] = {}
    for table in tables:
        fields.update({f.name: f for f in table.schema})
    spec = TableSpec("src", "items", pa.schema(list(fields.values())), pk, disposition)  # type: ignore[arg-type]
    return LoadJob(f"20261124T000000Z-00000{n}", "src", "items", spec, files, {"n": n}, datetime.now(UTC))


def items(ids: list[int | None], values: list[str | None], docs: list[str | None] | None = None) -> pa.Table:
    docs = docs or [None] * len(ids)
    return pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), pa.array(values, pa.string()), pa.array(docs, pa.string())],
        schema=pa.schema([("id", pa.int64()), ("v", pa.string()), json_field("doc")]),
    )


def test_loads_go_through_split_files_a_manifest_and_one_copy_then_the_objects_are_deleted(redshift, tmp_path):
    redshift.store.put_bytes("floe/stage/rs/src/items/2026/11/23/20261123T010000Z-0c0ffe/part-00000.parquet", b"old")
    live = f"floe/stage/rs/src/items/{datetime.now(UTC):%Y/%m/%d}/{new_load_id()}/part-00000.parquet"
    redshift.store.put_bytes(live, b"another run's, still loading")  # younger than the lease expiry: kept
    first = items(list(range(1000)), [f"v{i}" for i in range(1000)], ['{"k": 1}'] * 1000)
    redshift.load(job_of(tmp_path, 1, first))
    manifest = redshift.manifests[0]
    assert len(manifest["entries"]) == 4  # slices (4) x files_per_slice (1)
    assert all(e["mandatory"] and e["url"].startswith(f"s3://{redshift.stage_url.bucket}/floe/stage/rs/src/items/")
               for e in manifest["entries"])
    # While COPY ran, the stage held this load's parts and manifest and the live run's part; the
    # crashed load's leftovers were gone.
    suffix = ".parquet" if redshift.config.file_format == "parquet" else ".csv.gz"
    assert sorted(k.rsplit("/", 1)[1] for k in redshift.listed_during_copy) == sorted(
        [f"part-0000{i}{suffix}" for i in range(4)] + ["manifest.json", "part-00000.parquet"])
    assert [key for key, _ in redshift.store.list("floe/")] == [live]  # this load's objects gone after the commit
    redshift.store.delete_keys([live])

    copy = sqlglot.parse_one(redshift.copies[0], read="redshift")
    assert isinstance(copy, exp.Copy)
    assert redshift.copies[0].count("MANIFEST") == 1 and "manifest.json'" in redshift.copies[0]

    # Merge: duplicates within the load and NULL keys, JSON parsed into the JSON type.
    redshift.load(job_of(tmp_path, 2, items([5, None, 5, None, 1000], ["a", "n1", "b", "n2", "new"],
                                            ['{"x": [1]}', None, '{"x": [2]}', None, None])))
    rows = redshift.query("SELECT id, v, doc FROM src.items WHERE id IN (5, 1000) OR id IS NULL ORDER BY id")
    assert rows == [(5, "b", {"x": [2]}), (1000, "new", None), (None, "n2", None)]
    assert redshift.query("SELECT COUNT(*) FROM src.items")[0][0] == 1002
    assert redshift.get_state("src", "items") == {"n": 2}
    assert list(redshift.store.list("floe/")) == []


def test_a_failed_load_commits_nothing_and_still_deletes_its_objects(redshift, tmp_path):
    redshift.load(job_of(tmp_path, 1, items([1], ["a"])))
    bad = pa.table({"id": pa.array(["not-a-number"], pa.string()), "v": ["x"]})
    with pytest.raises(DestinationError, match="nothing committed"):
        redshift.load(job_of(tmp_path, 2, bad))
    assert redshift.get_state("src", "items") == {"n": 1}
    assert redshift.query("SELECT id, v FROM src.items") == [(1, "a")]
    assert list(redshift.store.list("floe/")) == []


def test_the_real_copy_statement_fails_on_postgres_without_leaking_the_secret(postgres_db, s3_server, s3_bucket,
                                                                                 tmp_path):
    config = validate_model(RedshiftConfig, redshift_settings(postgres_db, s3_server, s3_bucket), "destinations.rs")
    dest = RedshiftDestination("rs", config)  # the unmodified class: PostgreSQL cannot run Redshift's COPY
    try:
        with pytest.raises(DestinationError) as caught:
            dest.load(job_of(tmp_path, 1, items([1], ["a"])))
        assert SECRET not in str(caught.value) and "nothing committed" in str(caught.value)
        assert list(dest.store.list("floe/")) == []
        assert dest.get_state("src", "items") is None
    finally:
        dest.close()


def test_long_strings_fail_by_default_and_are_cut_on_a_character_boundary_when_asked(postgres_db, s3_server,
                                                                                       s3_bucket, tmp_path):
    long_value = "é" * 40_000  # 80,000 bytes
    table = items([1, 2], [long_value, "short"])
    for policy in ("fail", "truncate"):
        settings = redshift_settings(postgres_db, s3_server, s3_bucket, long_strings=policy)
        dest = RedshiftOnPostgres("rs", validate_model(RedshiftConfig, settings, "destinations.rs"))
        try:
            job = job_of(tmp_path, 1, table)
            if policy == "fail":
                with pytest.raises(DestinationError, match=r"column 'v' holds a value of 80000 bytes.*truncate"):
                    dest.load(job)
                assert dest.get_state("src", "items") is None
                continue
            dest.load(job)
            value = dest.query("SELECT v FROM src.items WHERE id = 1")[0][0]
            assert value == "é" * (VARCHAR_MAX // 2) and len(value.encode()) <= VARCHAR_MAX
            details = dest.query("SELECT details FROM _floe_loads WHERE status = 'committed'")[0][0]
            assert json.loads(details) == {"truncated_values": 1}
        finally:
            dest.close()
    cut, count = fit_strings(pa.array(["ab€", None, "abc"]), 4)
    assert cut.to_pylist() == ["ab", None, "abc"] and count == 1


def test_slice_count_comes_from_stv_slices_when_not_configured(postgres_db, s3_server, s3_bucket):
    import psycopg

    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:  # stand-in for Redshift's system view
        conn.execute("CREATE VIEW stv_slices AS SELECT g AS slice FROM generate_series(0, 5) g")
    settings = redshift_settings(postgres_db, s3_server, s3_bucket, slices=None, files_per_slice=2)
    dest = RedshiftDestination("rs", validate_model(RedshiftConfig, settings, "destinations.rs"))
    try:
        assert dest.slice_count() == 6
        lines = dest.check()
        assert "6 slices: 12 files per load" in lines and any("write and delete allowed" in line for line in lines)
    finally:
        dest.close()


def test_check_names_a_missing_bucket(postgres_db, s3_server):
    settings = redshift_settings(postgres_db, s3_server, "no-such-bucket-here")
    dest = RedshiftDestination("rs", validate_model(RedshiftConfig, settings, "destinations.rs"))
    try:
        with pytest.raises(DestinationError, match=r"destinations.rs.stage: bucket s3://no-such-bucket-here does not exist"):
            dest.check()
    finally:
        dest.close()


@pytest.mark.parametrize("settings, message", [
    ({"stage": "gs://b/p"}, "stage: .*S3 URL"),
    ({"iam_role": None, "aws_access_key_id": None, "aws_secret_access_key": None}, "COPY needs credentials"),
    ({"aws_secret_access_key": None}, "go together"),
])
def test_config_errors_name_the_problem(settings, message):
    base = {"type": "redshift", "host": "h", "database": "d", "user": "u", "stage": "s3://b/p",
            "aws_access_key_id": "AKID", "aws_secret_access_key": "secret"}
    with pytest.raises(Exception, match=message):
        validate_model(RedshiftConfig, {**base, **settings}, "destinations.rs")


# --- the SQL, parsed as Redshift ---------------------------------------------------------------
ALL_TYPES = pa.schema([
    ("id", pa.int64()), ("n32", pa.int32()), ("flag", pa.bool_()), ("ratio", pa.float64()),
    ("amount", pa.decimal128(12, 3)), ("name", pa.string()), ("day", pa.date32()), ("at_utc", pa.timestamp("us", "UTC")),
    ("at_local", pa.timestamp("us")), json_field("doc"), ("tags", pa.list_(pa.string())), ("raw", pa.binary()),
])


def pure(**extra: Any) -> RedshiftDestination:
    settings = {"type": "redshift", "host": "cluster.example", "database": "dev", "user": "floe",
                "stage": "s3://bucket/prefix", "iam_role": "arn:aws:iam::123456789012:role/floe-copy", **extra}
    return RedshiftDestination("rs", validate_model(RedshiftConfig, settings, "destinations.rs"))


def parse(sql: str) -> exp.Expression:
    return sqlglot.parse_one(sql, read="redshift")


def test_ddl_uses_redshift_types_and_parses():
    dest = pure()
    spec = TableSpec("src", "items", ALL_TYPES, ("id",), "merge")
    create = dest.create_table_sql(spec)
    parsed = parse(create)
    assert isinstance(parsed, exp.Create)
    types = {c.name: c.args["kind"].sql("redshift") for c in parsed.find_all(exp.ColumnDef)}
    assert types["name"] == "VARCHAR(65535)" and types["doc"] == "SUPER" and types["tags"] == "SUPER"
    assert types["amount"] == "DECIMAL(12, 3)" and types["at_utc"] == "TIMESTAMP WITH TIME ZONE"
    assert types["raw"] == "VARBYTE(65535)" and types["_floe_loaded_at"] == "TIMESTAMP WITH TIME ZONE"
    assert isinstance(parse(dest.add_column_sql(spec, pa.field("extra", pa.string()))), exp.Alter)
    staging = parse(dest.staging_ddl(spec, "_floe_staging_x"))
    stage_types = {c.name: c.args["kind"].sql("redshift") for c in staging.find_all(exp.ColumnDef)}
    assert stage_types["doc"] == "VARCHAR(65535)" and stage_types["_floe_seq"] == "BIGINT"
    for statement in dest.meta_ddl():
        assert isinstance(parse(statement), exp.Create)


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
@pytest.mark.parametrize("credentials", ["role", "keys"])
def test_copy_statements_name_the_manifest_credentials_and_format(file_format, credentials):
    extra: dict[str, Any] = {"file_format": file_format, "region": "eu-west-1"}
    if credentials == "keys":
        extra |= {"iam_role": None, "aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "s3cr3t-key",
                  "aws_session_token": "tok3n-value"}
    dest = pure(**extra)
    spec = TableSpec("src", "items", ALL_TYPES, ("id",), "merge")
    sql = dest.copy_sql("_floe_staging_x", spec, "s3://bucket/prefix/rs/src/items/l1/manifest.json")
    copy = parse(sql)
    assert isinstance(copy, exp.Copy)
    target = copy.this if isinstance(copy.this, exp.Table) else copy.this.this
    assert target.name == "_floe_staging_x"
    assert [f.sql("redshift") for f in copy.args["files"]] == ["'s3://bucket/prefix/rs/src/items/l1/manifest.json'"]
    text = copy.sql("redshift")
    if credentials == "role":
        assert "IAM_ROLE 'arn:aws:iam::123456789012:role/floe-copy'" in text
    else:
        assert "ACCESS_KEY_ID 'AKIDEXAMPLE' SECRET_ACCESS_KEY 's3cr3t-key' SESSION_TOKEN 'tok3n-value'" in text
    assert "MANIFEST" in text
    if file_format == "parquet":
        assert text.endswith("FORMAT AS PARQUET") and "(" not in text.split("FROM")[0]
    else:
        columns = [c.name for c in copy.this.expressions]
        assert columns == [*ALL_TYPES.names, "_floe_seq"]
        assert "FORMAT AS CSV GZIP EMPTYASNULL" in text and "REGION eu-west-1" in text.replace("'", "")


@pytest.mark.parametrize("disposition, parent", [("append", ()), ("replace", ()), ("merge", ()), ("merge", ("id",))])
def test_disposition_statements_parse_as_redshift(disposition, parent):
    dest = pure()
    pk = ("id", "name") if disposition == "merge" else ()
    spec = TableSpec("src", "items", ALL_TYPES, pk, disposition, parent)  # type: ignore[arg-type]
    statements = dest.staged_sql(spec, "_floe_staging_x", "_floe_seq", "l1")
    parsed = [parse(s) for s in statements]
    insert = parsed[-1]
    assert isinstance(insert, exp.Insert)
    assert 'JSON_PARSE(_floe_new."doc")' in insert.sql("redshift")
    if disposition == "merge":
        deletes = [p for p in parsed if isinstance(p, exp.Delete) and p.this.name == "items"]
        assert len(deletes) == 2  # matches on `=`, then the null-safe pass
        assert "IS NOT DISTINCT FROM" not in " ".join(statements)  # Redshift lacks it
        assert "OR" in deletes[1].sql("redshift") and "IS NULL" in deletes[1].sql("redshift")
    if disposition == "replace":
        assert isinstance(parsed[0], exp.Delete) and parsed[0].args.get("where") is None


def test_s3_store_deletes_more_than_a_thousand_objects(s3_server, s3_bucket):
    store = S3Store.connect(StoreUrl.parse(f"s3://{s3_bucket}/p"), "test", s3_server.region, s3_server.endpoint_url,
                            s3_server.access_key_id, s3_server.secret_access_key)
    client = s3_server.client()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=s3_bucket, Key=f"p/load/{i:05d}", Body=b"x"), range(1234)))
    client.put_object(Bucket=s3_bucket, Key="other/keep", Body=b"x")
    assert store.delete_prefix("p/") == 1234
    remaining = client.list_objects_v2(Bucket=s3_bucket)
    assert [o["Key"] for o in remaining["Contents"]] == ["other/keep"]


def test_timestamps_dates_and_decimals_survive_the_staged_files(redshift, tmp_path):
    from datetime import date
    from decimal import Decimal

    at = datetime(2024, 3, 10, 1, 59, 59, 123456, tzinfo=UTC)
    table = pa.table({
        "id": pa.array([1, 2], pa.int64()),
        "at": pa.array([at, None], pa.timestamp("us", "UTC")),
        "day": pa.array([date(2024, 2, 29), None]),
        "amount": pa.array([Decimal("-12.50"), None], pa.decimal128(9, 2)),
    })
    redshift.load(job_of(tmp_path, 1, table, disposition="append", pk=()))
    assert redshift.query("SELECT at, day, amount FROM src.items ORDER BY id") == [
        (at, date(2024, 2, 29), Decimal("-12.50")), (None, None, None)]


@pytest.mark.parametrize("redshift", ["parquet"], indirect=True)
def test_a_type_change_widens_by_a_new_column_copy_and_rename_in_the_transaction(redshift, tmp_path):
    # Redshift's ALTER COLUMN changes only a VARCHAR's length: INTEGER -> NUMERIC(12,2) is a new column,
    # an UPDATE copying the values, DROP and RENAME, all in the load's transaction.
    redshift.load(job_of(tmp_path, 1, pa.table({"id": pa.array([1]), "n": pa.array([7], pa.int32())})))
    changed = pa.table({"id": pa.array([2]), "n": pa.array([Decimal("12.75")], pa.decimal128(12, 2))})
    broken = job_of(tmp_path, 2, changed)
    redshift.fail_copy = True  # the COPY fails after the widening ran: the column keeps its type
    with pytest.raises(DestinationError, match="rs: loading src.items failed, nothing committed"):
        redshift.load(broken)
    redshift.fail_copy = False
    assert redshift.query("SELECT data_type FROM information_schema.columns WHERE table_name = 'items' "
                          "AND column_name = 'n'") == [("integer",)]
    redshift.load(job_of(tmp_path, 3, changed))
    assert redshift.query("SELECT id, n FROM src.items ORDER BY id") == [(1, Decimal("7.00")), (2, Decimal("12.75"))]
    assert redshift.query("SELECT data_type, numeric_precision, numeric_scale FROM information_schema.columns "
                          "WHERE table_name = 'items' AND column_name = 'n'") == [("numeric", 12, 2)]
    assert redshift.get_state("src", "items") == {"n": 3}
    statements = redshift.widening.statements('"src"."items"', '"n"', "NUMERIC(12,2)", '"n__floe_widen"')
    assert [sqlglot.parse_one(s, read="redshift").key for s in statements] == ["alter", "update", "alter", "alter"]
    assert list(redshift.store.list("floe/")) == []


@pytest.mark.parametrize("redshift", ["parquet"], indirect=True)  # the refresh is SQL: one file format will do
def test_a_full_refresh_through_s3_replaces_the_rows_in_its_last_commit(redshift, tmp_path):
    from tests.test_full_refresh import run, version

    assert run(redshift, VersionedRows(range(5), "v1"), tmp_path / "stage").ok
    failed = run(redshift, VersionedRows(range(6), "v2", fail_at=4), tmp_path / "stage", full_refresh=True)
    assert failed.commits == 2 and failed.error  # two commits into the refresh copy, then the source broke
    assert redshift.query("SELECT id, v FROM src.items ORDER BY id") == version("v1", range(5))
    assert run(redshift, VersionedRows(range(6), "v3"), tmp_path / "stage", full_refresh=True).ok
    assert redshift.query("SELECT id, v FROM src.items ORDER BY id") == version("v3", range(6))
    assert redshift.get_state("src", "items") == {"next": 6}
    assert list(redshift.store.list("floe/")) == []


def test_lease_and_stamp_statements_parse_as_redshift_and_use_getdate():
    # CURRENT_TIMESTAMP runs on Redshift's leader node only: a statement that reads a table may not use it.
    dest = pure()
    spec = TableSpec("src", "items", ALL_TYPES, ("id",), "merge")
    statements = [*dest.staged_sql(spec, "_floe_staging_x", "_floe_seq", "l1"), dest.renew_lease_sql(),
                  dest.release_lease_sql()]
    for statement in statements:
        assert "CURRENT_TIMESTAMP" not in statement.upper()
        parse(statement.replace("%s", "'x'"))
    assert "GETDATE() + INTERVAL '60 seconds'" in dest.renew_lease_sql()
    assert dest.lock_state_sql == "LOCK {table}" and isinstance(parse("LOCK public._floe_state"), exp.Expression)
