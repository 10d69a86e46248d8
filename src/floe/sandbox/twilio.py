"""A local Twilio emulator: REST API 2010-04-01 lists and Pricing v1 phone-number countries.

Faithful to the facts in shared/reference/twilio_singular.md §2: Basic auth AccountSid:AuthToken,
the flat v2010 envelope with a relative `next_page_uri` (`PageSize` 1..1000, default 50, `Page`,
`PageToken`), newest first, date filters (`StartTime>=`, `StartTime<=`, `StartTime=`; `DateSent…`;
`DateCreated…`; dates `YYYY-MM-DD` UTC, `>=` from midnight on, `<=` before midnight), RFC 2822
dates, string durations/prices, Twilio error bodies (401 code 20003, 404 code 20404, 429 code
20429), and the Pricing v1 `meta` envelope with absolute `next_page_url`.

Data is a pure function of (seed, size, days, end): record `i` of a list is generated on demand,
times increase with `i`, so a date filter is a binary search and a page is a slice. Rendered JSON
is cached per chunk of records, so serving a million records costs one render. Records change
after the fact: calls and messages in the last hour before `end` are still in progress (no price,
no end time); `settle()` (or `POST /_sandbox/twilio/{sid}/{kind}/settle?last=N`) completes them,
`add()` (or `.../add?count=N`) appends newer records.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from floe.sandbox.faults import FaultMiddleware, Faults

M64 = (1 << 64) - 1
CHUNK = 1000
API_VERSION = "2010-04-01"
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def mix(x: int) -> int:
    """splitmix64: a cheap, well-spread hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


_day_prefix: dict[int, str] = {}


def rfc2822(ts: int | None) -> str | None:
    """Epoch seconds -> Twilio's RFC 2822 form, e.g. 'Fri, 18 Oct 2019 17:00:00 +0000'."""
    if ts is None:
        return None
    day, sec = divmod(ts, 86400)
    prefix = _day_prefix.get(day)
    if prefix is None:
        d = datetime.fromtimestamp(day * 86400, UTC)
        prefix = _day_prefix[day] = f"{_DAY_NAMES[d.weekday()]}, {d.day:02d} {_MONTHS[d.month - 1]} {d.year} "
    h, rem = divmod(sec, 3600)
    return f"{prefix}{h:02d}:{rem // 60:02d}:{rem % 60:02d} +0000"


def parse_day(value: str) -> int:
    """'YYYY-MM-DD' (or an ISO date-time) -> epoch seconds of that UTC midnight (or instant)."""
    text = value.strip()
    if len(text) == 10:
        return int(datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())


def _phone(h: int) -> str:
    return f"+1{415 + h % 300}555{(h >> 12) % 10000:04d}"


def _sid(prefix: str, h: int, i: int) -> str:
    return f"{prefix}{h & 0xFFFFFFFFFFFF:012x}{i:020x}"


CALL_STATUSES = ("completed",) * 14 + ("busy", "failed", "no-answer", "canceled")
CALL_DIRECTIONS = ("inbound", "outbound-api", "outbound-api", "outbound-dial")
MSG_STATUSES = ("delivered",) * 10 + ("sent", "received", "undelivered", "failed")
MSG_DIRECTIONS = ("inbound", "outbound-api", "outbound-api", "outbound-reply")
BODIES = ("Your code is 123456", "See you at 5?", "Order #8812 has shipped", "Zoë says héllo 👋",
          "Reply STOP to unsubscribe", "", "ok")
CALLER_NAMES = (None, None, None, "JANE DOE", "Zoë Ångström", "ACME CORP")


