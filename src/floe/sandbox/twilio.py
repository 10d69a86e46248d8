"""A local Twilio emulator: REST API 2010-04-01 lists and Pricing v1 phone-number countries.

Faithful to the facts in shared/reference/twilio_singular.md §2 and Twilio's OpenAPI examples:
Basic auth AccountSid:AuthToken, the flat v2010 envelope with a relative `next_page_uri`
(`PageSize` 1..1000, default 50, `Page`, `PageToken`), newest first, RFC 2822 dates, string
durations/prices, Twilio error bodies (400 code 20001, 401 code 20003, 403 code 20403 for a
suspended account (`refuse_after`), 404 code 20404, 429 code 20429 without `Retry-After`), and the
Pricing v1 `meta` envelope with absolute `next_page_url`.

Filters: `StartTime`/`EndTime` (Calls), `DateSent` (Messages), `DateCreated` (Recordings), each as
`X=day`, `X>=from` and `X<=to`, with a `YYYY-MM-DD` day or a date-time in the spellings of the
spec's examples (`2019-06-11 22:05:25.000`, `06/11/2019 22:05:25 MST`, RFC 2822). `>=` is "on or
after", `<=` is "before" (Calls, Recordings) or "on and before" (Messages), as the spec's parameter
descriptions say. A date filter never returns a record whose date is null (a call that never
started, a message never sent). Calls also filter by `Status`; Recordings list soft-deleted ones
only with `IncludeSoftDeleted=true`. Other parameters (`To`, `From`, ...) are accepted and ignored.

The data (see `twilio_data`) is a pure function of (seed, size, days, end) and of the sandbox clock,
which starts at `end`: `TwilioSandbox.advance(seconds)` (or `POST /_sandbox/twilio/advance?seconds=N`)
moves it on, so newer records appear and existing ones change (status, price, duration) as their
timelines say. `TwilioSandbox.amend(kind, sid, changes)` (or `POST /_sandbox/twilio/amend` with
`{"kind": "calls", "sid": ..., "changes": {"price": "-0.25000"}, "account": ...?}`) changes one
record now, after the fact (a re-rated call, a status corrected late).
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from floe.sandbox.faults import FaultMiddleware, Faults
from floe.sandbox.twilio_data import (
    API_VERSION,
    CALL_STATUSES,
    CURSOR_LAG,
    DAY,
    Clock,
    ListResource,
    hash_kind,
    mix,
    rfc2822,
)
from floe.sandbox.twilio_pages import ListFilter, enclose

__all__ = ["TwilioSandbox", "create_app", "describe", "hash_kind", "mix", "rfc2822"]

KINDS = {  # URL name -> (kind, items key, date filter parameter, whether "X<" includes the day)
    "Calls": ("calls", "calls", "StartTime", False),
    "Messages": ("messages", "messages", "DateSent", True),
    "Recordings": ("recordings", "recordings", "DateCreated", False),
    "IncomingPhoneNumbers": ("incoming_phone_numbers", "incoming_phone_numbers", None, False),
}
ZONES = {"UTC": 0, "GMT": 0, "Z": 0, "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7, "MDT": -6,
         "PST": -8, "PDT": -7}


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
    """The emulator's state: accounts with their lists, the clock, the pricing catalogue, request statistics."""

    def __init__(self, seed: int = 1, size: int = 1000, days: int = 30, end: str | None = None,
                 accounts: int = 1, numbers: int | None = None, cache_chunks: int = 2000) -> None:
        end_dt = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else (
            datetime.now(UTC).replace(minute=0, second=0, microsecond=0))
        if end_dt.tzinfo is None:
            end_dt = end_dt.replace(tzinfo=UTC)
        self.seed = seed
        self.end = int(end_dt.timestamp())
        self.start = int((end_dt - timedelta(days=days)).timestamp())
        self.clock = Clock(self.end)
        self.lock = threading.Lock()
        self.accounts: dict[str, Account] = {}
        self.served: Counter[str] = Counter()  # "<account>/<kind>" -> records served
        self.requests: list[dict[str, Any]] = []  # recent list requests: account, kind, params, records
        counts = {"calls": size, "messages": size, "recordings": max(1, size // 2),
                  "incoming_phone_numbers": numbers if numbers is not None else max(3, min(120, size // 50))}
        for k in range(accounts):
            digest = hashlib.sha256(f"twilio-sandbox:{seed}:{k}".encode()).hexdigest()
            sid, token = "AC" + digest[:32], digest[32:64]
            lists = {kind: ListResource(kind, sid, seed * 1000 + k, n, self.end, days, self.clock, cache_chunks)
                     for kind, n in counts.items()}
            self.accounts[sid] = Account(sid, token, lists)

    @property
    def now(self) -> int:
        return self.clock.now

    def advance(self, seconds: float) -> None:
        """Move the clock on: newer records appear, existing ones change as their timelines say."""
        with self.lock:
            self.clock.now += int(seconds)

    def amend(self, kind: str, sid: str, changes: dict[str, Any], account: str | None = None) -> dict[str, Any]:
        """Change record `sid` of list `kind` now (see `ListResource.amend`); KeyError if there is none."""
        with self.lock:
            resource = self.list(account or next(iter(self.accounts)), kind)
            i = resource.index_of(sid)
            if i is None:
                raise KeyError(f"no {kind} record {sid}")
            return resource.amend(i, changes)

    def credentials(self) -> list[tuple[str, str]]:
        return [(a.sid, a.token) for a in self.accounts.values()]

    def list(self, account: str, kind: str) -> ListResource:
        return self.accounts[account].lists[kind]

    def reset_stats(self) -> None:
        self.served.clear()
        self.requests.clear()


def parse_when(value: str) -> tuple[int, bool]:
    """A date filter value -> (epoch seconds, whether it was a bare day). Raises ValueError."""
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return int(datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()), True
    match = re.fullmatch(r"(\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}) ([A-Z]{1,4})", text)
    if match and match.group(2) in ZONES:  # 06/11/2019 22:05:25 MST
        zone = timezone(timedelta(hours=ZONES[match.group(2)]))
        return int(datetime.strptime(match.group(1), "%m/%d/%Y %H:%M:%S").replace(tzinfo=zone).timestamp()), False
    if text[:3].isalpha():  # Wed, 19 Jun 2019 22:04:00 -0000
        try:
            return int(parsedate_to_datetime(text).timestamp()), False
        except (TypeError, ValueError, IndexError):
            raise ValueError(text) from None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))  # 2019-06-11 22:05:25.000, ISO 8601
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()), False


def date_bounds(q: Any, name: str, inclusive_before: bool) -> tuple[int | None, int | None]:
    """[from, to) epoch bounds of a date filter given as `name=`, `name>=` and `name<=` (to: exclusive)."""
    lo = hi = None
    if (v := q.get(name + ">")) is not None:
        lo, _ = parse_when(v)
    if (v := q.get(name + "<")) is not None:
        hi, day = parse_when(v)
        if inclusive_before:
            hi += DAY if day else 1
    if (v := q.get(name)) is not None:
        day_start, _ = parse_when(v)
        lo, hi = max(lo or day_start, day_start), min(hi or day_start + DAY, day_start + DAY)
    return lo, hi


def twilio_error(status: int, message: str | None = None, code: int | None = None) -> dict[str, Any]:
    defaults = {
        400: (20001, "Invalid parameter"), 401: (20003, "Authenticate"), 403: (20403, "Forbidden"),
        404: (20404, "The requested resource was not found"),
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
               truncate_rate: float = 0.0, retry_after: float = -1.0, prerender: bool = False,
               cache_chunks: int = 2000) -> Any:
    """The Twilio emulator as an ASGI app. `app.state.twilio` is the `TwilioSandbox`, `app.state.faults` the knobs.
    Its 429s carry no `Retry-After` unless `retry_after` >= 0: Twilio documents none."""
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

    def list_filter(kind: str, date_param: str | None, inclusive: bool, q: Any) -> ListFilter | Response:
        keep = ListFilter(include_deleted=q.get("IncludeSoftDeleted", "").lower() == "true")
        try:
            if date_param:
                keep.cursor_from, keep.cursor_to = date_bounds(q, date_param, inclusive)
            if kind == "calls":
                keep.end_from, keep.end_to = date_bounds(q, "EndTime", False)
        except ValueError:
            return _error(400, f"Invalid {date_param} filter: dates are YYYY-MM-DD")
        if kind == "calls" and (status := q.get("Status")) is not None:
            if status not in CALL_STATUSES:
                return _error(400, f"Invalid Status {status!r}: one of {', '.join(CALL_STATUSES)}")
            keep.status = status
        return keep

    async def list_resource(request: Request) -> Response:
        caller = authenticate(request)
        if caller is None:
            return _error(401)
        sid, name = request.path_params["sid"], request.path_params["resource"]
        if name not in KINDS or sid != caller.sid:
            return _error(404, f"The requested resource {request.url.path} was not found")
        kind, key, date_param, inclusive = KINDS[name]
        q = request.query_params
        paging = _paging(q)
        if isinstance(paging, Response):
            return paging
        page_size, page = paging
        keep = list_filter(kind, date_param, inclusive, q)
        if isinstance(keep, Response):
            return keep
        with sandbox.lock:
            lst = caller.lists[kind]
            floor = 0 if keep.cursor_from is None else lst.first_at_or_after(keep.cursor_from - CURSOR_LAG[kind])
            top = lst.count if keep.cursor_to is None else lst.first_at_or_after(keep.cursor_to)
            token = q.get("PageToken")
            if token:
                last = lst.index_of(token[2:]) if token.startswith("PA") else None
                if last is None:
                    return _error(400, "Invalid PageToken")
                top = min(top, last)
            else:  # a page number without a token: skip the pages before it
                for _ in range(page):
                    _, _, last, more = lst.page(top, floor, page_size, keep)
                    top = last if more else floor
            items, n, last, more = lst.page(top, floor, page_size, keep)
            next_token = "PA" + lst.sid(last) if more else None
            previous_token = "PB" + lst.sid(top - 1) if page > 0 and n else None
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
            "next_page_uri": uri(page + 1, next_token) if more else None, "page": page, "page_size": page_size,
            "previous_page_uri": uri(page - 1, previous_token) if previous_token else None,
            "start": start, "uri": uri(page, token),
        })
        body = enclose(b'{"' + key.encode() + b'":', items, b"," + envelope[1:])
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

    async def advance(request: Request) -> Response:
        try:
            seconds = float(request.query_params.get("seconds", "3600"))
        except ValueError:
            return JSONResponse({"error": "seconds must be a number"}, 400)
        sandbox.advance(seconds)
        return JSONResponse({"now": datetime.fromtimestamp(sandbox.now, UTC).isoformat()})

    async def amend(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            record = sandbox.amend(body["kind"], body["sid"], dict(body["changes"]), body.get("account"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return JSONResponse({"error": f"amend: {exc}"}, 400)
        return JSONResponse(record)

    async def prerender_pages(request: Request) -> Response:
        """Render (and cache) every call page now, so a benchmark measures the client, not the emulator."""
        with sandbox.lock:
            for account in sandbox.accounts.values():
                account.lists[request.query_params.get("kind", "calls")].prerender()
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> Response:
        pages = Counter(r["kind"] for r in sandbox.requests)
        return JSONResponse({"served": dict(sandbox.served), "requests": len(sandbox.requests), "pages": pages})

    app = Starlette(routes=[
        Route(f"/{API_VERSION}/Accounts/{{sid}}/{{resource}}.json", list_resource),
        Route("/v1/PhoneNumbers/Countries", countries),
        Route("/v1/PhoneNumbers/Countries/{iso}", country),
        Route("/_sandbox/twilio/prerender", prerender_pages, methods=["POST"]),
        Route("/_sandbox/twilio/advance", advance, methods=["POST"]),
        Route("/_sandbox/twilio/amend", amend, methods=["POST"]),
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
