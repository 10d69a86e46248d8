"""Staged rows cut into part files of a warehouse's bulk-load format and uploaded to its object store.

Redshift's COPY and BigQuery's load jobs read many files in parallel. `upload_parts` re-cuts a
load's staged Parquet files into parts of at most `rows_per_part` rows (each batch first given
the warehouse's exact column types by `conform`), uploads them concurrently under the load's key
prefix `<destination>/<source>/<stream>/<YYYY/MM/DD>/<load_id>/` and returns what it uploaded.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from floe.core.destination import LoadJob
from floe.infra.objectstore import ObjectStore, StoreUrl

READ_BATCH_ROWS = 65_536


class PartWriter(Protocol):
    def write_table(self, table: pa.Table) -> None: ...

    def close(self) -> None: ...


class GzipCsvWriter:
    """Headerless gzip CSV (what Redshift's `COPY ... CSV GZIP` reads)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._stream = pa.CompressedOutputStream(str(path), "gzip")
        self._writer = pacsv.CSVWriter(self._stream, schema, write_options=pacsv.WriteOptions(include_header=False))

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
        self._stream.close()


@dataclass(frozen=True)
class PartFormat:
    """A part file format: `parquet` (with a compression codec) or `csv.gz`."""

    kind: Literal["parquet", "csv.gz"]
    compression: str = "snappy"  # parquet only

    @property
    def suffix(self) -> str:
        return "." + self.kind

    def open(self, path: Path, schema: pa.Schema) -> PartWriter:
        if self.kind == "parquet":
            return pq.ParquetWriter(path, schema, compression=self.compression)
        return GzipCsvWriter(path, schema)


@dataclass(frozen=True)
class UploadedPart:
    key: str
    uri: str
    size: int  # bytes


def load_prefix(url: StoreUrl, destination: str, job: LoadJob) -> str:
    """Where one load's parts go: `<url path>/<destination>/<source>/<stream>/<YYYY/MM/DD>/<load_id>/`."""
    return url.key(destination, job.source, job.stream, f"{datetime.now(UTC):%Y/%m/%d}", job.load_id) + "/"


def delete_leftover_loads(store: ObjectStore, stream_prefix: str, min_age_seconds: float) -> int:
    """Delete the part folders under `stream_prefix` (`<YYYY/MM/DD>/<load_id>/`) of loads that started
    at least `min_age_seconds` ago; return how many objects went.

    Meant for leftovers of crashed loads. With `min_age_seconds` = the lease expiry, a folder that
    is spared may belong to a load still running (its lease is alive) and one that goes cannot."""
    cutoff = datetime.now(UTC).timestamp() - min_age_seconds
    stale: list[str] = []
    for key, _size in store.list(stream_prefix):
        load_id = key[len(stream_prefix):].split("/")[3:4]
        try:
            started = datetime.strptime(load_id[0][:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        except (IndexError, ValueError):
            continue  # not a load folder of ours: leave it
        if started <= cutoff:
            stale.append(key)
    if stale:
        store.delete_keys(stale)
    return len(stale)


def write_parts(job: LoadJob, folder: Path, schema: pa.Schema, rows_per_part: int, part_format: PartFormat,
                conform: Callable[[pa.RecordBatch, int], pa.Table]) -> list[Path]:
    """The job's staged rows as `part-00000<suffix>`, ... in `folder`, `rows_per_part` rows each (the
    last fewer). `conform(batch, first_seq)` gives a batch `schema`'s columns; `first_seq` is its first
    row's arrival order in the job."""
    paths: list[Path] = []
    writer: PartWriter | None = None
    in_part = seq = 0
    for staged in job.files:
        for batch in pq.ParquetFile(staged.path).iter_batches(batch_size=READ_BATCH_ROWS):
            table = conform(batch, seq)
            seq += table.num_rows
            offset = 0
            while offset < table.num_rows:
                if writer is None:
                    paths.append(folder / f"part-{len(paths):05d}{part_format.suffix}")
                    writer, in_part = part_format.open(paths[-1], schema), 0
                take = min(rows_per_part - in_part, table.num_rows - offset)
                writer.write_table(table.slice(offset, take))
                offset, in_part = offset + take, in_part + take
                if in_part >= rows_per_part:
                    writer.close()
                    writer = None
    if writer is not None:
        writer.close()
    return paths


def upload_parts(store: ObjectStore, prefix: str, job: LoadJob, schema: pa.Schema, rows_per_part: int,
                 part_format: PartFormat, conform: Callable[[pa.RecordBatch, int], pa.Table]) -> list[UploadedPart]:
    """Write the job's parts (see `write_parts`) to a temporary folder and upload them under `prefix`."""
    with tempfile.TemporaryDirectory(prefix="floe-parts-") as tmp:
        paths = write_parts(job, Path(tmp), schema, rows_per_part, part_format, conform)
        keys = [prefix + p.name for p in paths]
        store.put_files(list(zip(keys, paths, strict=True)))
        return [UploadedPart(k, store.uri(k), p.stat().st_size) for k, p in zip(keys, paths, strict=True)]
