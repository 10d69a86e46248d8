"""A local folder as an object store (the files destination's `path:` on disk, and the tests' stand-in
for a bucket). Conditional writes compare under an `flock` of a lock file beside the object, then
replace the object atomically, so two processes writing one key never see a half-written object."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from floe.core.errors import DestinationError
from floe.infra.localpaths import creatable
from floe.infra.objectstore import ObjectInfo, ObjectStore, StoreUrl


class LocalStore(ObjectStore):
    """A folder on disk; keys are relative paths. Writes are atomic (temp file + rename); names
    starting with a dot (temp and lock files) are not listed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = StoreUrl("file", "", "")

    def _path(self, key: str) -> Path:
        return self.root / key

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(target)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(target)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.exists() else None

    def copy(self, source: str, target: str) -> None:
        self.put_file(target, self._path(source))

    def move_keys(self, pairs: builtins.list[tuple[str, str]]) -> None:
        for source, target in pairs:  # renames: nothing is copied
            self._path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path(source), self._path(target))

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        """Hold an exclusive flock on a lock file beside the object (released when closed, also by a
        process that dies); yields the object's path."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".{target.name}.lock"), "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield target

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        data = self.get_bytes(key)  # replaced atomically: never half written
        return None if data is None else (data, self._version(data))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        with self._locked(key) as target:
            if target.exists():
                return None
            self.put_bytes(key, data)
        return self._version(data)

    def put_if_version(self, key: str, data: bytes, version: str) -> str | None:
        with self._locked(key) as target:
            if not target.exists() or self._version(target.read_bytes()) != version:
                return None
            self.put_bytes(key, data)
        return self._version(data)

    def objects(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        paths = [base] if base.is_file() else sorted(base.rglob("*")) if base.is_dir() else []
        for path in paths:
            if path.is_file() and not path.name.startswith("."):  # temp and lock files
                stat = path.stat()
                key = prefix if path == base else path.relative_to(self.root).as_posix()
                yield ObjectInfo(key, stat.st_size, str(stat.st_mtime_ns))

    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        with open(self._path(key), "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    def delete_keys(self, keys: builtins.list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def check(self) -> str:
        if not self.root.exists():  # a check creates nothing
            return f"folder {creatable(self.root)}"
        try:
            self.put_bytes(".floe-check", b"ok")
            self.delete_keys([".floe-check"])
        except OSError as exc:
            raise DestinationError(f"cannot write to folder {self.root}: {exc.strerror}") from None
        return f"folder {self.root}: writable"


def _temporary(target: Path) -> Path:
    """A name beside `target` no other writer uses (two runs writing one object rename their own file)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
