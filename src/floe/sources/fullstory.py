"""FullStory data exports (the Segment Export API), with hauser's behaviour and exactly-once loads.

One stream, `events`. Time is cut into windows aligned to `export_duration` (which divides 24 h,
so windows never straddle a UTC day). For each window: create an export, poll its operation,
fetch the signed download location, download the gzip to a temporary file, and parse it in
chunks into Arrow batches. The window's end is the stream state (`sync_point`); it is the
checkpoint after the window (or after the last window of each UTC day with `load_every: day`),
so a window's rows and its sync point commit together and a crash never leaves orphan rows.

Up to `prefetch` windows are exported and downloaded ahead of the one being parsed. HTTP
retries (429 with Retry-After, 5xx, connection errors) belong to `floe.infra.http`; this module only
re-creates an export whose operation FAILED, re-fetches an expired download location and
re-downloads a body cut short, each a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from floe.core.destination import json_field
from floe.core.errors import ConfigError, SourceError
from floe.core.settings import SourceConfig
from floe.core.stream import Batch, Context, DayRange, RefreshScope, RequestMetrics, Source, State, Stream
from floe.infra.http import ApiError, HttpClient
from floe.infra.threads import iterate_in_thread

if TYPE_CHECKING:
    import pyarrow as pa

    from floe.sources.fullstory_export import ExportReader

log = logging.getLogger("floe.sources.fullstory")

# Column types by name (`arrow_type`): the Arrow types are made when a stream's schema is first asked for.
_I64, _I32, _STR, _F64, _TIME = "int64", "int32", "string", "float64", "timestamp"
# hauser's BaseExportFields (warehouse/schema.go), in its column order.
BASE_FIELDS: list[tuple[str, str]] = [
    ("IndvId", _I64), ("UserId", _I64), ("SessionId", _I64), ("PageId", _I64), ("UserCreated", _TIME),
    ("UserAppKey", _STR), ("UserDisplayName", _STR), ("UserEmail", _STR), ("EventStart", _TIME),
    ("EventType", _STR), ("EventSubType", _STR), ("EventCustomName", _STR), ("EventTargetText", _STR),
    ("EventTargetSelector", _STR), ("EventPageOffset", _I64), ("EventSessionOffset", _I64),
    ("EventModFrustrated", _I64), ("EventModDead", _I64), ("EventModError", _I64), ("EventModSuspicious", _I64),
    ("EventVarErrorKind", _STR), ("EventVarFields", _STR), ("EventWebSourceFileUrl", _STR),
    ("EventFirstInputDelay", _I64), ("EventCumulativeLayoutShift", _F64), ("SessionStart", _TIME),
    ("PageName", _STR), ("PageStart", _TIME), ("PageDuration", _I64), ("PageActiveDuration", _I64),
    ("PageUrl", _STR), ("PageRefererUrl", _STR), ("PageIp", _STR), ("PageLatLong", _STR), ("PageUserAgent", _STR),
    ("PageBrowser", _STR), ("PageBrowserVersion", _STR), ("PageDevice", _STR), ("PagePlatform", _STR),
    ("PageOperatingSystem", _STR), ("PageScreenWidth", _I64), ("PageScreenHeight", _I64),
    ("PageViewportWidth", _I64), ("PageViewportHeight", _I64), ("PageNumEvents", _I32),
    ("PageNumDerivedEvents", _I32), ("PageNumInfos", _I64), ("PageNumWarnings", _I64), ("PageNumErrors", _I64),
    ("PageClusterId", _I64), ("PageMaxScrollDepthPercent", _I64), ("LoadDomContentTime", _I64),
    ("LoadEventTime", _I64), ("LoadFirstPaintTime", _I64), ("LoadLargestPaintTime", _I64), ("ReqUrl", _STR),
    ("ReqMethod", _STR), ("ReqStatus", _I64),
]
MOBILE_FIELDS: list[tuple[str, str]] = [
    (name, _STR) for name in ("AppName", "AppPackageName", "AppDeviceModel", "AppDeviceVendor", "AppVersion",
                              "AppOsVersion", "AppViewName", "EventMobileSourceFile")
]
# Custom vars by FullStory's naming: user vars, event vars, page vars (as hauser asks for them).
CUSTOM_VAR_PATTERNS = ["user_*", "evt_*", "page_*"]
_FIELD_PATTERN = re.compile(r"[^\s*]+\*?")  # a field name, or a prefix followed by `*`
_DURATION = re.compile(r"(\d+)([dhms])")
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
DAY = timedelta(days=1)


def arrow_type(name: str) -> pa.DataType:
    """The Arrow type of a column type name of `BASE_FIELDS` (timestamps in microseconds, UTC)."""
    import pyarrow as pa

    types = {_I64: pa.int64(), _I32: pa.int32(), _STR: pa.string(), _F64: pa.float64(),
             _TIME: pa.timestamp("us", tz="UTC")}
    return types[name]


def parse_duration(text: str) -> timedelta:
    """`15m`, `1h`, `1h30m`, `24h`, `90s`, `1d` -> timedelta (ValueError otherwise)."""
    value = text.strip().lower()
    if not value or _DURATION.sub("", value):
        raise ValueError(f"{text!r} is not a duration like 15m, 1h or 24h")
    return timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(value)))


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def rfc3339(value: datetime) -> str:
    text = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def parse_rfc3339(value: str) -> datetime:
    return _utc(datetime.fromisoformat(value.replace("Z", "+00:00")))


class FullStoryConfig(SourceConfig):
    type: str = "fullstory"
    api_key: SecretStr
    start_time: datetime | None = Field(default=None, description="Used when nothing was loaded yet (default: 30 days ago).")
    end_time: datetime | None = Field(default=None, description="Stop at this time (backfills, tests).")
    export_duration: str = "1h"
    export_delay: str = "24h"
    segment_id: str = "everyone"
    include_mobile_fields: bool = False
    base_url: str = "https://api.fullstory.com"
    load_every: Literal["window", "day"] = "window"
    format: Literal["FORMAT_NDJSON", "FORMAT_JSON"] = "FORMAT_NDJSON"
    fields: list[str] | None = Field(default=None, min_length=1, description=(
        "The fields (names or `prefix_*` patterns) each export asks for; default: hauser's list, the mobile "
        "fields with include_mobile_fields, and user_*, evt_*, page_*."))
    extra_fields: list[str] = Field(default_factory=list, description=(
        "Asked for besides `fields`, e.g. EventTargetSelectorTok or a field newer than this floe."))
    poll_interval: float = Field(default=5.0, gt=0, description="Longest wait between operation polls (hauser: 5 s).")
    prefetch: int = Field(default=3, ge=1, le=16, description="Windows exported and downloaded ahead.")
    export_attempts: int = Field(default=3, ge=1, description="Exports created per window before giving up.")

    @field_validator("export_duration")
    @classmethod
    def _check_duration(cls, value: str) -> str:
        d = parse_duration(value)
        if not timedelta(minutes=15) <= d <= DAY:
            raise ValueError(f"{value!r} must be between 15m and 24h")
        if DAY % d:
            raise ValueError(f"{value!r} must divide 24h evenly (e.g. 15m, 30m, 1h, 2h, 3h, 6h, 12h, 24h)")
        return value

    @field_validator("fields", "extra_fields")
    @classmethod
    def _check_fields(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not _FIELD_PATTERN.fullmatch(name):
                raise ValueError(f"{name!r} is not a field name or a prefix followed by * (like evt_*)")
        return value

    @field_validator("export_delay")
    @classmethod
    def _check_delay(cls, value: str) -> str:
        if parse_duration(value) < timedelta(hours=1):
            raise ValueError(f"{value!r} must be at least 1h (FullStory finishes processing events late)")
        return value

    @model_validator(mode="after")
    def _check_range(self) -> FullStoryConfig:
        if self.start_time and self.end_time and _utc(self.end_time) <= _utc(self.start_time):
            raise ValueError("end_time must be after start_time")
        return self

    @property
    def duration(self) -> timedelta:
        return parse_duration(self.export_duration)

    @property
    def delay(self) -> timedelta:
        return parse_duration(self.export_delay)

    @property
    def export_fields(self) -> list[str]:
        """What each export request asks for (`fields` plus `extra_fields`, each once, in order)."""
        fields = self.fields
        if fields is None:
            known = BASE_FIELDS + (MOBILE_FIELDS if self.include_mobile_fields else [])
            fields = [name for name, _ in known] + CUSTOM_VAR_PATTERNS
        return list(dict.fromkeys(fields + self.extra_fields))


def window_label(window: tuple[datetime, datetime]) -> str:
    """How messages name a window: `window 2024-05-01T00:00:00Z..2024-05-01T01:00:00Z`."""
    return f"window {rfc3339(window[0])}..{rfc3339(window[1])}"


def window_end(start: datetime, duration: timedelta) -> datetime:
    """The end of the window holding `start`: the next multiple of `duration` since the epoch (UTC)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    steps = (start - epoch) // duration
    return epoch + (steps + 1) * duration


