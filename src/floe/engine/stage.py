"""Staging: batches become files under `<stage>/<source>/<stream>/<YYYY>/<MM>/<DD>/<load_id>-<n>.<format>`.

A `StageWriter` owns the files of one load of one stream. It rolls to a new file when the
schema of the incoming batch changes or the file grows past `rows_per_file`, and hands the
finished files to the loader at each checkpoint. Files are the loader's input and are deleted
once their data is committed.

Two formats, chosen by the destination (`Destination.stage_format`): Parquet, which every
warehouse's bulk loader reads, and Arrow IPC for a loader in this process (DuckDB), which costs
almost nothing to write or read. Either way a loader reads the files in write order.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets as _random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from floe.errors import StageError

SUFFIXES = {"parquet": ".parquet", "arrow": ".arrow"}


def new_load_id(now: datetime | None = None) -> str:
    """A sortable, unique load id: UTC time plus random suffix, e.g. 20261124T030640Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{_random.token_hex(3)}"


def stage_dir(stage: Path, source: str, stream: str, day: datetime) -> Path:
    return stage / source / stream / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}"


@dataclass
class StagedFile:
    path: Path
    rows: int
    schema: pa.Schema


@dataclass
class StageWriter:
    stage: Path
    source: str
    stream: str
    load_id: str
    rows_per_file: int = 2_000_000
    compression: str = "zstd"  # Parquet's codec
    format: str = "parquet"  # or "arrow" (see the module docstring)
    _day: datetime = field(default_factory=lambda: datetime.now(UTC))
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
        self._count += 1
        directory = stage_dir(self.stage, self.source, self.stream, self._day)
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


def remove_leftovers(stage: Path, source: str, stream: str) -> int:
    """Delete staged files a killed run left behind for this stream; return how many.

    Staged files live only until their commit, so any file present before a stream starts
    belongs to a run that died (SIGKILL, power loss) and was never committed. One stream must
    not be run by two processes at once (their state would race anyway)."""
    removed = 0
    for suffix in SUFFIXES.values():
        for path in (stage / source / stream).glob(f"*/*/*/*{suffix}"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
