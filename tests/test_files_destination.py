"""`type: files`: data objects plus a versioned state object beside them, in a folder, on S3 (moto
server) and on GCS (local emulator)."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from floe.config import validate_model
from floe.core.destination import LoadJob, StagedFile, TableSpec
from floe.core.errors import DestinationError
from floe.core.stream import Context
from floe.destinations.files import FilesConfig, FilesDestination
from floe.infra.stage import new_load_id


@pytest.fixture(params=["local", "s3", "gs"])
def files_settings(request, tmp_path) -> dict[str, Any]:
    if request.param == "local":
        return {"type": "files", "path": str(tmp_path / "out")}
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()
        return {"type": "files", "path": f"s3://{bucket}/exports", "endpoint_url": s3.endpoint_url,
                "region": s3.region, "aws_access_key_id": s3.access_key_id,
                "aws_secret_access_key": s3.secret_access_key}
    bucket = request.getfixturevalue("gcs_server").new_bucket()
    return {"type": "files", "path": f"gs://{bucket}/exports"}


def make(settings: dict[str, Any], tmp_path: Path, **extra: Any) -> FilesDestination:
    config = validate_model(FilesConfig, {**settings, **extra}, "destinations.out")
    return FilesDestination("out", config, Context(tmp_path))


def job_of(folder: Path, ids: list[int], disposition: str = "append", checkpoint: Any = None) -> LoadJob:
    load_id = new_load_id()
    table = pa.table({"id": pa.array(ids, pa.int64()), "v": [f"v{i}" for i in ids]})
    path = folder / f"{load_id}.parquet"
    pq.write_table(table, path)
    spec = TableSpec("src", "items", table.schema, ("id",) if disposition == "merge" else (), disposition)  # type: ignore[arg-type]
    return LoadJob(load_id, "src", "items", spec, [StagedFile(path, len(ids), table.schema)],
                   checkpoint or {"last": ids[-1]}, datetime.now(UTC))


def data_keys(dest: FilesDestination) -> list[str]:
    return sorted(k for k, _ in dest.store.list(dest.key("src", "items") + "/") if "/_floe_state/" not in k)


def read_rows(dest: FilesDestination, keys: list[str]) -> list[tuple[Any, ...]]:
    """(id, v, _floe_load_id) of every row in the objects, read back with pyarrow or DuckDB."""
    rows: list[tuple[Any, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, key in enumerate(keys):
            local = Path(tmp) / f"{n}-{key.rsplit('/', 1)[1]}"
            local.write_bytes(dest.store.get_bytes(key) or b"")
            if key.endswith(".parquet"):
                table = pq.read_table(local)
            else:
                reader = "read_json_auto" if ".jsonl" in key else "read_csv_auto"
                table = duckdb.sql(f"SELECT * FROM {reader}('{local}')").to_arrow_table()
            rows += [(r["id"], r["v"], r["_floe_load_id"]) for r in table.to_pylist()]
    return sorted(rows)


def test_each_load_writes_its_files_then_a_new_state_version(files_settings, tmp_path):
    dest = make(files_settings, tmp_path)
    first, second = job_of(tmp_path, [1, 2]), job_of(tmp_path, [3])
    dest.load(first)
    dest.load(second)
    assert dest.get_state("src", "items") == {"last": 3}
    keys = data_keys(dest)
    assert len(keys) == 2 and all(k.endswith(".parquet") for k in keys)
    assert read_rows(dest, keys) == [(1, "v1", first.load_id), (2, "v2", first.load_id), (3, "v3", second.load_id)]
    versions = [k for k, _ in dest.store.list(dest.key("src", "items", "_floe_state") + "/")]
    assert [v.rsplit("/", 1)[1] for v in versions] == ["v00000001.json", "v00000002.json"]
    record = json.loads(dest.store.get_bytes(versions[-1]) or b"")
    assert record["files"] == [k for k in keys if second.load_id in k] and record["rows"] == 1
    assert [s["state"] for s in dest.states()] == [{"last": 3}]


def test_objects_of_a_load_that_crashed_before_its_state_are_swept(files_settings, tmp_path):
    dest = make(files_settings, tmp_path)
    dest.load(job_of(tmp_path, [1]))
    # A crashed load: its data object was written, its state object never was.
    crashed = job_of(tmp_path, [2])
    day = datetime.now(UTC)
    orphan = dest.key("src", "items", f"{day:%Y/%m/%d}", f"{crashed.load_id}-00001.parquet")
    dest.store.put_file(orphan, crashed.files[0].path)
    assert dest.get_state("src", "items") == {"last": 1}  # the crash committed nothing
    dest.load(job_of(tmp_path, [2, 3]))  # the re-run
    rows = read_rows(dest, data_keys(dest))
    assert [r[0] for r in rows] == [1, 2, 3]  # row 2 once, not twice
    assert orphan not in data_keys(dest)


@pytest.mark.parametrize("fmt, gzip", [("jsonl", False), ("csv", True)])
def test_jsonl_and_csv_formats(tmp_path, fmt, gzip):
    dest = make({"type": "files", "path": "out"}, tmp_path, format=fmt, gzip=gzip)
    job = job_of(tmp_path, [1, 2])
    dest.load(job)
    [key] = data_keys(dest)
    assert key.endswith(f".{fmt}.gz" if gzip else f".{fmt}")
    assert (tmp_path / "out" / key).exists()  # relative paths resolve against the config's folder
    assert read_rows(dest, [key]) == [(1, "v1", job.load_id), (2, "v2", job.load_id)]


def test_check_and_bad_paths_say_what_is_wrong(s3_server, tmp_path):
    settings = {"type": "files", "path": "s3://missing-bucket-zz/x", "endpoint_url": s3_server.endpoint_url,
                "region": s3_server.region, "aws_access_key_id": "k", "aws_secret_access_key": "s"}
    with pytest.raises(DestinationError, match=r"destinations.out.path: bucket s3://missing-bucket-zz does not exist"):
        make(settings, tmp_path).check()
    with pytest.raises(DestinationError, match=r"destinations.out.path: .*unsupported scheme 'ftp'"):
        make({"type": "files", "path": "ftp://host/x"}, tmp_path)
    assert make({"type": "files", "path": "ok"}, tmp_path).check() == [
        f"folder {tmp_path / 'ok'} will be created by the first run"]
    assert not (tmp_path / "ok").exists()  # a check creates nothing
    (tmp_path / "ok").mkdir()
    assert make({"type": "files", "path": "ok"}, tmp_path).check() == [f"folder {tmp_path / 'ok'}: writable"]


def test_a_full_refresh_moves_its_objects_into_the_layout_in_every_store(files_settings, tmp_path):
    from tests.fixtures.core import VersionedRows
    from tests.test_full_refresh import files_rows, run, version

    dest = make(files_settings, tmp_path)
    assert run(dest, VersionedRows(range(3), "v1"), tmp_path / "stage").ok
    assert run(dest, VersionedRows(range(4), "v2"), tmp_path / "stage", full_refresh=True).ok
    assert files_rows(dest) == version("v2", range(4))  # moved (S3, GCS: copied) into the day folders
    assert list(dest.store.list(dest.key("src", "items", "_floe_refresh") + "/")) == []
    assert dest.get_state("src", "items") == {"next": 4}
