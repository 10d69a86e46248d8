"""Twilio list pages -> Arrow: the column specs of each list and the page parser (no per-row Python).

A page is parsed by Arrow's JSON reader straight into columns (C++, without the GIL, so pages parse on
worker threads while the event loop reads the next ones). A page Arrow refuses (a value of an
undocumented JSON type, e.g. a number sent as a string) is parsed again with orjson and transposed in
C: one `itemgetter` call per record, one `zip` per page; records that lack some field are read with
one `dict.get` per value of the missing fields only. Joined pages are converted together: dates arrive in RFC 2822 and are decoded
vectorised from the string buffer, numeric strings are cast by Arrow, nulls stay null. Nested
objects (`encryption_details`) stay nested (structs; warehouses store them as JSON). A field the
spec does not list, or an unknown key of such an object, is reported once per stream and run (a
warning naming it), never dropped silently.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from datetime import datetime
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from floe.core.errors import SourceError
from floe.core.stream import MONEY

log = logging.getLogger("floe.sources.twilio")

RFC2822 = "%a, %d %b %Y %H:%M:%S %z"
TS = pa.timestamp("us", tz="UTC")
S, I64, B, M = pa.string(), pa.int64(), pa.bool_(), MONEY


# --- column specs: (name, raw JSON type, output type): every field of the spec's examples but NOT_LOADED ---
# raw type "ts" = an RFC 2822 string parsed to a UTC timestamp; "int" = a numeric string cast to int64;
# "money" = a decimal string ("-0.00750") cast to an exact decimal (MONEY);
# "obj" = an object, kept nested (a struct of the keys the spec's examples show; warehouses store JSON).
Spec = list[tuple[str, str, pa.DataType]]


def strings(*keys: str) -> pa.DataType:
    return pa.struct([(k, pa.string()) for k in keys])


# Read but not stored, as they follow from `account_sid` and `sid` (in every example of the spec):
# `uri` is /2010-04-01/Accounts/<account_sid>/<List>/<sid>.json and each `subresource_uris` link is
# `uri` without ".json" plus "/<Name>.json". About 1.1 KB a call; building them cost a fifth of the parse.
NOT_LOADED = frozenset({"uri", "subresource_uris"})

CALLS: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), ("parent_call_sid", "str", S), ("to", "str", S), ("from", "str", S),
    ("phone_number_sid", "str", S), ("status", "str", S), ("start_time", "ts", TS), ("end_time", "ts", TS),
    ("duration", "int", I64), ("price", "money", M), ("price_unit", "str", S), ("direction", "str", S),
    ("answered_by", "str", S), ("forwarded_from", "str", S), ("caller_name", "str", S), ("group_sid", "str", S),
    ("queue_time", "int", I64), ("trunk_sid", "str", S), ("to_formatted", "str", S), ("from_formatted", "str", S),
]
MESSAGES: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), ("date_sent", "ts", TS), ("to", "str", S), ("from", "str", S), ("body", "str", S),
    ("status", "str", S), ("price", "money", M), ("price_unit", "str", S), ("num_media", "int", I64),
    ("num_segments", "int", I64), ("direction", "str", S), ("error_code", "i64", I64), ("error_message", "str", S),
    ("messaging_service_sid", "str", S),
]
RECORDINGS: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), ("call_sid", "str", S), ("conference_sid", "str", S), ("start_time", "ts", TS),
    ("duration", "int", I64), ("price", "money", M), ("price_unit", "str", S), ("status", "str", S),
    ("channels", "i64", I64), ("source", "str", S), ("error_code", "i64", I64), ("media_url", "str", S),
    ("encryption_details", "obj", strings("encryption_public_key_sid", "encryption_cek", "encryption_iv")),
]
_NUMBER_STR = ["friendly_name", "phone_number", "origin", "status", "address_requirements", "voice_url",
               "voice_method", "voice_fallback_url", "voice_fallback_method", "voice_application_sid",
               "voice_receive_mode", "sms_url", "sms_method", "sms_fallback_url", "sms_fallback_method",
               "sms_application_sid", "status_callback", "status_callback_method", "trunk_sid", "emergency_status",
               "address_sid", "identity_sid", "bundle_sid", "emergency_address_sid", "emergency_address_status",
               "type"]
NUMBERS: Spec = [
    ("sid", "str", S), ("account_sid", "str", S), ("api_version", "str", S), ("date_created", "ts", TS),
    ("date_updated", "ts", TS), *[(n, "str", S) for n in _NUMBER_STR], ("beta", "bool", B),
    ("voice_caller_id_lookup", "bool", B), ("capabilities", "caps", B),
]
CAPABILITIES = ("voice", "sms", "mms", "fax")
_RAW = {"str": S, "ts": S, "int": S, "money": S, "i64": I64, "bool": B,
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
        self.known = frozenset(name for name, _, _ in spec) | NOT_LOADED
        self.reported: set[str] = set()  # unknown fields already warned about
        self.raw_schema = pa.schema([(name, out if raw == "obj" else _RAW[raw]) for name, raw, out in spec])
        self.nested = [(j, name, frozenset(f.name for f in out)) for j, (name, raw, out) in enumerate(spec)
                       if raw == "obj"]
        self.names = [name for name, _, _ in spec]
        self.sparse: set[str] = set()  # fields some record lacked: read with dict.get on the Python path
        self.schema = output_schema(spec, set() if keep_body else {"body"})
        self.channel = pa.scalar(channel, S)
        self.when = pa.scalar(when, TS)
        page_type = pa.schema([(key, pa.list_(pa.struct(list(self.raw_schema)))), ("next_page_uri", S)])
        # "infer": fields floe does not know are parsed too, so that they can be reported
        self.json_options = pj.ParseOptions(explicit_schema=page_type, unexpected_field_behavior="infer")

    def __call__(self, body: bytes) -> tuple[pa.RecordBatch, str | None]:
        """Thread-safe: pages may be parsed on several threads at once."""
        try:
            return self._read_arrow(body)
        except pa.ArrowInvalid:  # undocumented JSON types, a truncated body...: the lenient path decides
            return self._read_python(body)

    def _read_arrow(self, body: bytes) -> tuple[pa.RecordBatch, str | None]:
        table = pj.read_json(pa.BufferReader(body), parse_options=self.json_options,
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(body) + 1))
        if table.num_rows != 1:
            raise pa.ArrowInvalid("a Twilio list page must be one JSON object")
        items = table.column(self.key).combine_chunks()
        records = items.flatten() if items.null_count == 0 else pa.array([], items.type.value_type)
        if records.null_count:
            raise pa.ArrowInvalid("a record is null")
        unknown = {f.name for f in records.type} - self.known
        columns = []
        for name, f in zip(self.names, self.raw_schema, strict=True):
            column = records.field(name)
            if column.type != f.type:  # an object with keys floe does not know: keep the known ones
                unknown |= {f"{name}.{key}" for key in set(column.type.names) - set(f.type.names)}
                column = pa.StructArray.from_arrays([column.field(c.name) for c in f.type], fields=list(f.type),
                                                    mask=column.is_null())
            columns.append(column)
        self._report(unknown)
        next_uri = table.column("next_page_uri")[0].as_py()
        return pa.RecordBatch.from_arrays(columns, schema=self.raw_schema), next_uri

    def _read_python(self, body: bytes) -> tuple[pa.RecordBatch, str | None]:
        # The page's dicts and tuples are acyclic and freed by reference counting; without this the
        # cyclic GC runs several times a page (about a fifth of the parse time) and finds nothing.
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            page = orjson.loads(body)  # a truncated body raises a ValueError: the HTTP layer fetches it again
            if not isinstance(page, dict):
                raise ValueError("a Twilio list page must be a JSON object")
            items = page.get(self.key) or []
            values = self._transpose(items)
            if items:
                self._report_unknown(items, values)
            columns = [self._column(v, raw, f.type)
                       for v, (_, raw, _), f in zip(values, self.spec, self.raw_schema, strict=True)]
            next_uri = page.get("next_page_uri")
            del page, items, values
        finally:
            if gc_enabled:
                gc.enable()
        return pa.RecordBatch.from_arrays(columns, schema=self.raw_schema), next_uri

    def _transpose(self, items: list[Any]) -> list[Sequence[Any]]:
        """The records' values, column by column, in C: one itemgetter call per record and one zip for
        the page over the fields every record has had so far; one dict.get per value for the others."""
        if not items:
            return [() for _ in self.spec]
        by_name: dict[str, Sequence[Any]] = {}
        while len(self.names) - len(self.sparse) > 1:
            dense = [name for name in self.names if name not in self.sparse]
            try:
                by_name = dict(zip(dense, zip(*map(itemgetter(*dense), items), strict=True), strict=True))
                break
            except KeyError as missing:  # remembered for the rest of the run
                self.sparse.add(missing.args[0])
        for name in self.names if not by_name else self.sparse:
            by_name[name] = list(map(methodcaller("get", name), items))
        return [by_name[name] for name in self.names]

    def parse(self, body: bytes) -> tuple[pa.RecordBatch, str | None]:
        """One page straight to the output shape."""
        raw, next_uri = self(body)
        return self.convert(raw), next_uri

    def _report_unknown(self, items: list[Any], values: list[Sequence[Any]]) -> None:
        """Warn (once per field) about fields, or keys of nested objects, that floe does not load.
        One record (object) of each size is looked at (`dict(zip(...))` runs in C): a field that only
        some records carry makes them a different size."""
        def one_of_each_size(objects: Any) -> Any:
            return dict(zip(map(len, objects), objects, strict=True)).values()

        unknown = set().union(*one_of_each_size(items)) - self.known
        for j, name, keys in self.nested:
            objects = [v for v in values[j] if isinstance(v, dict)]
            unknown |= {f"{name}.{key}" for key in set().union(*one_of_each_size(objects)) - keys}
        self._report(unknown)

    def _report(self, unknown: set[str]) -> None:
        new = sorted(unknown - self.reported)
        if new:
            self.reported.update(new)
            log.warning("event=unknown_fields stream=%s fields=%s: Twilio sent fields floe does not load",
                        self.key, ",".join(new))

    @staticmethod
    def _column(values: Sequence[Any], raw: str, type_: pa.DataType) -> pa.Array:
        """One column of the page, converted by Arrow in one call (values of unexpected types: slow path)."""
        try:
            return pa.array(values, type=type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array([_lenient(v, raw) for v in values], type=type_)

    def convert_pages(self, raws: list[pa.RecordBatch]) -> pa.RecordBatch:
        """Raw batches of several pages, joined, in the output shape (joining copies every column:
        done here, on a parse thread, rather than on the event loop)."""
        return self.convert(combine(raws))

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
            elif kind == "money":
                columns.append(to_money(col, name))
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
    if raw in ("str", "ts", "int", "money"):
        return orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
    if raw == "i64":
        text = str(value).strip()
        return int(text) if text.lstrip("-").isdigit() else None
    if raw == "bool":
        return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
    if isinstance(value, dict):  # "caps" (booleans) or "obj" (strings)
        return {k: _lenient(v, "bool" if raw == "caps" else "str") for k, v in value.items()}
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


def to_money(col: pa.Array, name: str) -> pa.Array:
    """Decimal strings ("-0.00750", "", null) -> MONEY, exactly; "" becomes null. A value MONEY cannot
    hold exactly (more than six decimal places, or not a number) is an error naming it."""
    cleaned = pc.utf8_trim_whitespace(col)
    cleaned = pc.if_else(pc.equal(cleaned, ""), pa.scalar(None, S), cleaned)
    try:
        return pc.cast(cleaned, MONEY)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for value in cleaned.to_pylist():  # the error path only: find the value to name
            try:
                pc.cast(pa.array([value], S), MONEY)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise SourceError(f"Twilio field {name}: {value!r} is not an amount floe can keep exactly "
                                  f"(at most {MONEY.precision - MONEY.scale} integer digits and "
                                  f"{MONEY.scale} decimal places)") from None
        raise


def combine(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]

