"""Twilio: calls, messages and recordings incrementally (merged on sid), phone numbers and pricing replaced.

Incremental streams keep a bookmark per stream: the largest cursor value ever loaded (never the
list's sort order). Each run re-reads from `lookback_days` before the bookmark, because Twilio
updates records after the fact (status, price, duration); rows merge on `sid`, so re-reading never
duplicates. The range is split into windows (days, or hours for a short range) fetched concurrently; windows are committed oldest
first and the bookmark only advances past a window once it and every earlier window are loaded.
The last window is open-ended, so nothing newer than today is missed.

A date filter never returns a row whose date is null: calls that never started (no `start_time`)
and messages never sent (no `date_sent`). Each run first sweeps for them (`null_cursor_rows`): calls
by `Status` (queued, canceled, failed), messages (whose list has no status filter) by reading the
newest messages, down to the newest row the previous run's sweeps saw (`swept_to`, Twilio's clock;
the newest of all its sweeps: a row created before it was then in one of the swept lists or had its
cursor, so a rarely used status does not hold every sweep back; on the first sweep, since `start_date`). Only rows without a cursor are kept from a sweep, and they are staged
before the windows' rows, so a row that started meanwhile ends with its later state. A row that may
still change (e.g. a scheduled message) keeps the next sweeps reaching back to it (`pending_since`),
for at most `PENDING_DAYS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from functools import partial
from typing import Any, ClassVar, Literal, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, SecretStr, field_validator, model_validator

from floe.core.settings import SourceConfig
from floe.core.stream import Batch, Context, DriftSpec, RefreshScope, State, Stream
from floe.infra.http import ApiSource, HttpClient, PageGuard
from floe.infra.threads import WorkerThreads
from floe.sources.twilio_numbers import IncomingPhoneNumbers, PricingPhoneNumbers
from floe.sources.twilio_paging import ListPages, parse_slots, parse_threads
from floe.sources.twilio_records import (
    CALLS,
    MESSAGES,
    RECORDINGS,
    PageParser,
    S,
    Spec,
    parse_rfc2822,
)

T = TypeVar("T")
STREAMS = ("calls", "messages", "recordings", "incoming_phone_numbers", "pricing_phone_numbers")
BATCH_ROWS = 10_000  # pages are joined and converted in batches this big (20k: same CPU, ~35 MB more peak RSS)
# Twilio schedules a message at most 35 days ahead: no row stays pending (without a cursor, not final) longer.
PENDING_DAYS = 35
# Sweeps reach this much further back: lists are sorted by sid, "close to" but not exactly by
# date_created, and Twilio's clock is not floe's.
SWEEP_MARGIN = timedelta(hours=1)
HOURS_BELOW = 2  # a range of fewer days than this many per window read at once is cut into hours (windows())
RAW_ROWS = 4 * BATCH_ROWS  # at most this many rows wait, over all windows, to be converted (~0.45 MB / 1000)


class TwilioConfig(SourceConfig):
    type: Literal["twilio"] = "twilio"
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$", description="The Account SID (AC + 32 hex).")
    auth_token: SecretStr
    start_date: date = Field(description="Earliest day to load on the first run (UTC).")
    end_date: date | None = Field(default=None, description="Last day to load (UTC; default: up to now).")
    streams: list[Literal[STREAMS]] = Field(default_factory=lambda: list(STREAMS))  # type: ignore[valid-type]
    base_url: str = "https://api.twilio.com"
    pricing_url: str | None = Field(
        default=None, description="Pricing API root (default https://pricing.twilio.com, or base_url if it was changed)."
    )
    lookback_days: int = Field(default=7, ge=0, description="Days before the bookmark re-read on every run.")
    null_cursor_rows: bool = Field(
        default=True, description="Also load calls that never started and messages never sent (a sweep per run).")
    include_message_body: bool = False
    max_concurrency: int = Field(default=8, ge=1, le=100)
    window_days: int = Field(default=7, ge=1, description="Largest date window; windows load concurrently.")
    page_size: int = Field(default=1000, ge=1, le=1000)
    checkpoint_rows: int = Field(default=250_000, ge=1000, description="Commit at least this often inside a window.")

    @model_validator(mode="after")
    def _check_range(self) -> TwilioConfig:
        if self.end_date is not None and self.end_date < self.start_date:
            raise ValueError(f"end_date {self.end_date} is before start_date {self.start_date}")
        return self

    @property
    def stop(self) -> datetime | None:
        """The moment after `end_date` (None: no end)."""
        return None if self.end_date is None else datetime.combine(self.end_date + timedelta(days=1),
                                                                   datetime.min.time(), UTC)

    @field_validator("base_url", "pricing_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


@dataclass(frozen=True)
class ListSpec:
    """How one incremental list is read: its cursor and date filter, parameters sent with every
    request, the sweeps that find its rows without a cursor, and the statuses such a row keeps for good."""

    resource: str
    spec: Spec
    cursor: str
    date_filter: str
    params: dict[str, str] = field(default_factory=dict)
    sweeps: tuple[dict[str, str], ...] = ()
    final: tuple[str, ...] = ()


LISTS = {
    "calls": ListSpec("Calls", CALLS, "start_time", "StartTime",
                      sweeps=({"Status": "queued"}, {"Status": "canceled"}, {"Status": "failed"}),
                      final=("completed", "busy", "failed", "no-answer", "canceled")),
    "messages": ListSpec("Messages", MESSAGES, "date_sent", "DateSent", sweeps=({},),
                         final=("delivered", "undelivered", "failed", "received", "read", "canceled")),
    "recordings": ListSpec("Recordings", RECORDINGS, "date_created", "DateCreated",
                           params={"IncludeSoftDeleted": "true"}),
}


class TwilioSource(ApiSource):
    Config: ClassVar[type[TwilioConfig]] = TwilioConfig
    config: TwilioConfig

    def __init__(self, name: str, config: TwilioConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        self.when_retrieved = datetime.now(UTC)
        self.parsing: asyncio.Semaphore | None = None
        self.reading: asyncio.Semaphore | None = None  # windows read at once, over all the source's streams
        self.parse_threads: WorkerThreads | None = None

    def make_http(self) -> HttpClient:
        return HttpClient(
            self.name, auth=(self.config.account_sid, self.config.auth_token.get_secret_value()),
            headers={"Accept": "application/json"}, max_concurrency=self.config.max_concurrency,
        )

    async def aclose(self) -> None:
        self.parsing = self.reading = None  # of this run's event loop
        if self.parse_threads is not None:
            self.parse_threads.close()
            self.parse_threads = None
        await super().aclose()

    @property
    def pricing_url(self) -> str:
        if self.config.pricing_url:
            return self.config.pricing_url
        return "https://pricing.twilio.com" if self.config.base_url == "https://api.twilio.com" else self.config.base_url

    def list_url(self, resource: str) -> str:
        return f"{self.config.base_url}/2010-04-01/Accounts/{self.config.account_sid}/{resource}.json"

    async def check(self) -> list[str]:
        # One authenticated request that reads at most one record.
        await self.http.get_json(self.list_url("IncomingPhoneNumbers"), params={"PageSize": "1"})
        return [f"account {self.config.account_sid}: credentials accepted by {self.config.base_url}"]

    def streams(self) -> list[Stream]:
        make: dict[str, Callable[[], Stream]] = {name: partial(TwilioIncremental, self, name) for name in LISTS}
        make["incoming_phone_numbers"] = partial(IncomingPhoneNumbers, self)
        make["pricing_phone_numbers"] = partial(PricingPhoneNumbers, self)
        return [make[name]() for name in STREAMS if name in self.config.streams]

    def parser(self, key: str, spec: Spec) -> PageParser:
        return PageParser(key, spec, self.name, self.when_retrieved, self.config.include_message_body)

    def threads(self) -> WorkerThreads:
        """The threads this run parses and converts pages on (made on first use)."""
        if self.parse_threads is None:
            self.parse_threads = parse_threads()
        return self.parse_threads

    async def on_parse_threads(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await self.threads().call(fn, *args)

    def window_slots(self) -> asyncio.Semaphore:
        """`max_concurrency` windows read at once over all streams (a window has one request in flight):
        streams read side by side share them, so pages waiting to be parsed do not pile up."""
        if self.reading is None:  # made on first use, inside the run's event loop
            self.reading = asyncio.Semaphore(self.config.max_concurrency)
        return self.reading

    def pages(self, url: str, params: dict[str, str] | None, parser: PageParser, what: str,
              last: Callable[[pa.RecordBatch], bool] | None = None) -> AsyncGenerator[pa.RecordBatch, None]:
        """Every page of a v2010 list as raw batches (`parser.convert` shapes them), each page
        requested while the previous one is parsed (see `twilio_paging`)."""
        if self.parsing is None:  # made on first use, inside the run's event loop
            self.parsing = parse_slots()
        return ListPages(self.http, self.config.base_url, parser, PageGuard(self.name, what),
                         self.parsing, self.threads()).read(url, params, last)


Job = Callable[[], AsyncIterator[pa.RecordBatch]]


class TwilioIncremental(Stream):
    """calls / messages / recordings: merge on sid, bookmark = max cursor loaded, lookback re-read,
    plus a sweep for the rows without a cursor (see the module docstring)."""

    primary_key = ("sid",)
    disposition = "merge"
    run_columns = ("when_retrieved",)

    def __init__(self, source: TwilioSource, name: str) -> None:
        self.source, self.name, self.list = source, name, LISTS[name]
        self.cursor_field = self.range_column = self.list.cursor  # backfills read date windows of it
        self.parser = source.parser(name, self.list.spec)
        self.schema = self.parser.schema
        self.final = pa.array(self.list.final, S)
        # The lookback re-read: which rows changed since loaded (status, price, duration), by age; price moves.
        self.drift = DriftSpec(("sid",), "date_created",
                               tuple(c for c in ("status", "price", "duration") if c in self.schema.names),
                               ("price",) if "price" in self.schema.names else ())

    def windows(self, state: State | None, now: datetime) -> list[tuple[datetime, datetime | None]]:
        """[(from, to)] UTC moments, `to` exclusive; the last window is open-ended (None).

        A range of at least `HOURS_BELOW` days per window read at once (`max_concurrency`, over all
        streams) is cut into whole days (`day_window_size`). A shorter one (a daily run) is cut into
        whole hours, about `HOURS_BELOW` windows per window read at once, so that the hours holding
        most of the records are still read side by side. With `end_date`, the windows end the day
        after it (none once the bookmark is past it)."""
        config = self.source.config
        bookmark = _bookmark(state)
        day = (bookmark - timedelta(days=config.lookback_days)).date() if bookmark else config.start_date
        first = datetime.combine(day, datetime.min.time(), UTC)
        if config.stop is not None and config.stop <= now:
            return self.day_windows(first, config.stop)
        days, wanted = (now.date() - day).days + 1, HOURS_BELOW * config.max_concurrency
        if days >= wanted:
            size = self.day_window_size(days)
            limit = datetime.combine(now.date(), datetime.min.time(), UTC)
        else:
            size = timedelta(hours=max(1, -(-(now - first) // (timedelta(hours=1) * wanted))))
            limit = now
        windows: list[tuple[datetime, datetime | None]] = []
        while first + size <= limit:
            windows.append((first, first + size))
            first += size
        windows.append((first, config.stop))
        return windows

    def day_windows(self, start: datetime, stop: datetime) -> list[tuple[datetime, datetime | None]]:
        """[start, stop) (both midnights) cut into whole-day windows of `day_window_size`."""
        size = self.day_window_size((stop - start).days)
        windows: list[tuple[datetime, datetime | None]] = []
        while start < stop:
            windows.append((start, min(start + size, stop)))
            start += size
        return windows

    def day_window_size(self, days: int) -> timedelta:
        """Whole days, at most `window_days`, about half as many windows as are read at once: a message
        window re-reads its last day (Twilio's `DateSent<` includes it), and a source's streams share
        the windows read at once (calls, messages and recordings fill them together)."""
        config = self.source.config
        return timedelta(days=max(1, min(config.window_days, -(-days // max(1, config.max_concurrency // 2)))))

    def params(self, window: tuple[datetime, datetime | None]) -> dict[str, str]:
        params = {f"{self.list.date_filter}>": _filter_value(window[0]), "PageSize": str(self.source.config.page_size),
                  **self.list.params}
        if window[1] is not None:
            params[f"{self.list.date_filter}<"] = _filter_value(window[1])
        return params

    def sweep_horizon(self, state: State | None) -> datetime:
        """How far back (by date_created) this run sweeps: to the newest row the previous sweep saw, or
        to the oldest row it found still pending (at most PENDING_DAYS before); never swept: to start_date."""
        swept = _moment(state, "swept_to")
        if swept is None:
            return datetime.combine(self.source.config.start_date, datetime.min.time(), UTC)
        start = swept - SWEEP_MARGIN
        pending = _moment(state, "pending_since")
        if pending is not None:
            start = max(min(start, pending - SWEEP_MARGIN), start - timedelta(days=PENDING_DAYS))
        return start

    async def window(self, window: tuple[datetime, datetime | None]) -> AsyncIterator[pa.RecordBatch]:
        """The raw pages of one date window."""
        async for batch in self.source.pages(self.source.list_url(self.list.resource), self.params(window),
                                             self.parser, self.name):
            yield batch

    async def sweep(self, params: dict[str, str], horizon: datetime,
                    newest: list[datetime]) -> AsyncIterator[pa.RecordBatch]:
        """The rows without a cursor among the newest rows of the list (converted), down to the first
        page created entirely before `horizon`; appends the newest date_created seen to `newest`."""
        query = {**params, "PageSize": str(self.source.config.page_size), **self.list.params}
        what = f"{self.name} without {self.cursor_field}" + "".join(f", {k}={v}" for k, v in params.items())

        def last(raw: pa.RecordBatch) -> bool:  # no page is requested after this one
            top = pc.max(parse_rfc2822(raw.column("date_created"), "date_created")).as_py()
            return top is not None and top < horizon

        async with aclosing(self.source.pages(self.source.list_url(self.list.resource), query, self.parser,
                                              what, last)) as pages:
            async for raw in pages:
                batch = self.parser.convert(raw)  # here: a sweep's next request waits for it (`last`)
                top = pc.max(batch.column("date_created")).as_py()
                if top is not None and not newest:
                    newest.append(top)
                keep = pc.is_null(batch.column(self.cursor_field))
                if (stop := self.source.config.stop) is not None:  # created after end_date: not this load's
                    keep = pc.and_(keep, pc.fill_null(pc.less(batch.column("date_created"), pa.scalar(stop)), True))
                yield batch.filter(keep)
                if top is not None and top < horizon:
                    return

    def pending_since(self, batch: pa.RecordBatch) -> datetime | None:
        """The oldest date_created among rows without a cursor whose status is not final (they may still change)."""
        pending = pc.invert(pc.is_in(batch.column("status"), value_set=self.final))
        return pc.min(batch.column("date_created").filter(pending)).as_py()

    # --- backfill: the date windows of a day range, merged on sid (no sweeps: those rows have no date) ---
    def read_range(self, scope: RefreshScope) -> AsyncIterator[Batch]:
        return self._read(None, self.day_windows(scope.start, scope.end), ())

    def read(self, state: State | None) -> AsyncIterator[Batch]:
        # The generator itself, not a wrapper: the engine's aclose() then runs its `finally` at once.
        sweeps = self.list.sweeps if self.source.config.null_cursor_rows else ()
        return self._read(state, self.windows(state, datetime.now(UTC)), sweeps)

    async def _read(self, state: State | None, windows: list[tuple[datetime, datetime | None]],
                    sweeps: tuple[dict[str, str], ...]) -> AsyncIterator[Batch]:
        """Read the sweeps, then the windows, from `state`; checkpoints as the module docstring says."""
        config = self.source.config
        horizon = self.sweep_horizon(state)
        newest: list[list[datetime]] = [[] for _ in sweeps]  # per sweep, the newest row it saw
        jobs: list[Job] = [*(partial(self.sweep, p, horizon, seen) for p, seen in zip(sweeps, newest, strict=True)),
                           *(partial(self.window, w) for w in windows)]
        nsweeps = len(sweeps)
        # the sweeps (a page or two each, usually) do not take the windows' turns
        ahead = min(len(jobs), nsweeps + config.max_concurrency)  # as many as could be read at once (slots)
        queues: list[asyncio.Queue[pa.RecordBatch | BaseException | None]] = []
        tasks: list[asyncio.Task[None]] = []
        getters: dict[asyncio.Task[Any], int] = {}  # a pending queue.get() per job being read

        slots = self.source.window_slots()

        async def fetch(job: Job, queue: asyncio.Queue[Any], sweep: bool) -> None:
            try:  # a sweep takes no window slot: the reader waits for the sweeps before reading windows
                async with nullcontext() if sweep else slots:
                    async for batch in job():
                        await queue.put(batch)
                await queue.put(None)
            except Exception as exc:  # handed to the reader, which raises it
                await queue.put(exc)

        def start_next() -> None:
            if len(queues) < len(jobs):
                queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
                queues.append(queue)
                tasks.append(asyncio.create_task(fetch(jobs[len(queues) - 1], queue, len(queues) <= nsweeps)))

        done = dict(state) if state else {}  # the state once every row read so far is loaded
        best = _bookmark(state)  # the bookmark of the windows completed so far, all earlier ones too
        tops: dict[int, datetime] = {}  # the largest cursor of each window's rows
        raw: dict[int, list[pa.RecordBatch]] = {}  # each window's pages, converted together in ~BATCH_ROWS rows
        finished: set[int] = set()
        prefix = nsweeps  # the first window not yet complete
        pending: datetime | None = None
        since_commit = 0

        async def convert(k: int) -> pa.RecordBatch:  # on a parse thread: the event loop reads meanwhile
            batch = await self.source.on_parse_threads(self.parser.convert_pages, raw.pop(k))
            top = pc.max(batch.column(self.cursor_field)).as_py()
            if top is not None and (k not in tops or top > tops[k]):
                tops[k] = top
            return batch

        def checkpoint() -> State | None:
            nonlocal since_commit
            if since_commit < config.checkpoint_rows:
                return None
            since_commit = 0
            return dict(done)

        try:
            for _ in range(ahead):
                start_next()
            while len(finished) < len(jobs):
                # Sweeps first: their rows are staged before the windows', so a row that got its
                # cursor meanwhile ends with the windows' (later) state. Then a page of whichever
                # window has one (the oldest first), so that every window read at once keeps its
                # requests going. The bookmark only covers windows that are complete together with
                # every earlier one.
                readable = range(len(queues) if len(finished) >= nsweeps else min(nsweeps, len(queues)))
                for k in readable:
                    if k not in finished and k not in getters.values():
                        getters[asyncio.create_task(queues[k].get())] = k
                ready, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                getter = min(ready, key=getters.__getitem__)  # the oldest window with a page
                k, item = getters.pop(getter), getter.result()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    since_commit += item.num_rows
                    if k < nsweeps and item.num_rows:
                        pending = _earliest(pending, self.pending_since(item))
                        yield Batch(item)
                    elif item.num_rows:
                        raw.setdefault(k, []).append(item)
                        rows = {w: sum(page.num_rows for page in pages) for w, pages in raw.items()}
                        if rows[k] >= BATCH_ROWS or sum(rows.values()) >= RAW_ROWS:  # memory stays bounded
                            yield Batch(await convert(max(rows, key=rows.__getitem__)), checkpoint())
                    continue
                finished.add(k)
                start_next()
                if k < nsweeps:
                    if len(finished) == nsweeps:  # every sweep is loaded: where the next sweeps start
                        done = {key: value for key, value in done.items() if key != "pending_since"}
                        if any(newest):
                            done["swept_to"] = max(seen[0] for seen in newest if seen).isoformat()
                        if pending is not None:
                            done["pending_since"] = pending.isoformat()
                    continue
                batch = await convert(k) if k in raw else None
                while prefix in finished:  # windows complete with every earlier one
                    top = tops.get(prefix)
                    if top is not None and (best is None or top > best):
                        best = top
                    prefix += 1
                if best is not None:
                    done = {**done, "bookmark": best.isoformat()}
                commit = checkpoint()
                if batch is not None or commit is not None:
                    yield Batch(batch, commit)
            yield Batch(None, dict(done))
        finally:
            for task in [*tasks, *getters]:
                task.cancel()
            await asyncio.gather(*tasks, *getters, return_exceptions=True)


def _filter_value(moment: datetime) -> str:
    """A date filter value: `YYYY-MM-DD` at midnight (the documented form), else a date-time in
    Twilio's own RFC 2822 spelling (one of the forms the spec's examples show it accepts)."""
    if moment.time() == datetime.min.time():
        return moment.date().isoformat()
    return format_datetime(moment.astimezone(UTC))


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _moment(state: State | None, key: str) -> datetime | None:
    if not state or not state.get(key):
        return None
    value = datetime.fromisoformat(state[key])
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _bookmark(state: State | None) -> datetime | None:
    return _moment(state, "bookmark")
