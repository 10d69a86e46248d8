"""Sailthru exports read in place from S3 (moto server) and GCS (local emulator): the same tables as
from a folder, a re-run skips every object, a rewritten object is refused unless `--reprocess`."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.sailthru import VOLATILE, Project

Factory = Callable[..., Project]
PREFIX = "sailthru/exports"


class Bucket:
    """One test bucket with the put and settings the test needs, over either store."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind = kind
        if kind == "s3":
            server = request.getfixturevalue("s3_server")
            self.name = server.new_bucket()
            client = server.client()
            self.put = lambda key, data: client.put_object(Bucket=self.name, Key=key, Body=data)
            # credentials from the environment, as boto3 finds them; the endpoint and region in floe.yml
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_access_key)
            self.settings = f"    endpoint_url: {server.endpoint_url}\n    region: {server.region}\n"
        else:
            server = request.getfixturevalue("gcs_server")
            self.name = server.new_bucket()
            bucket = server.client().bucket(self.name)
            self.put = lambda key, data: bucket.blob(key).upload_from_string(data)
            self.settings = ""
        self.url = f"{kind}://{self.name}/{PREFIX}"

    def upload(self, folder: Path) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.put(f"{PREFIX}/{path.relative_to(folder).as_posix()}", path.read_bytes())


@pytest.fixture(params=["s3", "gs"])
def bucket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    return Bucket(request.param, request, monkeypatch)


def loads(project: Project) -> int:
    return int(project.query("SELECT count(*) FROM _floe_loads WHERE status = 'committed'")[0][0])


def test_exports_in_a_bucket_load_like_a_folder_and_once(
        sailthru_project: Factory, bucket: Bucket, tmp_path: Path) -> None:
    project = sailthru_project(days=2, gzip=True)
    # one day as loose objects (one of them in a "folder"), the other zipped as the hourly delivery is
    with zipfile.ZipFile(tmp_path / "delivery.zip", "w") as archive:
        for path in sorted(project.export.glob("*20160402*")):
            archive.write(path, path.name)
            path.unlink()
    (project.export / "day1").mkdir()
    for path in sorted(project.export.glob("*20160401*")):
        path.rename(project.export / "day1" / path.name)
    (tmp_path / "delivery.zip").rename(project.export / "delivery.zip")
    assert project.cli("run").exit_code == 0
    expected = project.snapshot(volatile=VOLATILE | {"sha256", "etag", "name"})

    bucket.upload(project.export)
    remote = Project(tmp_path / "remote", project.export)
    remote.root.mkdir()
    remote.write_config(path=bucket.url, extra=bucket.settings)
    result = remote.cli("run")
    assert result.exit_code == 0, result.output + result.stderr
    assert remote.snapshot(volatile=VOLATILE | {"sha256", "etag", "name"}) == expected
    names = {n for (n,) in remote.query("SELECT name FROM sailthru.exports")}
    assert "day1/blast.20160401.json.gz" in names and "delivery.zip/blast.20160402.json.gz" in names
    etags = remote.query("SELECT etag, sha256 FROM sailthru.exports WHERE name = 'day1/blast.20160401.json.gz'")
    assert etags[0][0] and etags[0][1] is None

    committed = loads(remote)
    assert remote.cli("run").exit_code == 0
    assert loads(remote) == committed  # every object skipped: name, size and ETag unchanged

    check = remote.cli("check")
    assert check.exit_code == 0, check.output
    assert f"{bucket.url}: {len(names)} export files" in check.output


def test_a_rewritten_object_is_refused_unless_reprocess(sailthru_project: Factory, bucket: Bucket) -> None:
    project = sailthru_project(days=1)
    bucket.upload(project.export)
    project.write_config(path=bucket.url, extra=bucket.settings)
    assert project.cli("run").exit_code == 0
    blast = project.export / "blast.20160401.json"
    first: dict[str, Any] = project.query("SELECT id, name FROM sailthru.blast ORDER BY id")[0]
    bucket.put(f"{PREFIX}/blast.20160401.json", blast.read_bytes().replace(first[1].encode(), b"Renamed campaign"))

    result = project.cli("run")
    assert result.exit_code != 0
    assert "blast.20160401.json: changed since it was loaded (etag:" in result.output + result.stderr
    assert project.query("SELECT name FROM sailthru.blast WHERE id = ?", (first[0],)) == [(first[1],)]
    assert project.cli("run", "--reprocess").exit_code == 0
    assert project.query("SELECT name FROM sailthru.blast WHERE id = ?", (first[0],)) == [("Renamed campaign",)]


def test_check_names_a_missing_bucket(sailthru_project: Factory, bucket: Bucket) -> None:
    project = sailthru_project(days=1)
    missing = bucket.url.replace(bucket.name, bucket.name + "-missing")
    project.write_config(path=missing, extra=bucket.settings)
    result = project.cli("check")
    assert result.exit_code != 0
    assert f"{bucket.name}-missing does not exist" in result.output + result.stderr
