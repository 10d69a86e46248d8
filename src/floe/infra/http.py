"""The HTTP layer every API source shares: one async httpx client per source.

Contracts:
- 429, 5xx, connection errors, timeouts and bodies cut short are retried with exponential backoff
  and jitter, honouring `Retry-After` (seconds or an HTTP date), up to `max_retries` times.
- Any other 4xx fails at once with an `ApiError` naming the source, the HTTP status, the API's
  own message and the URL without credentials. Exhausted retries also end in an `ApiError`.
- At most `max_concurrency` requests of one client are in flight (a semaphore per source);
  a request waiting for its backoff does not hold a slot.
- Credentials (`auth` and the `credentials` headers) go only to the base URL's origin (or its https
  upgrade): a redirect or an absolute URL elsewhere is sent without them.
- Credentials belong to the client: its first request goes alone, and once the API answers 401
  every later request fails with that same `ApiError` without being sent. A wrong token thus
  gives one error (not one per stream) and never hammers the API.
- `metrics` counts attempts, retries, final errors, seconds spent and responses per status.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from floe.core.errors import SourceError
from floe.core.secrets import redact
from floe.core.stream import RequestMetrics, Source
from floe.infra.threads import in_thread

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")
log = logging.getLogger("floe.http")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504}) | frozenset(range(505, 600))
# Query parameters that carry credentials in some APIs (Singular's api_key, pre-signed S3 URLs).
_SECRET_PARAMS = ("key", "token", "secret", "password", "signature", "credential", "auth", "sig")
READ_BYTES = 1 << 20  # what httpcore reads of a body at a time (set by the first HttpClient)


def safe_url(url: str | httpx.URL) -> str:
    """`url` without user:password and with credential-like query values masked."""
    parts = urlsplit(str(url))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    masked = [(k, "***" if any(w in k.lower() for w in _SECRET_PARAMS) else v) for k, v in query]
    return redact(urlunsplit((parts.scheme, netloc, parts.path, urlencode(masked, safe="*/:<>"), "")))


def api_message(body: bytes, limit: int = 300) -> str:
    """The API's own error message from a response body (JSON `message`/`detail`/`error`...), or its text."""
    text = body[:4000]
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        parts: list[str] = []
        for key in ("message", "detail", "error", "error_message", "errors", "description", "title"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value
            if value and str(value) not in parts:
                parts.append(str(value))
        code = data.get("code")
        if not parts and isinstance(data.get("value"), dict):  # Singular: {"status":1,"value":{"error":…}}
            return api_message(orjson.dumps(data["value"]), limit)
        if parts:
            return redact(("; ".join(parts) + (f" (code {code})" if code else ""))[:limit])
    return redact(" ".join(body[:limit].decode("utf-8", "replace").split())) or "(empty body)"


class ApiError(SourceError):
    """An API call failed for good. `status` is None when no HTTP response came back."""

    def __init__(self, source: str, message: str, *, status: int | None = None, url: str = "") -> None:
        self.source = source
        self.status = status
        self.url = url
        what = f"HTTP {status}" if status is not None else "request failed"
        super().__init__(redact(f"{source}: {what}: {message} ({url})" if url else f"{source}: {what}: {message}"))


@dataclass
class HttpMetrics:
    requests: int = 0  # attempts sent, retries included
    retries: int = 0
    errors: int = 0  # calls that ended in an ApiError
    seconds: float = 0.0  # wall time spent in attempts (concurrent attempts add up)
    by_status: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "retries": self.retries, "errors": self.errors,
                "seconds": round(self.seconds, 3), "by_status": dict(self.by_status)}


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Retry(Exception):
    """Internal: this attempt failed in a retryable way."""

    def __init__(self, reason: str, status: int | None, wait: float | None, url: str) -> None:
        super().__init__(reason)
        self.reason, self.status, self.wait, self.url = reason, status, wait, url


