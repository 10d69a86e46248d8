"""Staging: batches become files in the run's own folder, `<stage>/<source>/<stream>/<run>/<load_id>-<n>.<format>`.

A `StageWriter` owns the files of one load of one stream. It rolls to a new file when the
schema of the incoming batch changes or the file grows past `rows_per_file`, and hands the
finished files to the loader at each checkpoint. Files are the loader's input and are deleted
once their data is committed; when one read feeds several destinations, `FileShares` deletes a
file once every destination given it has committed it (or failed).

Two formats, chosen by the destinations (`Destination.stage_format`): Parquet, which every
warehouse's bulk loader reads, and Arrow IPC for a loader in this process (DuckDB), which costs
almost nothing to write or read. Either way a loader reads the files in write order.

Runs: every run of a stream stages into a folder of its own (`StageRun`), beside a lock file that
the run holds locked (`flock`) for as long as it lives; the operating system drops the lock when
the process dies, however it dies. Before a stream starts, `remove_leftovers` deletes the folders
whose lock nobody holds: those of dead runs, and only those, so runs of one stream in several
processes (into different destinations, say) never delete each other's files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets as _random
import shutil
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from floe.core.destination import StagedFile
from floe.core.errors import StageError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

SUFFIXES = {"parquet": ".parquet", "arrow": ".arrow"}
LOCK_SUFFIX = ".lock"


def new_load_id(now: datetime | None = None) -> str:
    """A sortable, unique load id: UTC time plus random suffix, e.g. 20261124T030640Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{_random.token_hex(3)}"


def stage_dir(stage: Path, source: str, stream: str, day: datetime) -> Path:
    """A dated folder for stage files that no run owns (`<stage>/<source>/<stream>/<YYYY>/<MM>/<DD>`)."""
    return stage / source / stream / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}"


@dataclass
class StageWriter:
    folder: Path
    load_id: str
    rows_per_file: int = 2_000_000
    compression: str = "zstd"  # Parquet's codec
    format: str = "parquet"  # or "arrow" (see the module docstring)
    _writer: pq.ParquetWriter | pa.ipc.RecordBatchFileWriter | None = None
    _current: StagedFile | None = None
    _finished: list[StagedFile] = field(default_factory=list)
    _count: int = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Append `batch` to the current file; a StageError (naming the file) if it cannot be written."""
        if batch.num_rows == 0 and self._current is not None:
            return
        if self._current is not None and (
            not self._current.schema.equals(batch.schema) or self._current.rows >= self.rows_per_file
        ):
            self._close_file()
        if self._current is None:
            self._open(batch.schema)
        assert self._writer is not None and self._current is not None
        try:
            self._writer.write_batch(batch)
        except OSError as exc:
            raise stage_error(self._current.path, exc) from None
        self._current.rows += batch.num_rows

    def _open(self, schema: pa.Schema) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._count += 1
        directory = self.folder
        path = directory / f"{self.load_id}-{self._count:05d}{SUFFIXES[self.format]}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if self.format == "arrow":
                self._writer = pa.ipc.new_file(path, schema)
            else:
                # No dictionary encoding: stage files live minutes, and trying dictionaries on
                # high-cardinality columns costs more CPU than the rest of the write (zstd still compresses).
                self._writer = pq.ParquetWriter(path, schema, compression=self.compression, use_dictionary=False)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            raise stage_error(path, exc) from None
        self._current = StagedFile(path, 0, schema)

    def _close_file(self) -> None:
        if self._writer is not None and self._current is not None:
            try:
                self._writer.close()
            except OSError as exc:
                raise stage_error(self._current.path, exc) from None
            self._finished.append(self._current)
        self._writer, self._current = None, None

    def flush(self) -> list[StagedFile]:
        """Close the open file and return every file written since the last flush, in write order."""
        self._close_file()
        files, self._finished = self._finished, []
        return files

    def abort(self) -> None:
        """Close and delete every file not yet flushed (on failure; never raises for the files)."""
        if self._writer is not None and self._current is not None:
            with contextlib.suppress(OSError):  # e.g. the disk is still full: the file goes anyway
                self._writer.close()
            self._finished.append(self._current)
        self._writer, self._current = None, None
        for staged in self.flush():
            with contextlib.suppress(OSError):
                staged.path.unlink(missing_ok=True)


def stage_error(path: Path, exc: OSError) -> StageError:
    """One line for an OSError while staging: the file, the reason, and the config key to change."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = "free some space there or point `stage:` at a folder with room" if exc.errno == errno.ENOSPC \
        else "check that floe may write there, or point `stage:` at another folder"
    return StageError(f"stage: cannot write {path}: {reason}; {hint}")


