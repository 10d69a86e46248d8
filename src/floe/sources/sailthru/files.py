"""Finding and opening Sailthru Data Exporter files: loose in a folder, inside .zip files, or one file.

Names are `[<client_id>_]<collection>[.<YYYYMMDD>].json[.gz]` (one-time exports omit the date;
update collections also appear in the plural, e.g. `message_blast_updates`). A file's identity
is its name relative to the configured path (`export.zip/blast.20160401.json` for a zip entry):
that is the key under which state records its checksum. The path is a folder, a zip or a file on
disk, or a prefix in S3 or GCS whose objects are read by ranged requests (no local copy).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Any, cast

import pyarrow as pa

from floe.core.errors import SourceError
from floe.infra.objectread import open_object
from floe.infra.objectstore import ObjectInfo, ObjectStore

log = logging.getLogger("floe.sources.sailthru")

# collection as named in the file -> the collection whose table it feeds
COLLECTIONS: dict[str, str] = {
    "blast": "blast",
    "message_blast": "message_blast",
    "message_blast_update": "message_blast",
    "message_blast_updates": "message_blast",
    "message_transactional": "message_transactional",
    "message_transactional_update": "message_transactional",
    "message_transactional_updates": "message_transactional",
    "profile": "profile",
}
_BY_LENGTH = sorted(COLLECTIONS, key=len, reverse=True)


@dataclass(frozen=True)
class ExportName:
    collection: str  # as named in the file, e.g. message_blast_updates
    client_id: str | None
    export_date: date | None
    gzipped: bool

    @property
    def table(self) -> str:
        return COLLECTIONS[self.collection]

    @property
    def is_update(self) -> bool:
        return self.collection != self.table


def parse_name(filename: str) -> ExportName | None:
    """Parse an export file's base name; None if it is not a Sailthru export name."""
    base = filename
    gzipped = base.endswith(".gz")
    if gzipped:
        base = base[:-3]
    if not base.endswith(".json"):
        return None
    base = base[:-5]
    export_date = None
    stem, dot, suffix = base.rpartition(".")
    if dot and len(suffix) == 8 and suffix.isdigit():
        try:
            export_date = date(int(suffix[:4]), int(suffix[4:6]), int(suffix[6:]))
        except ValueError:
            return None
        base = stem
    for collection in _BY_LENGTH:
        if base == collection:
            return ExportName(collection, None, export_date, gzipped)
        if base.endswith("_" + collection) and len(base) > len(collection) + 1:
            return ExportName(collection, base[: -len(collection) - 1], export_date, gzipped)
    return None


@dataclass(frozen=True)
class LocalFile:
    """A file on disk: a loose export file or a zip holding some."""

    path: Path

    def open(self) -> IO[bytes]:
        return open(self.path, "rb")

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        with self.open() as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()


@dataclass(frozen=True)
class StoredObject:
    """An object in S3 or GCS, read by ranged requests; identified by its size and ETag."""

    store: ObjectStore
    info: ObjectInfo

    def open(self) -> IO[bytes]:
        return open_object(self.store, self.info)

    def fingerprint(self) -> str:
        return f"etag:{self.info.etag};size:{self.info.size}"


Location = LocalFile | StoredObject


@dataclass(frozen=True)
class ExportFile:
    """One export file. `name` is its identity in state and in the `exports` table."""

    name: str
    info: ExportName
    location: Location  # the file itself, or the zip holding it
    member: str | None = None  # the entry inside the zip

    def open_raw(self) -> IO[bytes]:
        """The bytes as delivered (still gzipped for .gz names)."""
        if self.member is None:
            return self.location.open()
        archive = zipfile.ZipFile(self.location.open())
        return cast(IO[bytes], _ClosingMember(archive, archive.open(self.member)))

    def open(self) -> IO[bytes]:
        """The JSON Lines text, decompressed."""
        raw = self.open_raw()
        return gzip.GzipFile(fileobj=raw, mode="rb") if self.info.gzipped else raw  # type: ignore[return-value]

    def arrow_stream(self) -> pa.NativeFile:
        """A pyarrow input stream of the decompressed text (gzip inflated in C)."""
        if self.member is None and isinstance(self.location, LocalFile):
            return pa.input_stream(str(self.location.path), compression="gzip" if self.info.gzipped else None)
        stream = pa.PythonFile(self.open_raw(), mode="r")
        return pa.CompressedInputStream(stream, "gzip") if self.info.gzipped else stream

    def checksum(self) -> str:
        """What identifies this content: the SHA-256 of a local file (or zip entry); for an object in a
        store its ETag and size (a zip entry there: the CRC-32 and size the zip records for it)."""
        if isinstance(self.location, LocalFile):
            if self.member is None:
                return self.location.fingerprint()
            digest = hashlib.sha256()
            with self.open_raw() as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()
        if self.member is None:
            return self.location.fingerprint()
        with zipfile.ZipFile(self.location.open()) as archive:
            entry = archive.getinfo(self.member)
        return f"crc32:{entry.CRC:08x};size:{entry.file_size};zip:{self.location.fingerprint()}"

    @property
    def remote(self) -> bool:
        return isinstance(self.location, StoredObject)

    def sort_key(self) -> tuple[str, bool, str]:
        """One-time (dateless) exports first, then by date; a day's updates after its base files."""
        day = self.info.export_date.isoformat() if self.info.export_date else ""
        return (day, self.info.is_update, self.name)


