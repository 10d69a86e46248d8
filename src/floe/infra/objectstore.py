"""Object storage used as a stage (Redshift: S3, BigQuery: GCS) or as the destination itself (files).

One small interface over S3, GCS and a local folder: put, get, list (paginated) and delete by
prefix (paginated, in chunks: S3's DeleteObjects takes at most 1,000 keys and one listing page
holds at most 1,000 keys, a limit that silently truncates deletes if ignored). `check` says exactly what is
wrong: missing bucket, denied access, unreachable endpoint.

Conditional writes (leases, the files destination's state versions): `put_if_absent` and
`put_if_version` succeed only if the object is missing, or is still the version read before;
S3 sends `If-None-Match: *` / `If-Match: <ETag>`, GCS `ifGenerationMatch`, and a local folder
compares under an `flock` of a lock file beside the object, then replaces the object atomically.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from floe.core.errors import DestinationError

DELETE_CHUNK = 1000  # S3 DeleteObjects limit per request
UPLOAD_THREADS = 8


@dataclass(frozen=True)
class StoreUrl:
    scheme: str  # "s3" | "gs" | "file"
    bucket: str  # empty for local folders
    prefix: str  # no leading or trailing slash

    @classmethod
    def parse(cls, url: str) -> StoreUrl:
        parsed = urlparse(url)
        if parsed.scheme in ("s3", "gs"):
            if not parsed.netloc:
                raise ValueError(f"{url}: no bucket name (expected {parsed.scheme}://bucket/prefix)")
            return cls(parsed.scheme, parsed.netloc, parsed.path.strip("/"))
        if parsed.scheme not in ("", "file"):
            raise ValueError(f"{url}: unsupported scheme {parsed.scheme!r} (use s3://, gs:// or a folder)")
        return cls("file", "", parsed.path if parsed.scheme == "file" else url)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}" if self.scheme != "file" else key


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size and version tag (S3 and GCS: the ETag)."""

    key: str
    size: int
    etag: str