def remove_files(files: list[StagedFile]) -> None:
    for staged in files:
        staged.path.unlink(missing_ok=True)




class FileShares:
    """Stage files given to several destinations: a file is deleted once each of them has let it go
    (`release`: committed, or given up on). A file never `share`d is deleted at its first release.
    Used from the event loop only."""

    def __init__(self) -> None:
        self._holders: dict[Path, int] = {}

    def share(self, files: list[StagedFile], holders: int) -> None:
        for staged in files:
            self._holders[staged.path] = self._holders.get(staged.path, 0) + holders
        if holders <= 0:
            self.release(files)

    def release(self, files: list[StagedFile]) -> None:
        for staged in files:
            left = self._holders.pop(staged.path, 1) - 1
            if left > 0:
                self._holders[staged.path] = left
            else:
                staged.path.unlink(missing_ok=True)


@dataclass
class StageRun:
    """One run's own folder for one stream's stage files, `<stage>/<source>/<stream>/<run>/`, next to
    `<run>.lock`, which this process holds locked until `close` (or its death)."""

    folder: Path
    lock_path: Path
    _lock: int  # the lock file's descriptor, holding the flock

    @classmethod
    def open(cls, stage: Path, source: str, stream: str) -> StageRun:
        base = stage / source / stream
        while True:
            name = f"run-{new_load_id()}"
            lock_path = base / f"{name}{LOCK_SUFFIX}"
            try:
                base.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            except OSError as exc:
                raise stage_error(lock_path, exc) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A clean-up that opened the new file before it was locked took it for a dead run's: start again.
            if _same_file(fd, lock_path):
                break
            os.close(fd)
        since = datetime.now(UTC).isoformat()
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode())
        run = cls(base / name, lock_path, fd)
        try:
            run.folder.mkdir()
        except OSError as exc:
            run.close()
            raise stage_error(run.folder, exc) from None
        return run

    def close(self) -> None:
        """Delete the folder with whatever is left in it, then the lock (never raises)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.lock_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _remove_folder(folder: Path) -> int:
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    return files


def remove_leftovers(stage: Path, source: str, stream: str) -> int:
    """Delete the stage folders of this stream that belong to dead runs; return how many files they held.

    A folder belongs to a dead run when nobody holds its lock (or it has none): staged files only
    live until their commit, so they were never committed and nobody will ever read them. Folders
    of live runs, in this process or any other on this machine, stay."""
    base = stage / source / stream
    if not base.is_dir():
        return 0
    removed = 0
    for entry in sorted(base.iterdir()):
        if entry.name.endswith(LOCK_SUFFIX):
            try:
                fd = os.open(entry, os.O_RDWR)
            except OSError:
                continue  # gone meanwhile: its run closed it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run's
                if _same_file(fd, entry):
                    removed += _remove_folder(base / entry.name.removesuffix(LOCK_SUFFIX))
                    entry.unlink(missing_ok=True)
            finally:
                os.close(fd)
        elif entry.is_dir() and not (base / f"{entry.name}{LOCK_SUFFIX}").exists():
            removed += _remove_folder(entry)  # no lock at all: no run owns it
    return removed
