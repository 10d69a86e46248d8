"""Twilio: calls, messages and recordings incrementally (merged on sid), phone numbers and pricing replaced.

Incremental streams keep a bookmark per stream: the largest cursor value ever loaded (never the
list's sort order). Each run re-reads from `lookback_days` before the bookmark, because Twilio
updates records after the fact (status, price, duration); rows merge on `sid`, so re-reading never
duplicates. The range is split into date windows (`window_days`) fetched concurrently; windows
are committed oldest first and the bookmark only advances past a window once it and every
earlier window are loaded. The last window is open-ended, so nothing newer than today is missed.

Pages are parsed with orjson and transposed into Arrow columns in C (no per-row Python code);
joined pages are converted together (timestamps arrive in RFC 2822 and are decoded vectorised
from the string buffer). Nulls stay null. Message bodies are dropped unless
`include_message_body: true`; `body_length` is always kept.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta
from operator import itemgetter
from typing import Any, ClassVar, Literal
from urllib.parse import urljoin

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, SecretStr, field_validator

from floe.config import SourceConfig
from floe.engine.stream import Batch, Context, State, Stream
from floe.errors import SourceError
from floe.http import ApiSource, HttpClient, PageGuard

log = logging.getLogger("floe.sources.twilio")

STREAMS = ("calls", "messages", "recordings", "incoming_phone_numbers", "pricing_phone_numbers")
RFC2822 = "%a, %d %b %Y %H:%M:%S %z"
TS = pa.timestamp("us", tz="UTC")
BATCH_ROWS = 10_000  # pages are joined and converted in batches this big (20k: same CPU, ~35 MB more peak RSS)
S, I64, B = pa.string(), pa.int64(), pa.bool_()


class TwilioConfig(SourceConfig):
    type: Literal["twilio"] = "twilio"
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$", description="The Account SID (AC + 32 hex).")
    auth_token: SecretStr
    start_date: date = Field(description="Earliest day to load on the first run (UTC).")
    streams: list[Literal[STREAMS]] = Field(default_factory=lambda: list(STREAMS))  # type: ignore[valid-type]
    base_url: str = "https://api.twilio.com"
    pricing_url: str | None = Field(
        default=None, description="Pricing API root (default https://pricing.twilio.com, or base_url if it was changed)."
    )
    lookback_days: int = Field(default=1, ge=0, description="Days before the bookmark re-read on every run.")
    include_message_body: bool = False
    max_concurrency: int = Field(default=8, ge=1, le=100)
    window_days: int = Field(default=7, ge=1, description="Backfill window size; windows load concurrently.")
    page_size: int = Field(default=1000, ge=1, le=1000)
    checkpoint_rows: int = Field(default=250_000, ge=1000, description="Commit at least this often inside a window.")

    @field_validator("base_url", "pricing_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


# --- column specs: (name, raw JSON type, output type) --------------------------------------------------
# raw type "ts" = an RFC 2822 string parsed to a UTC timestamp; "int" = a numeric string cast to int64.
Spec = list[tuple[str, str, pa.DataType]]
CALLS: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), ("parent_call_sid", "str", S), ("to", "str", S), ("from", "str", S),
    ("phone_number_sid", "str", S), ("status", "str", S), ("start_time", "ts", TS), ("end_time", "ts", TS),
    ("duration", "int", I64), ("price", "str", S), ("price_unit", "str", S), ("direction", "str", S),
    ("answered_by", "str", S), ("forwarded_from", "str", S), ("caller_name", "str", S), ("group_sid", "str", S),
    ("queue_time", "int", I64), ("trunk_sid", "str", S),
]
MESSAGES: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), ("date_sent", "ts", TS), ("to", "str", S), ("from", "str", S), ("body", "str", S),
    ("status", "str", S), ("price", "str", S), ("price_unit", "str", S), ("num_media", "int", I64),
    ("num_segments", "int", I64), ("direction", "str", S), ("error_code", "i64", I64), ("error_message", "str", S),
    ("messaging_service_sid", "str", S),
]
RECORDINGS: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), ("call_sid", "str", S), ("conference_sid", "str", S), ("start_time", "ts", TS),
    ("duration", "int", I64), ("price", "str", S), ("price_unit", "str", S), ("status", "str", S),
    ("channels", "i64", I64), ("source", "str", S), ("error_code", "i64", I64), ("media_url", "str", S),
]
_NUMBER_STR = ["friendly_name", "phone_number", "origin", "status", "address_requirements", "voice_url",
               "voice_method", "voice_fallback_url", "voice_fallback_method", "voice_application_sid",
               "voice_receive_mode", "sms_url", "sms_method", "sms_fallback_url", "sms_fallback_method",
               "sms_application_sid", "status_callback", "status_callback_method", "trunk_sid", "emergency_status",
               "address_sid", "identity_sid", "bundle_sid"]
NUMBERS: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), *[(n, "str", S) for n in _NUMBER_STR], ("beta", "bool", B),
    ("voice_caller_id_lookup", "bool", B), ("capabilities", "caps", B),
]
CAPABILITIES = ("voice", "sms", "mms", "fax")
_RAW = {"str": S, "ts": S, "int": S, "i64": I64, "bool": B,
        "caps": pa.struct([(c, B) for c in CAPABILITIES])}


def _name_keys(names: Sequence[str]) -> np.ndarray:
    """Three-letter names as integers (one per name), to compare with bytes read from a buffer."""
    return np.array([(ord(n[0]) << 16) | (ord(n[1]) << 8) | ord(n[2]) for n in names], np.int64)


def meta_fields() -> list[pa.Field]:
    return [pa.field("channel_name", S, nullable=False), pa.field("when_retrieved", TS, nullable=False)]


def output_schema(spec: Spec, drop: set[str] = frozenset()) -> pa.Schema:  # type: ignore[assignment]
    fields = meta_fields()
    for name, raw, out in spec:
        if raw == "caps":
            fields += [pa.field(f"capability_{c}", B) for c in CAPABILITIES]
        elif name not in drop:
            fields.append(pa.field(name, out))
        if name == "body":
            fields.append(pa.field("body_length", I64))
    return pa.schema(fields)


class PageParser:
    """Turns one list page (bytes) into (raw RecordBatch, next page URI); `convert` then turns raw
    batches (one page, or many pages joined: far fewer kernel calls) into the output shape."""

    def __init__(self, key: str, spec: Spec, channel: str, when: datetime, keep_body: bool) -> None:
        self.key, self.spec, self.keep_body = key, spec, keep_body
        self.raw_schema = pa.schema([(name, _RAW[raw]) for name, raw, _ in spec])
        self.getter = itemgetter(*(name for name, _, _ in spec))
        self.schema = output_schema(spec, set() if keep_body else {"body"})
        self.channel = pa.scalar(channel, S)
        self.when = pa.scalar(when, TS)

    def __call__(self, body: bytes) -> tuple[pa.RecordBatch, str | None]:
        # The page's dicts and tuples are acyclic and freed by reference counting; without this the
        # cyclic GC runs several times a page (about a fifth of the parse time) and finds nothing.
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            page = orjson.loads(body)  # a truncated body raises a ValueError: the HTTP layer fetches it again
            if not isinstance(page, dict):
                raise ValueError("a Twilio list page must be a JSON object")
            items = page.get(self.key) or []
            values: list[Sequence[Any]]
            try:  # transpose in C: one itemgetter call per record, one zip for the page
                values = list(zip(*map(self.getter, items), strict=True)) if items else [() for _ in self.spec]
            except KeyError:  # a record without some documented field: look each value up
                values = [[item.get(name) for item in items] for name, _, _ in self.spec]
            columns = [self._column(v, raw) for v, (_, raw, _) in zip(values, self.spec, strict=True)]
            next_uri = page.get("next_page_uri")
            del page, items, values
        finally:
            if gc_enabled:
                gc.enable()
        return pa.RecordBatch.from_arrays(columns, schema=self.raw_schema), next_uri

    def parse(self, body: bytes) -> tuple[pa.RecordBatch, str | None]:
        """One page straight to the output shape."""
        raw, next_uri = self(body)
        return self.convert(raw), next_uri

    @staticmethod
    def _column(values: Sequence[Any], raw: str) -> pa.Array:
        """One column of the page, converted by Arrow in one call (values of unexpected types: slow path)."""
        try:
            return pa.array(values, type=_RAW[raw])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array([_lenient(v, raw) for v in values], type=_RAW[raw])

    def convert(self, raw: pa.RecordBatch) -> pa.RecordBatch:
        n = raw.num_rows
        columns: list[pa.Array] = [pa.nulls(n, S).fill_null(self.channel) if n else pa.array([], S),
                                   pa.nulls(n, TS).fill_null(self.when) if n else pa.array([], TS)]
        for name, kind, out in self.spec:
            col = raw.column(name)
            if kind == "ts":
                columns.append(parse_rfc2822(col, name))
            elif kind == "int":
                columns.append(_to_int(col, name))
            elif kind == "caps":
                columns += [col.field(c) for c in CAPABILITIES]
            elif name == "body":
                length = pc.utf8_length(col).cast(I64)
                if self.keep_body:
                    columns.append(col)
                columns.append(length)
            else:
                columns.append(col.cast(out))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


_MONTHS = _name_keys(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))
_WEEKDAYS = _name_keys(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"))
_MONTH_ORDER = np.argsort(_MONTHS)
_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
_FILLER = "Thu, 01 Jan 1970 00:00:00 +0000"  # stands in for nulls while the layout is read
# byte positions of 'Fri, 18 Oct 2019 17:00:00 +0000': digits, and the punctuation between them
_DIGITS = [5, 6, 12, 13, 14, 15, 17, 18, 20, 21, 23, 24, 27, 28, 29, 30]
_PUNCT = {3: ord(","), 4: 32, 7: 32, 11: 32, 16: 32, 19: ord(":"), 22: ord(":"), 25: 32}


def parse_rfc2822(col: pa.Array, name: str) -> pa.Array:
    """Twilio dates ('Fri, 18 Oct 2019 17:00:00 +0000') -> timestamp[us, UTC], vectorised.

    Values in the fixed 31-byte layout are decoded from the string buffer with numpy (about
    0.1 us a value; Arrow's strptime costs about 0.5); anything else goes through strptime, and a
    value it cannot read is an error."""
    micros = _fixed_rfc2822(col)
    if micros is not None:
        return micros
    try:
        return pc.strptime(col, format=RFC2822, unit="us", error_is_null=False).cast(TS)
    except pa.ArrowInvalid as exc:
        raise SourceError(f"Twilio field {name}: unexpected date format ({exc})") from None


def _fixed_rfc2822(col: pa.Array) -> pa.Array | None:
    """`col` as timestamps if every value has the fixed layout and a real date and time, else None."""
    n = len(col)
    filled = col.fill_null(_FILLER) if col.null_count else col
    _, offsets_buf, data_buf = filled.buffers()
    if n == 0 or data_buf is None:
        return None
    offsets = np.frombuffer(offsets_buf, np.int32, n + 1, filled.offset * 4)
    if not (np.diff(offsets) == 31).all():
        return None
    raw = np.frombuffer(data_buf, np.uint8, 31 * n, int(offsets[0])).reshape(n, 31)
    ok = (raw[:, list(_PUNCT)] == np.array(list(_PUNCT.values()), np.uint8)).all(axis=1)
    b = raw[:, [0, 1, 2, 8, 9, 10, 26]].astype(np.int64)
    d = raw[:, _DIGITS].astype(np.int64) - 48
    ok &= ((d >= 0) & (d <= 9)).all(axis=1)
    sign = b[:, 6]
    ok &= (sign == ord("+")) | (sign == ord("-"))
    ok &= np.isin((b[:, 0] << 16) | (b[:, 1] << 8) | b[:, 2], _WEEKDAYS)
    month_key = (b[:, 3] << 16) | (b[:, 4] << 8) | b[:, 5]
    month0 = _MONTH_ORDER[np.searchsorted(_MONTHS[_MONTH_ORDER], month_key).clip(0, 11)]
    ok &= _MONTHS[month0] == month_key
    day, year = d[:, 0] * 10 + d[:, 1], d[:, 2] * 1000 + d[:, 3] * 100 + d[:, 4] * 10 + d[:, 5]
    hour, minute, second = d[:, 6] * 10 + d[:, 7], d[:, 8] * 10 + d[:, 9], d[:, 10] * 10 + d[:, 11]
    offset = (d[:, 12] * 10 + d[:, 13]) * 3600 + (d[:, 14] * 10 + d[:, 15]) * 60
    month = month0 + 1
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    ok &= (day >= 1) & (day <= _MONTH_DAYS[month0] + (leap & (month == 2)))
    ok &= (hour < 24) & (minute < 60) & (second < 60)
    if not ok.all():
        return None
    y = year - (month <= 2)  # days since 1970-01-01: H. Hinnant's days_from_civil
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    seconds = days * 86400 + hour * 3600 + minute * 60 + second - np.where(sign == ord("-"), -offset, offset)
    nulls = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None
    return pa.array(seconds * 1_000_000, type=pa.int64(), mask=nulls).cast(TS)


def _lenient(value: Any, raw: str) -> Any:
    """Slow path for a value that does not have its documented JSON type (e.g. a number sent as a number)."""
    if value is None:
        return None
    if raw in ("str", "ts", "int"):
        return orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
    if raw == "i64":
        text = str(value).strip()
        return int(text) if text.lstrip("-").isdigit() else None
    if raw == "bool":
        return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
    return None


def _to_int(col: pa.Array, name: str) -> pa.Array:
    """Numeric strings ("42", "", null) -> int64; "" becomes null."""
    cleaned = pc.if_else(pc.equal(pc.utf8_trim_whitespace(col), ""), pa.scalar(None, S), col)
    try:
        return pc.cast(cleaned, I64)
    except pa.ArrowInvalid:
        try:
            return pc.cast(pc.cast(cleaned, pa.float64()), I64, safe=False)
        except pa.ArrowInvalid as exc:
            raise SourceError(f"Twilio field {name}: not a number ({exc})") from None


class TwilioSource(ApiSource):
    Config: ClassVar[type[TwilioConfig]] = TwilioConfig
    config: TwilioConfig

    def __init__(self, name: str, config: TwilioConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        self.when_retrieved = datetime.now(UTC)

    def make_http(self) -> HttpClient:
        return HttpClient(
            self.name, auth=(self.config.account_sid, self.config.auth_token.get_secret_value()),
            headers={"Accept": "application/json"}, max_concurrency=self.config.max_concurrency,
        )

    @property
    def pricing_url(self) -> str:
        if self.config.pricing_url:
            return self.config.pricing_url
        return "https://pricing.twilio.com" if self.config.base_url == "https://api.twilio.com" else self.config.base_url

    def list_url(self, resource: str) -> str:
        return f"{self.config.base_url}/2010-04-01/Accounts/{self.config.account_sid}/{resource}.json"

    def streams(self) -> list[Stream]:
        make = {
            "calls": lambda: TwilioIncremental(self, "calls", "Calls", CALLS, "start_time", "StartTime"),
            "messages": lambda: TwilioIncremental(self, "messages", "Messages", MESSAGES, "date_sent", "DateSent"),
            "recordings": lambda: TwilioIncremental(self, "recordings", "Recordings", RECORDINGS, "date_created",
                                                    "DateCreated"),
            "incoming_phone_numbers": lambda: IncomingPhoneNumbers(self),
            "pricing_phone_numbers": lambda: PricingPhoneNumbers(self),
        }
        return [make[name]() for name in STREAMS if name in self.config.streams]

    def parser(self, key: str, spec: Spec) -> PageParser:
        return PageParser(key, spec, self.name, self.when_retrieved, self.config.include_message_body)

    async def pages(self, url: str, params: dict[str, str] | None, parser: PageParser,
                    what: str) -> AsyncIterator[pa.RecordBatch]:
        """Every page of a v2010 list as raw batches (`parser.convert` shapes them), following the
        relative `next_page_uri` until it is null."""
        guard = PageGuard(self.name, what)
        next_url: str | None = url
        while next_url is not None:
            batch, next_uri = await self.http.get_parsed(next_url, parser, params=params)
            params = None  # the next page URI carries every parameter
            yield batch
            next_url = urljoin(self.config.base_url + "/", next_uri) if next_uri else None
            guard.check(next_url)


class TwilioIncremental(Stream):
    """calls / messages / recordings: merge on sid, bookmark = max cursor loaded, lookback re-read."""

    primary_key = ("sid",)
    disposition = "merge"

    def __init__(self, source: TwilioSource, name: str, resource: str, spec: Spec, cursor: str,
                 date_filter: str) -> None:
        self.source, self.name, self.resource, self.spec = source, name, resource, spec
        self.cursor_field, self.date_filter = cursor, date_filter
        self.parser = source.parser(name, spec)
        self.schema = self.parser.schema

    def windows(self, state: State | None, today: date) -> list[tuple[date, date | None]]:
        """[(from, to)] UTC days, `to` exclusive; the last window is open-ended (None)."""
        config = self.source.config
        bookmark = _bookmark(state)
        first = (bookmark - timedelta(days=config.lookback_days)).date() if bookmark else config.start_date
        windows: list[tuple[date, date | None]] = []
        while first + timedelta(days=config.window_days) <= today:
            windows.append((first, first + timedelta(days=config.window_days)))
            first += timedelta(days=config.window_days)
        windows.append((first, None))
        return windows

    def params(self, window: tuple[date, date | None]) -> dict[str, str]:
        params = {f"{self.date_filter}>": window[0].isoformat(), "PageSize": str(self.source.config.page_size)}
        if window[1] is not None:
            params[f"{self.date_filter}<"] = window[1].isoformat()
        return params

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        windows = self.windows(state, datetime.now(UTC).date())
        done = dict(state) if state else {}  # the state once every window so far is loaded
        ahead = max(1, min(len(windows), self.source.config.max_concurrency // 2 or 1))
        queues: list[asyncio.Queue[pa.RecordBatch | BaseException | None]] = []
        tasks: list[asyncio.Task[None]] = []
        url = self.source.list_url(self.resource)

        async def fetch(window: tuple[date, date | None], queue: asyncio.Queue[Any]) -> None:
            try:
                async for batch in self.source.pages(url, self.params(window), self.parser, self.name):
                    await queue.put(batch)
                await queue.put(None)
            except Exception as exc:  # handed to the reader, which raises it in order
                await queue.put(exc)

        def start(k: int) -> None:
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
            queues.append(queue)
            tasks.append(asyncio.create_task(fetch(windows[k], queue)))

        try:
            for k in range(ahead):
                start(k)
            best = _bookmark(state)
            every = self.source.config.checkpoint_rows
            since_commit = 0
            pending: list[pa.RecordBatch] = []  # raw pages, converted together in batches of ~BATCH_ROWS rows
            pending_rows = 0

            def convert() -> pa.RecordBatch:
                nonlocal best, pending, pending_rows
                batch = self.parser.convert(_combine(pending))
                pending, pending_rows = [], 0
                top = pc.max(batch.column(self.cursor_field)).as_py()
                if top is not None and (best is None or top > best):
                    best = top
                return batch

            for k in range(len(windows)):
                while (item := await queues[k].get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    if not item.num_rows:
                        continue
                    pending.append(item)
                    pending_rows += item.num_rows
                    since_commit += item.num_rows
                    if pending_rows >= BATCH_ROWS:
                        # A commit inside a window carries the bookmark of the windows completed before
                        # it: older rows of this window may still be to come.
                        checkpoint = dict(done) if since_commit >= every else None
                        if checkpoint is not None:
                            since_commit = 0
                        yield Batch(convert(), checkpoint)
                if k + ahead < len(windows):
                    start(k + ahead)
                batch = convert() if pending else None  # the window's last rows count for its bookmark
                if best is not None:
                    done = {**done, "bookmark": best.isoformat()}
                if since_commit >= every or k == len(windows) - 1:  # few, large transactions
                    yield Batch(batch, dict(done))
                    since_commit = 0
                elif batch is not None:
                    yield Batch(batch)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _combine(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _bookmark(state: State | None) -> datetime | None:
    if not state or not state.get("bookmark"):
        return None
    value = datetime.fromisoformat(state["bookmark"])
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class IncomingPhoneNumbers(Stream):
    name = "incoming_phone_numbers"
    primary_key = ("sid",)
    disposition = "replace"

    def __init__(self, source: TwilioSource) -> None:
        self.source = source
        self.parser = source.parser(self.name, NUMBERS)
        self.schema = self.parser.schema

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        params = {"PageSize": str(self.source.config.page_size)}
        async for batch in self.source.pages(self.source.list_url("IncomingPhoneNumbers"), params, self.parser,
                                             self.name):
            yield Batch(self.parser.convert(batch))
        yield Batch(None, {"retrieved_at": self.source.when_retrieved.isoformat()})


PRICING_SCHEMA = pa.schema([*meta_fields(), pa.field("country", S), pa.field("iso_country", S),
                            pa.field("price_unit", S), pa.field("number_type", S), pa.field("base_price", S),
                            pa.field("current_price", S)])


class PricingPhoneNumbers(Stream):
    """One row per country x number type, from every page of the countries list."""

    name = "pricing_phone_numbers"
    primary_key = ("iso_country", "number_type")
    disposition = "replace"
    schema = PRICING_SCHEMA

    def __init__(self, source: TwilioSource) -> None:
        self.source = source

    async def countries(self) -> list[str]:
        http = self.source.http
        guard = PageGuard(self.source.name, "pricing countries")
        url: str | None = f"{self.source.pricing_url}/v1/PhoneNumbers/Countries?PageSize=1000"
        isos: list[str] = []
        while url:
            page = await http.get_json(url)
            isos += [c["iso_country"] for c in page.get("countries") or []]
            url = (page.get("meta") or {}).get("next_page_url")
            guard.check(url)
        return isos

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        http = self.source.http
        isos = await self.countries()
        details = await asyncio.gather(
            *(http.get_json(f"{self.source.pricing_url}/v1/PhoneNumbers/Countries/{iso}") for iso in isos)
        )
        rows = [
            {"channel_name": self.source.name, "when_retrieved": self.source.when_retrieved,
             "country": d.get("country"), "iso_country": d.get("iso_country"), "price_unit": d.get("price_unit"),
             "number_type": p.get("number_type"), "base_price": _text(p.get("base_price")),
             "current_price": _text(p.get("current_price"))}
            for d in details for p in d.get("phone_number_prices") or []
        ]
        yield Batch(pa.RecordBatch.from_pylist(rows, schema=PRICING_SCHEMA))
        yield Batch(None, {"retrieved_at": self.source.when_retrieved.isoformat(), "countries": len(isos)})


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)