@dataclass
class ListResource:
    """One list (Calls, Messages, Recordings, IncomingPhoneNumbers) of one account."""

    kind: str  # calls | messages | recordings | incoming_phone_numbers
    account_sid: str
    seed: int
    base_count: int
    start: int  # epoch seconds of the first record
    end: int  # epoch seconds: records after end - 3600 are still in progress until settled
    count: int = 0
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    cache: dict[int, tuple[bytes, list[int]]] = field(default_factory=dict)
    cache_chunks: int = 2000

    def __post_init__(self) -> None:
        self.count = self.base_count
        self.step = max(1, (self.end - self.start) // max(1, self.base_count))
        self.salt = mix(self.seed * 7919 + hash_kind(self.kind))

    # --- time axis (monotone in i) --------------------------------------------------------
    def time(self, i: int) -> int:
        return self.start + i * self.step + mix(self.salt ^ i) % self.step

    def first_at_or_after(self, ts: int) -> int:
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time(mid) < ts:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # --- records --------------------------------------------------------------------------
    def record(self, i: int) -> dict[str, Any]:
        h = mix(self.salt + i)
        t = self.time(i)
        rec = getattr(self, f"_{self.kind}")(i, h, t, settled=t <= self.end - 3600)
        extra = self.overrides.get(i)
        if extra:
            rec.update(extra)
        return rec

    def sid(self, i: int) -> str:
        prefix = {"calls": "CA", "messages": "SM", "recordings": "RE", "incoming_phone_numbers": "PN"}[self.kind]
        return _sid(prefix, mix(self.salt + i), i)

    def index_of(self, sid: str) -> int | None:
        try:
            i = int(sid[14:], 16)
        except ValueError:
            return None
        return i if 0 <= i < self.count and self.sid(i) == sid else None

    def _uri(self, name: str, sid: str) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/{name}/{sid}.json"

    def _calls(self, i: int, h: int, t: int, settled: bool) -> dict[str, Any]:
        sid = _sid("CA", h, i)
        direction = CALL_DIRECTIONS[(h >> 5) % 4]
        status = CALL_STATUSES[(h >> 9) % len(CALL_STATUSES)] if settled else "in-progress"
        answered = status == "completed"
        duration = (h >> 14) % 900 + 1 if answered else 0
        to, frm = _phone(h >> 20), _phone(h >> 34)
        return {
            "sid": sid, "date_created": rfc2822(t - 2), "date_updated": rfc2822(t + duration + 1 if settled else t),
            "parent_call_sid": _sid("CA", h >> 3, i + 1) if direction == "outbound-dial" else None,
            "account_sid": self.account_sid, "to": to, "to_formatted": to, "from": frm, "from_formatted": frm,
            "phone_number_sid": _sid("PN", h >> 7, (h >> 40) % 50), "status": status,
            "start_time": rfc2822(t), "end_time": rfc2822(t + duration) if settled else None,
            "duration": str(duration) if settled else None,
            "price": f"-{((h >> 24) % 400 + 1) / 1000:.5f}" if settled and answered else None,
            "price_unit": "USD", "direction": direction,
            "answered_by": ("human", "machine_start", None, None)[(h >> 44) % 4] if answered else None,
            "api_version": API_VERSION, "forwarded_from": _phone(h >> 50) if (h >> 48) % 16 == 0 else None,
            "group_sid": None, "caller_name": CALLER_NAMES[(h >> 52) % len(CALLER_NAMES)],
            "queue_time": str((h >> 56) % 30), "trunk_sid": None, "uri": self._uri("Calls", sid),
            "subresource_uris": {"recordings": self._uri("Calls", sid)[:-5] + "/Recordings.json"},
        }

    def _messages(self, i: int, h: int, t: int, settled: bool) -> dict[str, Any]:
        sid = _sid("SM", h, i)
        direction = MSG_DIRECTIONS[(h >> 5) % 4]
        status = MSG_STATUSES[(h >> 9) % len(MSG_STATUSES)] if settled else "sent"
        body = BODIES[(h >> 14) % len(BODIES)]
        failed = status in ("failed", "undelivered")
        return {
            "body": body, "num_segments": str(1 + len(body) // 160), "direction": direction,
            "from": _phone(h >> 20), "to": _phone(h >> 34), "date_updated": rfc2822(t + (5 if settled else 0)),
            "price": f"-{((h >> 24) % 90 + 1) / 10000:.5f}" if settled else None,
            "error_message": "Unknown destination handset" if failed else None,
            "uri": self._uri("Messages", sid), "account_sid": self.account_sid,
            "num_media": str((h >> 44) % 3 if (h >> 46) % 8 == 0 else 0), "status": status,
            "messaging_service_sid": None, "sid": sid, "date_sent": rfc2822(t), "date_created": rfc2822(t - 1),
            "error_code": 30006 if failed else None, "price_unit": "USD", "api_version": API_VERSION,
            "subresource_uris": {"media": self._uri("Messages", sid)[:-5] + "/Media.json"},
        }

    def _recordings(self, i: int, h: int, t: int, settled: bool) -> dict[str, Any]:
        sid = _sid("RE", h, i)
        duration = (h >> 14) % 600 + 1
        return {
            "account_sid": self.account_sid, "api_version": API_VERSION, "call_sid": _sid("CA", h >> 3, i),
            "conference_sid": None, "date_created": rfc2822(t), "date_updated": rfc2822(t + duration + 3),
            "start_time": rfc2822(t - duration), "duration": str(duration), "sid": sid,
            "price": f"-{((h >> 24) % 50 + 1) / 1000:.4f}" if settled else None, "price_unit": "USD",
            "status": "completed" if settled else "processing", "channels": 1 + (h >> 30) % 2,
            "source": ("DialVerb", "RecordVerb", "OutboundAPI", "StartCallRecordingAPI")[(h >> 33) % 4],
            "error_code": None, "uri": self._uri("Recordings", sid), "encryption_details": None,
            "subresource_uris": {}, "media_url": f"https://api.twilio.com{self._uri('Recordings', sid)[:-5]}",
        }

    def _incoming_phone_numbers(self, i: int, h: int, t: int, settled: bool) -> dict[str, Any]:
        sid = _sid("PN", h, i)
        number = _phone(h >> 8)
        return {
            "account_sid": self.account_sid, "address_requirements": ("none", "any", "local")[h % 3],
            "address_sid": None, "api_version": API_VERSION, "beta": False,
            "capabilities": {"voice": True, "sms": True, "mms": (h >> 3) % 2 == 0, "fax": False},
            "date_created": rfc2822(t), "date_updated": rfc2822(t + 86400), "emergency_status": "Inactive",
            "friendly_name": f"({number[2:5]}) {number[5:8]}-{number[8:]}", "identity_sid": None,
            "origin": "twilio", "phone_number": number, "sid": sid, "sms_application_sid": None,
            "sms_fallback_method": "POST", "sms_fallback_url": None, "sms_method": "POST",
            "sms_url": f"https://example.com/sms/{i}", "status_callback": None, "status_callback_method": "POST",
            "trunk_sid": None, "uri": self._uri("IncomingPhoneNumbers", sid), "voice_receive_mode": "voice",
            "voice_application_sid": None, "voice_caller_id_lookup": (h >> 5) % 2 == 0,
            "voice_fallback_method": "POST", "voice_fallback_url": None, "voice_method": "POST",
            "voice_url": f"https://example.com/voice/{i}", "status": "in-use", "type": "local",
        }

    # --- rendering with a chunk cache -----------------------------------------------------------
    # A chunk is CHUNK consecutive records rendered newest first into ONE bytes object plus the start
    # offset of each record, so a page is one or two slices. (Keeping orjson's per-record bytes alive
    # instead costs ~8x the JSON size in memory.)
    def chunk(self, c: int) -> tuple[bytes, list[int]]:
        cached = self.cache.get(c)
        if cached is None:
            first, last = c * CHUNK, min(self.count, (c + 1) * CHUNK)
            encoded = [orjson.dumps(self.record(j)) for j in range(last - 1, first - 1, -1)]
            starts, pos = [], 0
            for item in encoded:
                starts.append(pos)
                pos += len(item) + 1
            starts.append(pos)
            cached = (b",".join(encoded), starts)
            if len(self.cache) >= self.cache_chunks:
                self.cache.pop(next(iter(self.cache)))
            self.cache[c] = cached
        return cached

    def page_items(self, hi: int, lo: int) -> bytes:
        """JSON array text of records hi-1 down to lo (newest first)."""
        parts: list[bytes] = []
        i = hi - 1
        while i >= lo:
            c = i // CHUNK
            blob, starts = self.chunk(c)
            last = min(self.count, (c + 1) * CHUNK) - 1  # the chunk's newest index, at position 0
            first = max(lo, c * CHUNK)
            parts.append(blob[starts[last - i]: starts[last - first + 1] - 1])
            i = first - 1
        return b"[" + b",".join(parts) + b"]"

    def prerender(self) -> None:
        for c in range(0, (self.count + CHUNK - 1) // CHUNK):
            self.chunk(c)

    # --- changes after the fact -------------------------------------------------------------------
    def _invalidate(self, i: int) -> None:
        self.cache.pop(i // CHUNK, None)

    def update(self, i: int, **fields_: Any) -> None:
        self.overrides.setdefault(i, {}).update(fields_)
        self._invalidate(i)

    def settle(self, last: int, now: int | None = None) -> list[int]:
        """Complete the newest `last` records still in progress (status, price, duration, end time change)."""
        changed = []
        now = now or self.end + 7200
        for i in range(max(0, self.count - last), self.count):
            rec = self.record(i)
            if self.kind == "calls" and rec["status"] == "in-progress":
                h = mix(self.salt + i)
                duration = (h >> 14) % 900 + 1
                t = self.time(i)
                self.update(i, status="completed", duration=str(duration), end_time=rfc2822(t + duration),
                            price=f"-{((h >> 24) % 400 + 1) / 1000:.5f}", date_updated=rfc2822(now))
                changed.append(i)
            elif self.kind in ("messages", "recordings") and rec["price"] is None:
                h = mix(self.salt + i)
                status = "delivered" if self.kind == "messages" else "completed"
                self.update(i, status=status, price=f"-{((h >> 24) % 90 + 1) / 10000:.5f}",
                            date_updated=rfc2822(now))
                changed.append(i)
        return changed

    def add(self, count: int) -> None:
        """Append `count` newer records (times continue after the newest one)."""
        self._invalidate(self.count - 1)
        self.count += count


def hash_kind(kind: str) -> int:
    return int.from_bytes(hashlib.blake2b(kind.encode(), digest_size=8).digest(), "big")


KINDS = {  # URL name -> (kind, items key, date filter parameter)
    "Calls": ("calls", "calls", "StartTime"),
    "Messages": ("messages", "messages", "DateSent"),
    "Recordings": ("recordings", "recordings", "DateCreated"),
    "IncomingPhoneNumbers": ("incoming_phone_numbers", "incoming_phone_numbers", None),
}


@dataclass
class Account:
    sid: str
    token: str
    lists: dict[str, ListResource]


COUNTRIES = [
    ("AR", "Argentina"), ("AT", "Austria"), ("AU", "Australia"), ("BE", "Belgium"), ("BG", "Bulgaria"),
    ("BR", "Brazil"), ("CA", "Canada"), ("CH", "Switzerland"), ("CL", "Chile"), ("CO", "Colombia"),
    ("CY", "Cyprus"), ("CZ", "Czech Republic"), ("DE", "Germany"), ("DK", "Denmark"), ("EE", "Estonia"),
    ("ES", "Spain"), ("FI", "Finland"), ("FR", "France"), ("GB", "United Kingdom"), ("GR", "Greece"),
    ("HK", "Hong Kong"), ("HR", "Croatia"), ("HU", "Hungary"), ("ID", "Indonesia"), ("IE", "Ireland"),
    ("IL", "Israel"), ("IN", "India"), ("IS", "Iceland"), ("IT", "Italy"), ("JP", "Japan"),
    ("KE", "Kenya"), ("KR", "Korea, Republic of"), ("LT", "Lithuania"), ("LU", "Luxembourg"), ("LV", "Latvia"),
    ("MT", "Malta"), ("MX", "Mexico"), ("MY", "Malaysia"), ("NL", "Netherlands"), ("NO", "Norway"),
    ("NZ", "New Zealand"), ("PA", "Panama"), ("PE", "Peru"), ("PH", "Philippines"), ("PL", "Poland"),
    ("PR", "Puerto Rico"), ("PT", "Portugal"), ("RO", "Romania"), ("SE", "Sweden"), ("SG", "Singapore"),
    ("SI", "Slovenia"), ("SK", "Slovakia"), ("TH", "Thailand"), ("TN", "Tunisia"), ("US", "United States"),
    ("ZA", "South Africa"), ("CI", "Côte d'Ivoire"),
]
NUMBER_TYPES = ("local", "mobile", "national", "toll free")


def country_prices(seed: int, iso: str) -> list[dict[str, str]]:
    h = mix(seed * 31 + hash_kind(iso))
    prices = []
    for n, number_type in enumerate(NUMBER_TYPES):
        if n == 0 or (h >> (n * 3)) % 3:
            base = ((h >> (n * 8 + 12)) % 2000 + 50) / 100
            current = base if (h >> (n + 40)) % 4 else round(base * 0.8, 2)
            prices.append({"number_type": number_type, "base_price": f"{base:.2f}",
                           "current_price": f"{current:.2f}"})
    return prices


class TwilioSandbox:
    """The emulator's state: accounts with their lists, the pricing catalogue, request statistics."""

    def __init__(self, seed: int = 1, size: int = 1000, days: int = 30, end: str | None = None,
                 accounts: int = 1, numbers: int | None = None, cache_chunks: int = 2000) -> None:
        end_dt = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else (
            datetime.now(UTC).replace(minute=0, second=0, microsecond=0))
        if end_dt.tzinfo is None:
            end_dt = end_dt.replace(tzinfo=UTC)
        self.seed = seed
        self.end = int(end_dt.timestamp())
        self.start = int((end_dt - timedelta(days=days)).timestamp())
        self.lock = threading.Lock()
        self.accounts: dict[str, Account] = {}
        self.served: Counter[str] = Counter()  # "<account>/<kind>" -> records served
        self.requests: list[dict[str, Any]] = []  # recent list requests: account, kind, params, records
        counts = {"calls": size, "messages": size, "recordings": max(1, size // 2),
                  "incoming_phone_numbers": numbers if numbers is not None else max(3, min(120, size // 50))}
        for k in range(accounts):
            digest = hashlib.sha256(f"twilio-sandbox:{seed}:{k}".encode()).hexdigest()
            sid, token = "AC" + digest[:32], digest[32:64]
            lists = {kind: ListResource(kind, sid, seed * 1000 + k, n, self.start, self.end, cache_chunks=cache_chunks)
                     for kind, n in counts.items()}
            self.accounts[sid] = Account(sid, token, lists)

    def credentials(self) -> list[tuple[str, str]]:
        return [(a.sid, a.token) for a in self.accounts.values()]

    def list(self, account: str, kind: str) -> ListResource:
        return self.accounts[account].lists[kind]

    def reset_stats(self) -> None:
        self.served.clear()
        self.requests.clear()


def twilio_error(status: int, message: str | None = None, code: int | None = None) -> dict[str, Any]:
    defaults = {
        400: (20001, "Invalid parameter"), 401: (20003, "Authenticate"), 404: (20404, "The requested resource was not found"),
        429: (20429, "Too Many Requests"), 500: (20500, "An internal server error has occurred"),
    }
    default_code, default_message = defaults.get(status, (20500, "An internal server error has occurred"))
    code = code or default_code
    body: dict[str, Any] = {"code": code, "message": message or default_message,
                            "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}
    if status == 401:
        body["detail"] = "Your AccountSid or AuthToken was incorrect."
    return body


def _error(status: int, message: str | None = None) -> Response:
    return Response(orjson.dumps(twilio_error(status, message)), status, media_type="application/json")


def _json(document: Any) -> Response:
    return Response(orjson.dumps(document), media_type="application/json")


def _paging(q: Any) -> tuple[int, int] | Response:
    """(PageSize, Page) from a list request, or Twilio's 400 for values it refuses."""
    try:
        page_size, page = int(q.get("PageSize", "50")), int(q.get("Page", "0"))
    except ValueError:
        return _error(400, "PageSize and Page must be integers")
    if not 1 <= page_size <= 1000:
        return _error(400, "PageSize must be between 1 and 1000")
    if page < 0:
        return _error(400, "Page must be 0 or more")
    return page_size, page


def create_app(seed: int = 1, size: int = 1000, days: int = 30, end: str | None = None, accounts: int = 1,
               numbers: int | None = None, rate_429: float = 0.0, rate_5xx: float = 0.0, latency: float = 0.0,
               truncate_rate: float = 0.0, retry_after: float = 1.0, prerender: bool = False,
               cache_chunks: int = 2000) -> Any:
    """The Twilio emulator as an ASGI app. `app.state.twilio` is the `TwilioSandbox`, `app.state.faults` the knobs."""
    sandbox = TwilioSandbox(seed, size, days, end, accounts, numbers, cache_chunks)
    faults = Faults(rate_429, rate_5xx, truncate_rate, latency, retry_after, seed)
    if prerender:
        for account in sandbox.accounts.values():
            account.lists["calls"].prerender()

    def authenticate(request: Request) -> Account | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        account = sandbox.accounts.get(user)
        return account if account is not None and account.token == password else None

    async def list_resource(request: Request) -> Response:
        caller = authenticate(request)
        if caller is None:
            return _error(401)
        sid, name = request.path_params["sid"], request.path_params["resource"]
        if name not in KINDS or sid != caller.sid:
            return _error(404, f"The requested resource {request.url.path} was not found")
        kind, key, date_param = KINDS[name]
        q = request.query_params
        paging = _paging(q)
        if isinstance(paging, Response):
            return paging
        page_size, page = paging
        with sandbox.lock:
            lst = caller.lists[kind]
            lo, hi = 0, lst.count
            try:
                if date_param:
                    if (v := q.get(date_param + ">")) is not None:
                        lo = max(lo, lst.first_at_or_after(parse_day(v)))
                    if (v := q.get(date_param + "<")) is not None:
                        hi = min(hi, lst.first_at_or_after(parse_day(v)))
                    if (v := q.get(date_param)) is not None:
                        day = parse_day(v)
                        lo = max(lo, lst.first_at_or_after(day))
                        hi = min(hi, lst.first_at_or_after(day + 86400))
            except ValueError:
                return _error(400, f"Invalid {date_param} filter: dates are YYYY-MM-DD")
            top = hi  # exclusive upper index of this page (newest first)
            token = q.get("PageToken")
            if token:
                last = lst.index_of(token[2:]) if token.startswith("PA") else None
                if last is None:
                    return _error(400, "Invalid PageToken")
                top = min(hi, last)
            else:
                top = hi - page * page_size
            bottom = max(lo, top - page_size)
            items = lst.page_items(top, bottom) if top > bottom else b"[]"
            n = max(0, top - bottom)
            more = bottom > lo
            next_token = "PA" + lst.sid(bottom) if more else None
            sandbox.served[f"{caller.sid}/{kind}"] += n
            if len(sandbox.requests) < 100_000:
                sandbox.requests.append({"account": caller.sid, "kind": kind, "params": dict(q), "records": n})
        filters = [(k, v) for k, v in q.multi_items() if k not in ("PageSize", "Page", "PageToken")]
        path = request.url.path

        def uri(page_no: int, tok: str | None) -> str:
            params = [*filters, ("PageSize", str(page_size)), ("Page", str(page_no))]
            if tok:
                params.append(("PageToken", tok))
            return f"{path}?{urlencode(params)}"

        start = page * page_size
        envelope = orjson.dumps({
            "end": start + max(0, n - 1), "first_page_uri": uri(0, None),
            "next_page_uri": uri(page + 1, next_token) if more else None, "page": page,
            "page_size": page_size, "previous_page_uri": uri(page - 1, "PB" + lst.sid(top - 1)) if page > 0 and n else None,
            "start": start, "uri": uri(page, token),
        })
        body = b'{"' + key.encode() + b'":' + items + b"," + envelope[1:]
        return Response(body, media_type="application/json")

    async def countries(request: Request) -> Response:
        if authenticate(request) is None:
            return _error(401)
        q = request.query_params
        paging = _paging(q)
        if isinstance(paging, Response):
            return paging
        page_size, page = paging
        base = str(request.base_url).rstrip("/") + "/v1/PhoneNumbers/Countries"
        rows = COUNTRIES[page * page_size:(page + 1) * page_size]

        def url(p: int) -> str:
            return f"{base}?PageSize={page_size}&Page={p}" + (f"&PageToken=PA{COUNTRIES[p * page_size][0]}" if p else "")

        more = (page + 1) * page_size < len(COUNTRIES)
        return _json({
            "countries": [{"country": name, "iso_country": iso, "url": f"{base}/{iso}"} for iso, name in rows],
            "meta": {"page": page, "page_size": page_size, "first_page_url": url(0),
                     "previous_page_url": url(page - 1) if page else None, "url": url(page),
                     "next_page_url": url(page + 1) if more else None, "key": "countries"},
        })

    async def country(request: Request) -> Response:
        if authenticate(request) is None:
            return _error(401)
        iso = request.path_params["iso"].upper()
        names = dict(COUNTRIES)
        if iso not in names:
            return _error(404, f"The requested resource {request.url.path} was not found")
        return _json({"country": names[iso], "iso_country": iso, "phone_number_prices": country_prices(seed, iso),
                      "price_unit": "USD", "url": f"{str(request.base_url).rstrip('/')}/v1/PhoneNumbers/Countries/{iso}"})

    async def control(request: Request) -> Response:
        action = request.path_params["action"]
        sid, kind = request.path_params["sid"], request.path_params["kind"]
        if sid not in sandbox.accounts or kind not in sandbox.accounts[sid].lists:
            return JSONResponse({"error": "unknown account or list"}, 404)
        lst = sandbox.list(sid, kind)
        with sandbox.lock:
            if action == "add":
                lst.add(int(request.query_params.get("count", "10")))
                return JSONResponse({"count": lst.count})
            if action == "settle":
                changed = lst.settle(int(request.query_params.get("last", "100")))
                return JSONResponse({"settled": [lst.sid(i) for i in changed]})
        return JSONResponse({"error": f"unknown action {action}"}, 404)

    async def prerender_pages(request: Request) -> Response:
        """Render (and cache) every call page now, so a benchmark measures the client, not the emulator."""
        with sandbox.lock:
            for account in sandbox.accounts.values():
                account.lists[request.query_params.get("kind", "calls")].prerender()
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> Response:
        return JSONResponse({"served": dict(sandbox.served), "requests": len(sandbox.requests)})

    app = Starlette(routes=[
        Route(f"/{API_VERSION}/Accounts/{{sid}}/{{resource}}.json", list_resource),
        Route("/v1/PhoneNumbers/Countries", countries),
        Route("/v1/PhoneNumbers/Countries/{iso}", country),
        Route("/_sandbox/twilio/prerender", prerender_pages, methods=["POST"]),
        Route("/_sandbox/twilio/{sid}/{kind}/{action}", control, methods=["POST"]),
        Route("/_sandbox/stats", stats),
    ])
    wrapped = FaultMiddleware(app, faults, lambda status: twilio_error(status))
    wrapped.state = app.state  # type: ignore[attr-defined]
    app.state.twilio = sandbox
    app.state.faults = faults
    return wrapped


def describe(app: Any, url: str) -> dict[str, Any]:
    """Credentials and floe.yml source entries for a running Twilio emulator."""
    sandbox: TwilioSandbox = app.state.twilio
    start_date = datetime.fromtimestamp(sandbox.start, UTC).date().isoformat()
    sources: dict[str, Any] = {}
    credentials: dict[str, str] = {"base_url": url, "pricing_url": url}
    for k, (sid, token) in enumerate(sandbox.credentials()):
        name = "twilio" if k == 0 else f"twilio_{k + 1}"
        credentials[f"{name} account_sid"] = sid
        credentials[f"{name} auth_token"] = token
        sources[name] = {"type": "twilio", "account_sid": sid, "auth_token": token, "start_date": start_date,
                         "base_url": url}
    return {"credentials": credentials, "sources": sources}
