"""Meltano's BATCH messages: the records of a stream in local files (jsonl, plain or gzip, or Parquet)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from floe.core.errors import SourceError


def batch_rows(message: dict[str, Any], where: str, chunk: int) -> Iterator[list[dict[str, Any]]]:
    """The records of every file in a BATCH message's manifest, `chunk` at a time, as JSON objects."""
    encoding = message.get("encoding") or {}
    fmt = (encoding.get("format") or "jsonl").lower()
    compression = (encoding.get("compression") or "none").lower()
    manifest = message.get("manifest") or []
    if fmt not in ("jsonl", "parquet"):
        raise SourceError(f"{where}: BATCH format {fmt!r} is not supported (jsonl, parquet)")
    for uri in manifest:
        path = _local_path(uri, where)
        for rows in (_jsonl_rows(path, compression, where, chunk) if fmt == "jsonl" else _parquet_rows(path, chunk)):
            for row in rows:
                if type(row) is not dict:
                    raise SourceError(f"{where}: BATCH file {path}: every line must be a JSON object")
            yield rows


def _local_path(uri: Any, where: str) -> Path:
    if not isinstance(uri, str):
        raise SourceError(f"{where}: BATCH manifest entries must be strings")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme else uri)
    raise SourceError(f"{where}: BATCH file {uri}: only local files (file://) are supported")


def _jsonl_rows(path: Path, compression: str, where: str, chunk: int) -> Iterator[list[Any]]:
    opener = gzip.open if compression == "gzip" else open
    try:
        with opener(path, "rb") as handle:  # type: ignore[operator]
            rows: list[Any] = []
            for n, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{n}: not JSON ({exc.msg})") from None
                if len(rows) >= chunk:
                    yield rows
                    rows = []
            yield rows
    except OSError as exc:
        raise SourceError(f"{where}: BATCH file {path}: {exc.strerror or exc}") from None


def _parquet_rows(path: Path, chunk: int) -> Iterator[list[Any]]:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"BATCH file {path}: {exc}") from None
    for batch in parquet.iter_batches(chunk):
        yield _jsonable(batch.to_pylist())


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parquet values as the JSON values a jsonl batch would hold (timestamps as RFC 3339 text)."""
    for row in rows:
        for key, value in row.items():
            if isinstance(value, datetime):
                row[key] = (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
            elif hasattr(value, "isoformat"):
                row[key] = value.isoformat()
            elif isinstance(value, Decimal):
                row[key] = float(value)
    return rows