class HttpClient:
    """An async HTTP client for one source (see module docstring for the retry contract)."""

    def __init__(
        self,
        source: str,
        base_url: str = "",
        *,
        auth: httpx.Auth | tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
        credentials: dict[str, str] | None = None,
        timeout: float = 60.0,
        max_concurrency: int = 8,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        import httpcore
        import httpx

        # Pages of list APIs are megabytes. httpcore reads a body 64 KB at a time, each piece passing through
        # h11, httpcore and httpx in Python: 1 MB reads take a quarter less CPU per page (asyncio hands
        # over at most 256 KB a time anyway, so memory does not grow).
        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_BYTES
        self.source = source
        self._credential_headers = frozenset({"authorization", *(name.lower() for name in credentials or {})})
        self._home = _origin(httpx.URL(base_url)) if base_url else None
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.metrics = HttpMetrics()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._first_request = asyncio.Lock()
        self._answered = False  # the first request is over: the credentials were judged (or the API is down)
        self._rejected: tuple[str, str] | None = None  # (message, url) of the 401 every later request repeats
        basic = httpx.BasicAuth(*auth) if isinstance(auth, tuple) else auth
        self._client = httpx.AsyncClient(
            base_url=base_url,
            auth=basic,
            headers={"User-Agent": "floe", **(headers or {}), **(credentials or {})},
            timeout=httpx.Timeout(timeout),
            transport=transport,
            limits=httpx.Limits(max_connections=max(max_concurrency, 1) * 2, max_keepalive_connections=max_concurrency),
            follow_redirects=True,
            event_hooks={"request": [self._withhold_credentials]},
        )

    # --- helpers ---------------------------------------------------------------------------
    async def _withhold_credentials(self, request: httpx.Request) -> None:
        """Called for every request, redirects included: strip the credentials off one leaving home."""
        if self._home is None:
            return
        there = _origin(request.url)
        if there == self._home or there == ("https", self._home[1], 443) and self._home[0] == "http":
            return
        withheld = [name for name in self._credential_headers if name in request.headers]
        for name in withheld:
            del request.headers[name]
        if withheld:
            log.info("event=http_credentials_withheld source=%s url=%s reason=%s", self.source,
                        safe_url(request.url), "the URL is not on the base URL's host")

    def backoff(self, attempt: int, hint: float | None = None) -> float:
        """Delay before retry number `attempt` (0-based): the server's hint, else capped exponential with jitter."""
        if hint is not None:
            return min(hint, self.backoff_max)
        cap = min(self.backoff_max, self.backoff_base * (2**attempt))
        return cap * (0.5 + random.random() / 2)

    def _url(self, url: str) -> str:
        return safe_url(self._client.base_url.join(url) if self._client.base_url else url)

    def _count(self, status: int) -> None:
        self.metrics.by_status[status] = self.metrics.by_status.get(status, 0) + 1

    def _fail(self, message: str, status: int | None, url: str) -> ApiError:
        self.metrics.errors += 1
        return ApiError(self.source, message, status=status, url=url)

    async def _check(self, response: httpx.Response) -> None:
        """Raise _Retry or ApiError for an unsuccessful response (reads its body)."""
        status = response.status_code
        if status < 400:
            return
        body = await response.aread()
        url = safe_url(response.request.url)
        if status in RETRY_STATUSES:
            raise _Retry(api_message(body), status, retry_after(response.headers.get("Retry-After")), url)
        if status == 401:
            self._rejected = (api_message(body), url)
        raise self._fail(api_message(body), status, url)

    # --- public API --------------------------------------------------------------------------
    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send a request and read the whole body; retry as described in the module docstring."""
        if not self._answered:
            async with self._first_request:  # the others wait until the credentials are judged
                if not self._answered:
                    try:
                        return await self._request(method, url, **kwargs)
                    finally:
                        self._answered = True
        return await self._request(method, url, **kwargs)

    def _raise_if_rejected(self) -> None:
        if self._rejected is not None:
            message, url = self._rejected
            raise ApiError(self.source, message, status=401, url=url)

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async with self._attempts(method, url, read_body=True, **kwargs) as response:
            return response

    async def _back_off_or_fail(self, attempt: int, retry: _Retry) -> None:
        """Sleep before the next attempt, or raise the final ApiError once `max_retries` are spent."""
        if attempt >= self.max_retries:
            raise self._fail(f"{retry.reason} (gave up after {attempt + 1} attempts)", retry.status,
                             retry.url) from None
        self.metrics.retries += 1
        await asyncio.sleep(self.backoff(attempt, retry.wait))

    async def get_json(self, url: str, **kwargs: Any) -> Any:
        """GET and decode JSON. A body that is not valid JSON (e.g. truncated) is retried too."""
        return await self.get_parsed(url, orjson.loads, **kwargs)

    async def get_parsed(self, url: str, parse: Callable[[bytes], T], *, parse_in_thread: bool = False,
                         **kwargs: Any) -> T:
        """GET and `parse(body)`; a ValueError from `parse` (a truncated or garbled body) is retried.
        With `parse_in_thread`, `parse` (thread-safe, releasing the GIL) runs on a worker thread, so
        the event loop goes on reading other responses meanwhile."""
        attempt = 0
        while True:
            response = await self.request("GET", url, **kwargs)
            try:
                return await in_thread(parse, response.content) if parse_in_thread else parse(response.content)
            except ValueError as exc:
                if attempt >= self.max_retries:
                    raise self._fail(f"response could not be parsed ({str(exc)[:200]})", response.status_code,
                                     safe_url(response.request.url)) from None
                self.metrics.retries += 1
                await asyncio.sleep(self.backoff(attempt))
                attempt += 1

    @asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """A response whose body is read by the caller (`aiter_bytes`...). Failures before the body
        is handed over are retried; errors while the caller reads it are the caller's to handle."""
        async with self._attempts(method, url, read_body=False, **kwargs) as response:
            yield response

    @asynccontextmanager
    async def _attempts(self, method: str, url: str, read_body: bool, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """The retry loop both `request` and `stream` use: yields the first successful response,
        with its body already read when `read_body` (a body cut short is then retried too)."""
        import httpx

        self._raise_if_rejected()
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                async with self._slots:
                    self.metrics.requests += 1
                    try:
                        request = self._client.build_request(method, url, **kwargs)
                        response = await self._client.send(request, stream=True)
                    except httpx.TransportError as exc:  # connection, timeout
                        self.metrics.seconds += time.monotonic() - started
                        raise _Retry(_transport_message(exc), None, None, self._url(url)) from exc
                    try:
                        self._count(response.status_code)
                        try:
                            await self._check(response)
                            if read_body:
                                await response.aread()
                        except httpx.TransportError as exc:  # the body was cut short
                            raise _Retry(_transport_message(exc), None, None, self._url(url)) from exc
                        yield response
                        return
                    finally:
                        await response.aclose()
                        self.metrics.seconds += time.monotonic() - started
            except _Retry as retry:
                await self._back_off_or_fail(attempt, retry)
                attempt += 1

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in."""
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _transport_message(exc: httpx.TransportError) -> str:
    import httpx

    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection error"
    detail = str(exc).strip()
    return redact(f"{kind}: {type(exc).__name__}" + (f" {detail}" if detail else ""))


class PageGuard:
    """Stops a pagination loop that would never end: `check(token)` raises on a token/URL seen before."""

    def __init__(self, source: str = "", what: str = "") -> None:
        self.source = source
        self.what = what
        self._seen: set[str] = set()

    def check(self, token: str | httpx.URL | None) -> None:
        if token is None:
            return
        key = str(token)
        if key in self._seen:
            where = f" of {self.what}" if self.what else ""
            shown = safe_url(key) if "/" in key else key
            raise SourceError(
                f"{self.source}: pagination{where} repeated page {shown!r}; the API keeps returning the "
                "same page, stopping to avoid an endless loop"
            )
        self._seen.add(key)

    def __len__(self) -> int:
        return len(self._seen)


class ApiSource(Source):
    """A source that talks to one API through one HttpClient, created on first use.

    Subclasses say how to build it (`make_http`); `aclose` logs the client's metrics and closes it."""

    _http: HttpClient | None = None

    def make_http(self) -> HttpClient:
        """The source's client: base URL, auth, headers, concurrency limit."""
        return HttpClient(self.name)

    @property
    def http(self) -> HttpClient:
        if self._http is None:
            self._http = self.make_http()
        return self._http

    def request_metrics(self) -> list[RequestMetrics]:
        return [self._http.metrics] if self._http is not None else []

    async def aclose(self) -> None:
        if self._http is not None:
            m = self._http.metrics
            log.info(
                "event=http_metrics source=%s requests=%d retries=%d errors=%d seconds=%.1f by_status=%s",
                self.name, m.requests, m.retries, m.errors, m.seconds, m.by_status)
            await self._http.aclose()
            self._http = None
