"""Sailthru Data Exporter files (JSON Lines, optionally gzipped, loose or zipped) into tables.

Every stream reads the files of its collection in date order; each FILE is one commit, so a
bad line fails the stream with `file:line` and nothing of that file is committed, while the
files before it stay loaded. State per stream: `{"files": {name: sha256}}`. A file already
loaded is skipped; a file whose content changed under a known name is an error unless
`floe run --reprocess` is given.

Message files go through `messages` (pyarrow's JSON reader, Arrow kernels: no per-row
Python while their lines hold only known keys). Profiles and blasts are parsed with orjson line
by line (their rows are few and irregular). Keys floe does not read land in each table's `extra`
JSON column; times written without a zone are read in `timezone` (US Eastern by default).

The package, top to bottom: `files` finds and opens export files, `messages` reads message files,
`rows` holds the stream base and the conversions, `streams` the message, blast and exports
tables, `profiles` the profile table and its child tables; this module the config and the source.
"""

from __future__ import annotations

import contextlib
import threading
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError

from floe.core.errors import ConfigError, DestinationError, SourceError
from floe.core.settings import PiiMode, SourceConfig
from floe.core.stream import Context, Source, Stream
from floe.infra.objectstore import GCSStore, ObjectStore, S3Store, StoreUrl
from floe.infra.pii import SALT_ENV, Pii, resolve_salt
from floe.sources.sailthru.files import ExportFile, discover, discover_objects
from floe.sources.sailthru.profiles import CHILD_TABLES, ProfileChildStream, ProfileStream
from floe.sources.sailthru.streams import (
    BlastStream,
    ExportsStream,
    MessageBlastStream,
    MessageTransactionalStream,
)

EASTERN = "America/New_York"


class SailthruConfig(SourceConfig):
    type: str = "sailthru"
    path: str = Field(description="A folder of export files (and/or .zip files), one .zip, or one file; or "
                                  "`s3://bucket/prefix` / `gs://bucket/prefix` (read in place, no local copy).")
    pii: PiiMode | dict[str, PiiMode] = Field(  # type: ignore[assignment]
        "hash", description="What to do with e-mail addresses (`hash`, `drop`, `keep`), or a mapping of columns "
        "to modes as every source takes (its `email` key: the e-mail addresses, hashed unless given).")
    salt: SecretStr | None = Field(None, description=f"Salt for hashing e-mails (default: env {SALT_ENV}).")
    timezone: str = Field(EASTERN, description="Zone of times written without one (send_time, signup_time, ...); "
                                              "Sailthru's exporter works in US Eastern time.")
    client_id: str | None = Field(None, description="Only files of this client id (unprefixed files too).")
    region: str | None = Field(None, description="S3: the bucket's region.")
    endpoint_url: str | None = Field(None, description="S3: an S3-compatible endpoint (MinIO, a test server).")
    aws_access_key_id: SecretStr | None = Field(None, description="S3: access key (default: the AWS environment).")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3: secret key (default: the AWS environment).")
    project: str | None = Field(None, description="GCS: the project (default: from the environment).")
    block_bytes: int = Field(4 << 20, ge=1 << 16, description="Bytes of message JSON parsed per batch.")
    profile_lines: int = Field(1000, ge=1, description="Profiles parsed per batch.")

    @property
    def email_mode(self) -> PiiMode:
        """What happens to e-mail addresses: the `email` column and addresses inside other values."""
        return self.pii if isinstance(self.pii, str) else self.pii.get("email", "hash")

    def pii_columns(self) -> dict[str, PiiMode]:
        return {} if isinstance(self.pii, str) else {k: v for k, v in self.pii.items() if k != "email"}

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("pii", mode="before")
    @classmethod
    def _mode_or_mapping(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("hash", "drop", "keep"):  # one error, not one per union branch
            raise PydanticCustomError("literal_error", "Input should be 'hash', 'drop' or 'keep'",
                                      {"expected": "'hash', 'drop' or 'keep'"})
        return value

    @field_validator("client_id", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


class SailthruSource(Source):
    Config: ClassVar[type[SailthruConfig]] = SailthruConfig

    def __init__(self, name: str, config: SailthruConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        salt = resolve_salt(config.salt.get_secret_value() if config.salt else None)
        if config.email_mode == "hash" and not salt:
            raise ConfigError(f"sources.{name}.salt: is required when pii is hash (or set {SALT_ENV})")
        self.pii = Pii(config.email_mode, salt)
        try:
            self.url = StoreUrl.parse(config.path)
        except ValueError as exc:
            raise ConfigError(f"sources.{name}.path: {exc}") from None
        self.root: Path = self.context.path(config.path)
        self._store: ObjectStore | None = None
        self._files: list[ExportFile] | None = None
        self._lock = threading.Lock()  # streams ask from worker threads; scan (and warn) once
        self._digests: dict[str, str] = {}

    def files(self, table: str) -> list[ExportFile]:
        """The export files feeding `table` ('' for all), in load order; the folder is scanned once."""
        with self._lock:
            if self._files is None:
                if self.url.scheme == "file":
                    self._files = discover(self.root, self.config.client_id)
                else:
                    with store_errors():
                        self._files = discover_objects(self.store, self.url.prefix, self.config.client_id)
        return [f for f in self._files if not table or f.info.table == table]

    @property
    def location(self) -> str:
        return str(self.root) if self.url.scheme == "file" else self.url.uri(self.url.prefix)

    @property
    def store(self) -> ObjectStore:
        """The S3 or GCS bucket of an `s3://` or `gs://` path (connected when first needed)."""
        if self._store is None:
            c, where = self.config, f"sources.{self.name}.path"
            with store_errors():
                if self.url.scheme == "s3":
                    secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
                    self._store = S3Store.connect(self.url, where, c.region, c.endpoint_url,
                                                  secret(c.aws_access_key_id), secret(c.aws_secret_access_key))
                else:
                    self._store = GCSStore.connect(self.url, where, c.project)
        return self._store

    def checksum(self, f: ExportFile) -> str:
        """What identifies the file's content (SHA-256, or size and ETag in a store), once per run."""
        with self._lock:
            known = self._digests.get(f.name)
        if known is None:
            known = f.checksum()
            with self._lock:
                self._digests[f.name] = known
        return known

    def streams(self) -> list[Stream]:
        return [BlastStream(self), MessageBlastStream(self), MessageTransactionalStream(self), ProfileStream(self),
                *(ProfileChildStream(self, child) for child in CHILD_TABLES), ExportsStream(self)]

    async def check(self) -> list[str]:
        found = self.files("")  # raises naming the path when it does not exist or is not a valid zip
        tables = sorted({f.info.table for f in found})
        mode = self.config.email_mode
        pii = f"pii {mode}" + (" (salt set)" if mode == "hash" else "")
        return [f"{self.location}: {len(found)} export files ({', '.join(tables) or 'none yet'}), {pii}"]


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """The object store's errors (missing bucket, denied, unreachable) as errors of this source."""
    try:
        yield
    except DestinationError as exc:
        raise SourceError(str(exc)) from None
