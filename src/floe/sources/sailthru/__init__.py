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

import os
import threading
import zoneinfo
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, SecretStr, field_validator

from floe.core import secrets
from floe.core.errors import ConfigError
from floe.core.settings import SourceConfig
from floe.core.stream import Context, Source, Stream
from floe.infra.pii import Pii
from floe.sources.sailthru.files import ExportFile, discover
from floe.sources.sailthru.messages import POOL
from floe.sources.sailthru.profiles import (
    ProfileBrowserStream,
    ProfileGeoStream,
    ProfileListsSignupStream,
    ProfileStream,
    ProfileVarsStream,
)
from floe.sources.sailthru.rows import SailthruStream
from floe.sources.sailthru.streams import (
    BlastStream,
    ExportsStream,
    MessageBlastStream,
    MessageTransactionalStream,
)

SALT_ENV = "FLOE_PII_SALT"
EASTERN = "America/New_York"


class SailthruConfig(SourceConfig):
    type: str = "sailthru"
    path: str = Field(description="A folder of export files (and/or .zip files), one .zip, or one file.")
    pii: Literal["hash", "drop", "keep"] = Field("hash", description="What to do with e-mail addresses.")
    salt: SecretStr | None = Field(None, description=f"Salt for hashing e-mails (default: env {SALT_ENV}).")
    timezone: str = Field(EASTERN, description="Zone of times written without one (send_time, signup_time, ...); "
                                              "Sailthru's exporter works in US Eastern time.")
    client_id: str | None = Field(None, description="Only files of this client id (unprefixed files too).")
    block_bytes: int = Field(4 << 20, ge=1 << 16, description="Bytes of message JSON parsed per batch.")
    profile_lines: int = Field(1000, ge=1, description="Profiles parsed per batch.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("client_id", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


class SailthruSource(Source):
    Config: ClassVar[type[SailthruConfig]] = SailthruConfig

    def __init__(self, name: str, config: SailthruConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        salt = config.salt.get_secret_value() if config.salt else os.environ.get(SALT_ENV)
        if config.pii == "hash" and not salt:
            raise ConfigError(f"sources.{name}.salt: is required when pii is hash (or set {SALT_ENV})")
        secrets.register(salt)
        # The system allocator hands freed Arrow buffers back to the OS; the default (mimalloc)
        # keeps them, which added ~100 MB to the peak RSS of a large load.
        pa.set_memory_pool(POOL)
        self.pii = Pii(config.pii, salt)
        self.root: Path = self.context.path(config.path)
        self._files: list[ExportFile] | None = None
        self._lock = threading.Lock()  # streams ask from worker threads; scan (and warn) once
        self._digests: dict[str, str] = {}

    def files(self, table: str) -> list[ExportFile]:
        """The export files feeding `table` ('' for all), in load order; the folder is scanned once."""
        with self._lock:
            if self._files is None:
                self._files = discover(self.root, self.config.client_id)
        return [f for f in self._files if not table or f.info.table == table]

    def checksum(self, f: ExportFile) -> str:
        """SHA-256 of the file as delivered, computed once per run however many streams ask."""
        with self._lock:
            known = self._digests.get(f.name)
        if known is None:
            known = f.checksum()
            with self._lock:
                self._digests[f.name] = known
        return known

    def streams(self) -> list[Stream]:
        return [cls(self) for cls in STREAMS]

    async def check(self) -> list[str]:
        found = self.files("")  # raises naming the path when it does not exist or is not a valid zip
        tables = sorted({f.info.table for f in found})
        pii = f"pii {self.config.pii}" + (" (salt set)" if self.config.pii == "hash" else "")
        return [f"{self.root}: {len(found)} export files ({', '.join(tables) or 'none yet'}), {pii}"]


STREAMS: list[type[SailthruStream]] = [
    BlastStream, MessageBlastStream, MessageTransactionalStream, ProfileStream, ProfileGeoStream,
    ProfileBrowserStream, ProfileListsSignupStream, ProfileVarsStream, ExportsStream,
]