class EventsStream(Stream):
    name = "events"
    cursor_field = "EventStart"
    disposition = "append"

    def __init__(self, source: FullStorySource) -> None:
        self.source = source
        self.config: FullStoryConfig = source.config
        self._schema: pa.Schema | None = None
        self._reader: ExportReader | None = None
        self._first_start: datetime | None = None

    @property  # type: ignore[override]  # made on first use: a run with no window left needs no pyarrow
    def schema(self) -> pa.Schema:
        if self._schema is None:
            import pyarrow as pa

            from floe.sources.fullstory_export import CUSTOM_VARS

            fields = BASE_FIELDS + (MOBILE_FIELDS if self.config.include_mobile_fields else [])
            self._schema = pa.schema([pa.field(n, arrow_type(t)) for n, t in fields] + [json_field(CUSTOM_VARS)])
        return self._schema

    @property
    def reader(self) -> ExportReader:
        """One reader for every window: it learns which known fields the events carry."""
        if self._reader is None:
            from floe.sources.fullstory_export import ExportReader

            self._reader = ExportReader(self.schema, self.config.format)
        return self._reader

    # --- windows -------------------------------------------------------------------------
    def sync_point(self, state: State | None) -> datetime:
        if state and state.get("sync_point"):
            return parse_rfc3339(state["sync_point"])
        return self.first_start()

    def first_start(self) -> datetime:
        """Where reading starts without a sync point: `start_time`, else 30 days before it was first asked."""
        if self._first_start is None:
            start = self.config.start_time
            self._first_start = _utc(start) if start else self.source.now() - timedelta(days=30)
        return self._first_start

    def refresh_scope(self) -> RefreshScope:
        # Windows are cut by event time: a full refresh reads every event from the first start on again.
        return RefreshScope("EventStart", self.first_start())

    def windows(self, state: State | None, now: datetime) -> list[tuple[datetime, datetime]]:
        """Every window ready now: it ends before `now - export_delay` (and before `end_time`)."""
        start = self.sync_point(state)
        limit = now - self.config.delay
        if self.config.end_time:
            limit = min(limit, _utc(self.config.end_time))
        out = []
        while start < limit:
            end = window_end(start, self.config.duration)
            if self.config.end_time and end > _utc(self.config.end_time):
                end = _utc(self.config.end_time)
            if end > now - self.config.delay:
                break
            out.append((start, end))
            start = end
        return out

    def next_due(self, state: State | None, now: datetime) -> datetime | None:
        start = self.sync_point(state)
        if self.config.end_time and start >= _utc(self.config.end_time):
            return None
        end = window_end(start, self.config.duration)
        if self.config.end_time:
            end = min(end, _utc(self.config.end_time))
        return end + self.config.delay

    # --- read ----------------------------------------------------------------------------
    # --- backfill: the windows of a day range, below the sync point --------------------------------
    range_column = "EventStart"

    def backfill_scope(self, days: DayRange, state: State | None) -> RefreshScope:
        sync_point = state.get("sync_point") if state else None
        if sync_point is None:
            raise ConfigError(f"{self.source.name}.events: --from/--to re-reads days already loaded, and nothing "
                              "is loaded yet: run it without --from/--to first")
        if days.end > parse_rfc3339(sync_point):
            raise ConfigError(f"{self.source.name}.events: --to {days.last} reaches past the sync point "
                              f"{sync_point} (events up to it are loaded): backfill up to the day before it, "
                              "and let a run without --from/--to load the newer events")
        return RefreshScope(self.range_column, days.start, days.end)

    def read_range(self, scope: RefreshScope) -> AsyncIterator[Batch]:
        windows, start = [], scope.start
        while start < scope.end:
            windows.append((start, min(window_end(start, self.config.duration), scope.end)))
            start = windows[-1][1]
        return self._read_windows(windows, stoppable=False)

    def read(self, state: State | None) -> AsyncIterator[Batch]:
        # The generator itself, not a wrapper: the engine's aclose() then runs its `finally` at once.
        return self._read_windows(self.windows(state, self.source.now()), stoppable=True)

    async def _read_windows(self, windows: list[tuple[datetime, datetime]], stoppable: bool) -> AsyncIterator[Batch]:
        """Export, download and parse `windows` in order; a checkpoint after each window or day (see
        `load_every`). `stoppable`: end at a checkpoint once the run should stop (`floe serve`)."""
        if not windows:
            return
        log.info("event=fullstory_plan source=%s windows=%d first=%s last=%s", self.source.name, len(windows),
                 rfc3339(windows[0][0]), rfc3339(windows[-1][1]))
        tmp = Path(tempfile.mkdtemp(prefix="floe-fullstory-"))
        tasks: list[asyncio.Task[tuple[Path, str]]] = []

        async def fetch(window: tuple[datetime, datetime], index: int) -> tuple[Path, str]:
            return await self.source.fetch_window(window, tmp / f"{index:06d}.gz")

        try:
            for i, window in enumerate(windows):
                # Keep `prefetch` windows in flight ahead of the one being parsed, no more.
                while len(tasks) < min(len(windows), i + self.config.prefetch):
                    tasks.append(asyncio.create_task(fetch(windows[len(tasks)], len(tasks))))
                path, export_id = await tasks[i]
                rows = 0
                async for batch in self._parse(path, f"{window_label(window)}, export {export_id}"):
                    rows += batch.num_rows
                    yield Batch(records=batch)
                path.unlink(missing_ok=True)
                last = i == len(windows) - 1
                log.info("event=fullstory_window source=%s start=%s end=%s rows=%d", self.source.name,
                         rfc3339(window[0]), rfc3339(window[1]), rows)
                day_done = window[1] == window[1].replace(hour=0, minute=0, second=0, microsecond=0)
                if self.config.load_every == "window" or last or day_done:
                    yield Batch(checkpoint={"sync_point": rfc3339(window[1])})
                    if stoppable and self.source.context.should_stop():  # `floe serve` stops after this window
                        log.info("event=fullstory_stopping source=%s sync_point=%s", self.source.name,
                                 rfc3339(window[1]))
                        return
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            shutil.rmtree(tmp, ignore_errors=True)

    async def _parse(self, path: Path, where: str) -> AsyncIterator[pa.RecordBatch]:
        """Parse in a worker thread, at most two batches ahead of the consumer; errors start with `where`."""
        reader = self.reader
        try:
            async with iterate_in_thread(lambda: reader.batches(path, where), ahead=2,
                                         name="fullstory-parse") as batches:
                async for batch in batches:
                    yield batch
        except SourceError as exc:
            raise SourceError(f"{self.source.name}: {exc}") from None