class _ClosingMember(io.RawIOBase):
    """A zip entry that closes its archive when closed."""

    def __init__(self, archive: zipfile.ZipFile, member: IO[bytes]) -> None:
        self._archive, self._member = archive, member

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self._member.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        return self._member.read(size)

    def close(self) -> None:
        if not self.closed:
            self._member.close()
            self._archive.close()
        super().close()


def _skippable(name: str) -> bool:
    parts = name.split("/")
    return "__MACOSX" in parts or any(p.startswith(".") for p in parts if p)


class _Finder:
    """Collects the export files of a folder or a store prefix: junk (`__MACOSX/`, dot files) and
    unknown names are skipped with a warning, zips are opened and their entries considered."""

    def __init__(self, client_id: str | None) -> None:
        self.client_id = client_id
        self.found: list[ExportFile] = []

    def consider(self, name: str, location: Location, member: str | None = None) -> None:
        if _skippable(name):
            log.warning("event=file_skipped file=%s reason=%s", name, "junk (macOS resource fork or dot file)")
            return
        if name.endswith(".zip") and member is None:
            self.scan_zip(name, location)
            return
        info = parse_name(name.rsplit("/", 1)[-1])
        if info is None:
            log.warning("event=file_skipped file=%s reason=%s", name, "unknown collection or name")
            return
        if self.client_id is not None and info.client_id not in (None, self.client_id):
            log.info("event=file_skipped file=%s reason=%s", name, f"client id {info.client_id} is not {self.client_id}")
            return
        self.found.append(ExportFile(name, info, location, member))

    def scan_zip(self, name: str, location: Location) -> None:
        where = location.path if isinstance(location, LocalFile) else location.store.uri(location.info.key)
        try:
            with zipfile.ZipFile(location.open()) as archive:
                entries = [i.filename for i in archive.infolist() if not i.is_dir()]
        except zipfile.BadZipFile as exc:
            raise SourceError(f"{where}: not a valid zip file ({exc})") from None
        prefix = name + "/" if name else ""  # '' when the configured path is the zip itself
        for entry in entries:
            self.consider(prefix + entry, location, entry)

    def files(self) -> list[ExportFile]:
        return sorted(self.found, key=ExportFile.sort_key)


def discover(root: Path, client_id: str | None = None) -> list[ExportFile]:
    """Every export file under `root` (a folder, a .zip or one file), sorted for loading."""
    if not root.exists():
        raise SourceError(f"{root}: no such file or folder")
    finder = _Finder(client_id)
    if root.is_file() and root.suffix == ".zip":
        finder.scan_zip("", LocalFile(root))
    elif root.is_file():
        finder.consider(root.name, LocalFile(root))
    else:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            finder.consider(path.relative_to(root).as_posix(), LocalFile(path))
    return finder.files()


def discover_objects(store: ObjectStore, prefix: str, client_id: str | None = None) -> list[ExportFile]:
    """Every export file under `prefix` in `store` (names relative to the prefix), sorted for loading."""
    finder = _Finder(client_id)
    base = prefix.rstrip("/") + "/" if prefix else ""
    for info in store.objects(base):
        if info.key.endswith("/"):  # a folder marker
            continue
        finder.consider(info.key[len(base):], StoredObject(store, info))
    return finder.files()


def iter_lines(f: ExportFile) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for every non-blank line, numbered from 1."""
    with f.open() as stream:
        for number, line in enumerate(stream, 1):
            if line.strip():
                yield number, line


def line_chunks(stream: Any, size: int) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, bytes of whole lines) of about `size` bytes; blank-only chunks skipped."""
    carry = b""
    line = 1
    while data := stream.read(size):
        data = carry + data
        cut = data.rfind(b"\n") + 1
        if not cut:
            carry = data
            continue
        chunk, carry = data[:cut], data[cut:]
        if chunk.strip():
            yield line, chunk
        line += chunk.count(b"\n")
    if carry.strip():
        yield line, carry


# A blank line of a chunk of whole lines starts it or follows a newline (JSON whitespace: " \t\r").
_BLANK_START = (b" ", b"\t", b"\r", b"\n")
_MAYBE_BLANK = (b"\n\n", b"\n\r", b"\n ", b"\n\t")


def count_records(stream: Any, size: int = 1 << 20) -> tuple[int, int]:
    """(records, bytes) of JSON Lines text. A record is a line holding more than whitespace, so
    blank lines (inside or at the end) are not counted; counted in C unless a chunk may hold one."""
    records = total = 0
    carry = b""
    while data := stream.read(size):
        total += len(data)
        data = carry + data
        cut = data.rfind(b"\n") + 1
        chunk, carry = data[:cut], data[cut:]
        if chunk[:1] in _BLANK_START or any(p in chunk for p in _MAYBE_BLANK):
            records += sum(1 for line in chunk.split(b"\n") if line.strip())
        else:
            records += chunk.count(b"\n")
    return records + bool(carry.strip()), total
