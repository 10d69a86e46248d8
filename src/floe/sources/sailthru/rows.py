"""The base of every Sailthru stream (one commit per export file) and the conversions of parsed
records into typed Arrow columns; blasts and profiles are parsed with orjson line by line."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import pyarrow as pa

from floe.core.destination import json_field
from floe.core.errors import FloeError, SourceError
from floe.core.stream import LEDGER, Batch, State, Stream
from floe.infra.threads import in_thread, iterate_in_thread
from floe.sources.sailthru.files import ExportFile, iter_lines
from floe.sources.sailthru.messages import TS, localize

if TYPE_CHECKING:
    from floe.sources.sailthru import SailthruSource

def time_column(values: list[Any], zone: str) -> pa.Array:
    """ISO strings without zone (read in `zone`) or Mongo `{"$date": ms}` (UTC) -> UTC timestamps."""
    if any(isinstance(v, dict) for v in values):
        out = [datetime.fromtimestamp(v["$date"] / 1000, UTC) if isinstance(v, dict) else None for v in values]
        texts = [v if isinstance(v, str) else None for v in values]
        parsed = localize(pa.array(texts, pa.string()).cast(pa.timestamp("ms")), zone).to_pylist()
        return pa.array([o or p for o, p in zip(out, parsed, strict=True)], TS)
    return localize(pa.array(values, pa.string()).cast(pa.timestamp("ms")), zone)


def as_text(value: Any) -> str | None:
    """Strings as they are; other JSON values as JSON text (true, 12, {"a": 1})."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def unread(records: list[dict[str, Any]], known: Collection[str]) -> list[str | None]:
    """Per record: its non-null values at keys not in `known`, as one JSON object (None: none)."""
    return [orjson.dumps(rest).decode() if (rest := {k: v for k, v in r.items() if k not in known and v is not None})
            else None for r in records]


KINDS: dict[str, pa.DataType] = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
_REFUSED = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, KeyError, OverflowError)


def schema_of(kinds: dict[str, str]) -> pa.Schema:
    """The Arrow schema of columns named with kinds (str, int, float, bool, ts, date, json)."""
    types = {**KINDS, "ts": TS, "date": pa.date32()}
    return pa.schema([json_field(name) if kind == "json" else pa.field(name, types[kind]) for name, kind in kinds.items()])


def typed(values: list[Any], kind: str, zone: str) -> pa.Array:
    if kind == "ts":
        return time_column(values, zone)
    if kind == "date":
        return pa.array(values, pa.string()).cast(pa.date32())
    return pa.array(values, pa.string() if kind == "json" else KINDS[kind])


def typed_batch(data: dict[str, list[Any]], kinds: dict[str, str], zone: str, file: str,
                lines: Sequence[int]) -> pa.RecordBatch:
    """Columns of `kinds` from `data`; a value that does not fit its column is a SourceError
    naming `file:line` (`lines[i]`: the line that row i came from) and the field."""
    arrays = []
    for name, kind in kinds.items():
        try:
            arrays.append(typed(data[name], kind, zone))
        except _REFUSED as exc:
            for i, value in enumerate(data[name]):  # find the row at fault, for its line and its error
                try:
                    typed([value], kind, zone)
                except _REFUSED as own:
                    raise SourceError(f"{file}:{lines[i]}: field {name}: {own}") from None
            raise SourceError(f"{file}: field {name}: {exc}") from None
    return pa.RecordBatch.from_arrays(arrays, schema=schema_of(kinds))


def read_records(f: ExportFile, chunk: int) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
    """(line numbers, parsed lines) in chunks; a bad line raises SourceError naming `file:line`."""
    lines: list[int] = []
    records: list[dict[str, Any]] = []
    for number, line in iter_lines(f):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"{f.name}:{number}: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise SourceError(f"{f.name}:{number}: expected a JSON object, got {type(value).__name__}")
        lines.append(number)
        records.append(value)
        if len(records) >= chunk:
            yield lines, records
            lines, records = [], []
    if records:
        yield lines, records


class SailthruStream(Stream):
    """A table fed by the files of one collection; one commit per file."""

    table: ClassVar[str] = ""  # the collection whose files this stream reads ('' = all)
    disposition = "merge"
    scrubs_itself: ClassVar[bool] = False  # True: batches() already replaced e-mail addresses

    def __init__(self, source: SailthruSource) -> None:
        self.source = source
        self.zone: str = source.config.timezone

    @abstractmethod
    def batches(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        """The rows of one export file of this stream's collection."""

    def _scrubbed(self, f: ExportFile) -> Iterator[pa.RecordBatch]:
        pii = self.source.pii
        try:
            for batch in self.batches(f):
                yield batch if self.scrubs_itself else pii.scrub_batch(batch)
        except FloeError as exc:
            message = str(exc)
            raise SourceError(pii.scrub_text(message if message.startswith(f.name) else f"{f.name}: {message}")) from None
        except (OSError, EOFError, pa.ArrowException, ValueError) as exc:
            raise SourceError(pii.scrub_text(f"{f.name}: {type(exc).__name__}: {exc}")) from None

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        # Each loaded file's checksum is a ledger entry (kept beside the state, see core.stream.LEDGER);
        # a state written before the ledger holds them all under "files": the first commit moves them over.
        legacy: dict[str, str] = dict((state or {}).get("files", {}))
        done: dict[str, str] = {**legacy, **(state or {}).get(LEDGER, {})}
        for f in await in_thread(self.source.files, self.table):
            digest = await in_thread(self.source.checksum, f)
            known = done.get(f.name)
            if known == digest:
                continue
            if known is not None and not self.source.context.options.reprocess:
                raise SourceError(
                    f"{f.name}: changed since it was loaded ({_short(known)} is now {_short(digest)}); "
                    "run `floe run --reprocess` to load it again"
                )
            async with iterate_in_thread(partial(self._scrubbed, f), name=f"sailthru:{f.name}") as batches:
                async for batch in batches:
                    yield Batch(batch)
            done[f.name] = digest
            entries, legacy = {**legacy, f.name: digest}, {}
            yield Batch(checkpoint={"files_loaded": len(done), "last_file": f.name, LEDGER: entries})


def _short(fingerprint: str) -> str:
    """A file's fingerprint for a message: a SHA-256 shortened, an ETag and size as they are."""
    return f"sha256 {fingerprint[:12]}..." if ":" not in fingerprint else fingerprint