class FullStorySource(Source):
    Config: ClassVar[type[FullStoryConfig]] = FullStoryConfig

    def __init__(self, name: str, config: FullStoryConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        self._api: HttpClient | None = None
        self._files: HttpClient | None = None

    def now(self) -> datetime:
        return _utc(self.context.clock())

    def streams(self) -> list[Stream]:
        return [EventsStream(self)]

    def next_due(self, states: dict[str, State | None], now: datetime) -> datetime | None:
        return EventsStream(self).next_due(states.get("events"), _utc(now))

    async def check(self) -> list[str]:
        # One authenticated GET that creates nothing: an operation id that cannot exist. 404 means
        # the key was accepted (a rejected key is 401/403, raised as such).
        try:
            await self.api.request("GET", "/operations/v1/floe-check")
        except ApiError as exc:
            if exc.status != 404:
                raise
        return [f"API key accepted by {self.config.base_url}"]

    # --- HTTP --------------------------------------------------------------------------------
    @property
    def api(self) -> HttpClient:
        if self._api is None:
            key = self.config.api_key.get_secret_value()
            self._api = HttpClient(self.name, self.config.base_url.rstrip("/"),
                                   headers={"Accept": "application/json"}, credentials={"Authorization": f"Basic {key}"})
        return self._api

    @property
    def files(self) -> HttpClient:
        """Downloads go to signed URLs without the API key."""
        if self._files is None:
            self._files = HttpClient(self.name, timeout=300.0, max_concurrency=self.config.prefetch)
        return self._files

    def request_metrics(self) -> list[RequestMetrics]:
        return [client.metrics for client in (self._api, self._files) if client is not None]

    async def aclose(self) -> None:
        for client in (self._api, self._files):
            if client is not None:
                await client.aclose()
        self._api = self._files = None

    async def create_export(self, start: datetime, end: datetime) -> str:
        body = {"segmentId": self.config.segment_id, "type": "TYPE_EVENT", "format": self.config.format,
                "segmentTimeRange": {"start": "", "end": ""},
                "timeRange": {"start": rfc3339(start), "end": rfc3339(end)}, "fields": self.config.export_fields}
        response = await self.api.request("POST", "/segments/v1/exports", json=body)
        operation = response.json().get("operationId")
        if not operation:
            raise SourceError(f"{self.name}: POST /segments/v1/exports answered without an operationId")
        return str(operation)

    async def wait_for(self, operation: str) -> tuple[str | None, str | None]:
        """Poll until done: (searchExportId, None) or (None, errorDetails) for a FAILED export."""
        delay = 0.05
        while True:
            op = await self.api.get_json(f"/operations/v1/{operation}")
            if op.get("type") not in (None, "SEARCH_EXPORT"):
                raise SourceError(f"{self.name}: operation {operation} has type {op.get('type')!r}, "
                                  "expected SEARCH_EXPORT")
            state = op.get("state")
            if state == "FAILED":
                return None, str(op.get("errorDetails") or "no details")
            export_id = (op.get("results") or {}).get("searchExportId")
            if state == "COMPLETED" and export_id:
                return str(export_id), None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.poll_interval)

    async def fetch_window(self, window: tuple[datetime, datetime], target: Path) -> tuple[Path, str]:
        """Export one window and download its gzip file to `target`: (target, the export's id)."""
        start, end = window
        where = f"{self.name}: {window_label(window)}"
        failures: list[str] = []
        for _ in range(self.config.export_attempts):
            export_id, error = await self.wait_for(await self.create_export(start, end))
            if export_id:
                await self.download(export_id, target, f"{where}, export {export_id}")
                return target, export_id
            failures.append(error or "")
            log.warning("event=fullstory_export_failed %s error=%s (creating it again)", where, error)
        raise SourceError(f"{where}: export FAILED {len(failures)} times: {failures[-1]}")

    async def download(self, export_id: str, target: Path, where: str, attempts: int = 5) -> None:
        import httpx

        for attempt in range(attempts):
            info = await self.api.get_json(f"/search/v1/exports/{export_id}/results")
            location = info.get("location")
            if not location:
                raise SourceError(f"{where}: the export's results have no download location")
            try:
                async with self.files.stream("GET", location) as response:
                    with target.open("wb") as f:
                        async for chunk in response.aiter_raw(1 << 20):
                            f.write(chunk)
                return
            except ApiError as exc:
                # A signed link that expired (400/403) is renewed by asking for the results again.
                if exc.status not in (400, 403) or attempt == attempts - 1:
                    raise
                log.warning("event=fullstory_link_renewed %s error=%s", where, exc)
            except httpx.TransportError as exc:
                if attempt == attempts - 1:
                    raise SourceError(f"{where}: download failed {attempts} times: {type(exc).__name__}") from None
                log.warning("event=fullstory_download_retry %s error=%s", where, type(exc).__name__)