class ObjectStore(ABC):
    url: StoreUrl

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's content, or None when it does not exist."""

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Every (key, size) under `prefix`, following pagination to the end."""
        for info in self.objects(prefix):
            yield info.key, info.size

    @abstractmethod
    def objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix` with its size and ETag, following pagination to the end."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes `start` to `end` (exclusive) of the object, which must still be version `etag`."""

    @abstractmethod
    def delete_keys(self, keys: builtins.list[str]) -> None: ...

    @abstractmethod
    def copy(self, source: str, target: str) -> None:
        """Copy one object to another key, inside the store (no download)."""

    def move_keys(self, pairs: builtins.list[tuple[str, str]]) -> None:
        """Move objects to other keys (copies, then the originals are deleted)."""
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda pair: self.copy(*pair), pairs))
        for start in range(0, len(pairs), DELETE_CHUNK):
            self.delete_keys([source for source, _ in pairs[start : start + DELETE_CHUNK]])

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object's content and version (S3 ETag, GCS generation), or None when it does not exist."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the object only if it does not exist: its version, or None if it existed."""

    @abstractmethod
    def put_if_version(self, key: str, data: bytes, version: str) -> str | None:
        """Replace the object only if it is still `version`: the new version, or None if it changed or is gone."""

    def probe_write_and_delete(self) -> str:
        """Write and delete a small object under the prefix: proves the permissions a load needs."""
        probe = self.url.key(".floe-check")
        self.put_bytes(probe, b"ok")
        self.delete_keys([probe])
        return f"stage {self.url.uri(self.url.prefix)}: bucket reachable, write and delete allowed"

    @abstractmethod
    def check(self) -> str:
        """Reach the bucket and write + delete a probe object; return what was verified."""

    def uri(self, key: str) -> str:
        return self.url.uri(key)

    def put_files(self, items: builtins.list[tuple[str, Path]]) -> None:
        """Upload many files concurrently."""
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda item: self.put_file(*item), items))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (any number of them); return how many were deleted."""
        keys = [key for key, _ in self.list(prefix)]
        for start in range(0, len(keys), DELETE_CHUNK):
            self.delete_keys(keys[start : start + DELETE_CHUNK])
        return len(keys)


# --- S3 -----------------------------------------------------------------------------------------
class S3Store(ObjectStore):
    def __init__(self, url: StoreUrl, client: Any, where: str) -> None:
        self.url, self.client, self.where = url, client, where

    @classmethod
    def connect(
        cls, url: StoreUrl, where: str, region: str | None = None, endpoint_url: str | None = None,
        access_key_id: str | None = None, secret_access_key: str | None = None, session_token: str | None = None,
    ) -> S3Store:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", region_name=region, endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key, aws_session_token=session_token,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=UPLOAD_THREADS * 2),
        )
        return cls(url, client, where)

    def _error(self, exc: Exception, action: str) -> DestinationError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        bucket = f"s3://{self.url.bucket}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "404") and action != "get":
                return DestinationError(f"{self.where}: bucket {bucket} does not exist")
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                return DestinationError(f"{self.where}: permission denied to {action} in {bucket} (HTTP {status})")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
                return DestinationError(f"{self.where}: S3 rejected the credentials ({code}) for {bucket}")
            return DestinationError(f"{self.where}: S3 {action} in {bucket} failed: HTTP {status} {code}")
        if isinstance(exc, NoCredentialsError):
            return DestinationError(f"{self.where}: no AWS credentials (set access keys or the AWS environment)")
        if isinstance(exc, EndpointConnectionError):
            return DestinationError(f"{self.where}: S3 endpoint not reachable: {exc}")
        return DestinationError(f"{self.where}: S3 {action} in {bucket} failed: {exc}")

    def put_file(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.url.bucket, key)
        except Exception as exc:
            raise self._error(exc, "write") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.url.bucket, Key=key, Body=data)
        except Exception as exc:
            raise self._error(exc, "write") from None

    def copy(self, source: str, target: str) -> None:
        try:  # the managed copy: multipart above 5 GB
            self.client.copy({"Bucket": self.url.bucket, "Key": source}, self.url.bucket, target)
        except Exception as exc:
            raise self._error(exc, "copy") from None

    def get_bytes(self, key: str) -> bytes | None:
        found = self.get_versioned(key)
        return found[0] if found else None

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.url.bucket, Key=key)
            return bytes(answer["Body"].read()), str(answer["ETag"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, "read") from None
        except Exception as exc:
            raise self._error(exc, "read") from None

    def _put_conditional(self, key: str, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.put_object(Bucket=self.url.bucket, Key=key, Body=data, **condition)
        except ClientError as exc:
            # 412: the condition failed; 409: a concurrent conditional write won; 404: If-Match on a missing key.
            if exc.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey"):
                return None
            raise self._error(exc, "write") from None
        except Exception as exc:
            raise self._error(exc, "write") from None
        return str(answer["ETag"])

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        return self._put_conditional(key, data, IfNoneMatch="*")

    def put_if_version(self, key: str, data: bytes, version: str) -> str | None:
        return self._put_conditional(key, data, IfMatch=version)

    def objects(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.url.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"'))
        except Exception as exc:
            raise self._error(exc, "list") from None

    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        try:  # If-Match: a file rewritten while it is read fails (HTTP 412) rather than mixing versions
            answer = self.client.get_object(Bucket=self.url.bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                            IfMatch=f'"{etag}"')
            return bytes(answer["Body"].read())
        except Exception as exc:
            raise self._error(exc, f"read {key}") from None

    def delete_keys(self, keys: builtins.list[str]) -> None:
        if not keys:
            return
        try:
            answer = self.client.delete_objects(
                Bucket=self.url.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
        except Exception as exc:
            raise self._error(exc, "delete") from None
        if answer.get("Errors"):
            first = answer["Errors"][0]
            raise DestinationError(
                f"{self.where}: could not delete {len(answer['Errors'])} objects in s3://{self.url.bucket} "
                f"(first: {first.get('Key')}: {first.get('Code')})"
            )

    def check(self) -> str:
        try:
            self.client.head_bucket(Bucket=self.url.bucket)
        except Exception as exc:
            raise self._error(exc, "read") from None
        return self.probe_write_and_delete()


# --- GCS ----------------------------------------------------------------------------------------
class GCSStore(ObjectStore):
    page_size = 1000  # objects per listing page (GCS's maximum)

    def __init__(self, url: StoreUrl, client: Any, where: str) -> None:
        self.url, self.client, self.where = url, client, where
        self.bucket = client.bucket(url.bucket)

    @classmethod
    def connect(cls, url: StoreUrl, where: str, project: str | None = None) -> GCSStore:
        """A client from the environment (Application Default Credentials; STORAGE_EMULATOR_HOST for emulators)."""
        from google.cloud import storage

        try:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=project or "floe", credentials=AnonymousCredentials())
            else:
                client = storage.Client(project=project)
        except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
            raise DestinationError(f"{where}: no Google Cloud credentials in the environment: {exc}") from None
        return cls(url, client, where)

    def _error(self, exc: Exception, action: str) -> DestinationError:
        from google.api_core import exceptions as gexc

        bucket = f"gs://{self.url.bucket}"
        if isinstance(exc, gexc.NotFound):
            return DestinationError(f"{self.where}: bucket {bucket} does not exist")
        if isinstance(exc, gexc.Forbidden):
            return DestinationError(f"{self.where}: permission denied to {action} in {bucket}: {exc.message}")
        if isinstance(exc, gexc.Unauthorized):
            return DestinationError(f"{self.where}: GCS rejected the credentials for {bucket}: {exc.message}")
        return DestinationError(f"{self.where}: GCS {action} in {bucket} failed: {exc}")

    def put_file(self, key: str, path: Path) -> None:
        try:
            self.bucket.blob(key).upload_from_filename(str(path))
        except Exception as exc:
            raise self._error(exc, "write") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.bucket.blob(key).upload_from_string(data)
        except Exception as exc:
            raise self._error(exc, "write") from None

    def copy(self, source: str, target: str) -> None:
        try:
            self.bucket.copy_blob(self.bucket.blob(source), self.bucket, target)
        except Exception as exc:
            raise self._error(exc, "copy") from None

    def get_bytes(self, key: str) -> bytes | None:
        from google.api_core import exceptions as gexc

        try:
            return bytes(self.bucket.blob(key).download_as_bytes())
        except gexc.NotFound:
            if self.bucket.exists():
                return None
            raise self._error(gexc.NotFound("bucket"), "read") from None
        except Exception as exc:
            raise self._error(exc, "read") from None

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        from google.api_core import exceptions as gexc

        try:
            for _ in range(5):
                blob = self.bucket.get_blob(key)
                if blob is None:
                    return None
                generation = blob.generation  # (a download sets it anew from the response headers)
                with contextlib.suppress(gexc.PreconditionFailed):  # rewritten in between: read again
                    return bytes(blob.download_as_bytes(if_generation_match=generation)), str(generation)
        except gexc.NotFound:
            return None
        except Exception as exc:
            raise self._error(exc, "read") from None
        raise DestinationError(f"{self.where}: gs://{self.url.bucket}/{key} keeps changing while being read")

    def _put_conditional(self, key: str, data: bytes, generation: int) -> str | None:
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(key)
        try:
            blob.upload_from_string(data, if_generation_match=generation)
        except gexc.PreconditionFailed:
            return None
        except gexc.NotFound:
            if generation and self.bucket.exists():
                return None  # the object is gone
            raise self._error(gexc.NotFound("bucket"), "write") from None
        except Exception as exc:
            raise self._error(exc, "write") from None
        return str(blob.generation)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        return self._put_conditional(key, data, 0)  # generation 0: only if no live object exists

    def put_if_version(self, key: str, data: bytes, version: str) -> str | None:
        return self._put_conditional(key, data, int(version))

    def objects(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            for blob in self.client.list_blobs(self.url.bucket, prefix=prefix, page_size=self.page_size):
                yield ObjectInfo(blob.name, int(blob.size or 0), str(blob.etag or blob.generation))
        except Exception as exc:
            raise self._error(exc, "list") from None

    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        try:
            return bytes(self.bucket.blob(key).download_as_bytes(start=start, end=end - 1))
        except Exception as exc:
            raise self._error(exc, f"read {key}") from None

    def delete_keys(self, keys: builtins.list[str]) -> None:
        from google.api_core import exceptions as gexc

        def delete(key: str) -> None:
            with contextlib.suppress(gexc.NotFound):
                self.bucket.blob(key).delete()

        try:
            with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                list(pool.map(delete, keys))
        except Exception as exc:
            raise self._error(exc, "delete") from None

    def check(self) -> str:
        try:
            if not self.bucket.exists():
                raise DestinationError(f"{self.where}: bucket gs://{self.url.bucket} does not exist")
        except DestinationError:
            raise
        except Exception as exc:
            raise self._error(exc, "read") from None
        return self.probe_write_and_delete()


# --- local folder -------------------------------------------------------------------------------
