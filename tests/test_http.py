"""The shared HTTP layer against a tiny real HTTP server: retries, errors, timeouts, concurrency, paging guard."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from floe.core.errors import SourceError
from floe.infra.http import ApiError, HttpClient, PageGuard, retry_after, safe_url
from floe.sandbox.server import RunningServer, serve_in_thread

SECRET = "s3cr3t-auth-token"


def make_app() -> Starlette:
    hits: Counter[str] = Counter()
    inflight = {"now": 0, "max": 0}

    def failing_first(request: Request, status: int, headers: dict[str, str] | None = None) -> Response:
        key = request.query_params["key"]
        hits[key] += 1
        if hits[key] <= int(request.query_params.get("fail", "2")):
            return JSONResponse({"code": 20429 if status == 429 else status, "message": "try later"}, status,
                                headers=headers)
        return JSONResponse({"ok": True, "attempts": hits[key]})

    async def too_many(request: Request) -> Response:
        return failing_first(request, 429, {"Retry-After": request.query_params.get("after", "0")})

    async def unavailable(request: Request) -> Response:
        return failing_first(request, int(request.query_params.get("status", "503")))

    async def bad_request(request: Request) -> Response:
        hits[request.url.path] += 1
        return JSONResponse({"code": 21211, "message": "The 'To' number is not valid.", "status": 400}, 400)

    async def unauthorized(request: Request) -> Response:
        hits[request.url.path] += 1
        return JSONResponse({"code": 20003, "detail": "Your AccountSid or AuthToken was incorrect.",
                             "message": "Authenticate", "status": 401}, 401)

    async def slow(request: Request) -> Response:
        hits[request.url.path] += 1
        await asyncio.sleep(float(request.query_params.get("seconds", "2")))
        return JSONResponse({"ok": True})

    async def busy(request: Request) -> Response:
        inflight["now"] += 1
        inflight["max"] = max(inflight["max"], inflight["now"])
        await asyncio.sleep(0.05)
        inflight["now"] -= 1
        return JSONResponse({"max": inflight["max"]})

    async def truncated_asgi(scope, receive, send) -> None:  # raw ASGI: promise 100 bytes, send 12
        key = scope["query_string"].decode()
        hits[key] += 1
        if hits[key] == 1:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]})
            await send({"type": "http.response.body", "body": b'{"ok": true, ', "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    class Raw:  # Starlette treats a non-function endpoint as a raw ASGI app
        async def __call__(self, scope, receive, send) -> None:
            await truncated_asgi(scope, receive, send)

    truncated = Raw()

    async def echo(request: Request) -> Response:
        return JSONResponse({"headers": dict(request.headers)})

    async def redirect(request: Request) -> Response:
        return RedirectResponse(request.query_params["to"], 307)

    async def hit_count(request: Request) -> Response:
        return JSONResponse({"hits": hits[request.query_params["key"]]})

    app = Starlette(routes=[
        Route("/429", too_many), Route("/5xx", unavailable), Route("/400", bad_request),
        Route("/401", unauthorized), Route("/slow", slow), Route("/busy", busy), Route("/truncated", truncated),
        Route("/hits", hit_count), Route("/echo", echo, methods=["GET", "POST"]),
        Route("/redirect", redirect, methods=["GET", "POST"]),
    ])
    app.state.hits = hits
    return app


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve_in_thread(make_app()) as running:
        yield running


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[RunningServer]:
    """Another origin (another port): a server the credentials must never reach."""
    with serve_in_thread(make_app()) as running:
        yield running


def client(server: RunningServer, **kwargs) -> HttpClient:
    kwargs.setdefault("backoff_base", 0.01)
    return HttpClient("twilio_main", server.url, **kwargs)


async def _call(server: RunningServer, url: str, **kwargs):
    http = client(server, **kwargs)
    try:
        return await http.get_json(url), http.metrics
    finally:
        await http.aclose()


@pytest.mark.parametrize("path", ["/429?key=a429&fail=2", "/5xx?key=a503&fail=2", "/5xx?key=a500&fail=2&status=500",
                                  "/truncated?key=t1"])
def test_retryable_failures_are_retried_until_success(server: RunningServer, path: str) -> None:
    body, metrics = asyncio.run(_call(server, path))
    assert body["ok"] is True
    expected_failures = 1 if "truncated" in path else 2
    assert metrics.retries == expected_failures
    assert metrics.requests == expected_failures + 1
    assert metrics.errors == 0


def test_retry_after_seconds_is_honoured(server: RunningServer) -> None:
    t0 = time.monotonic()
    body, metrics = asyncio.run(_call(server, "/429?key=after1&fail=1&after=1"))
    assert body["attempts"] == 2
    assert time.monotonic() - t0 >= 0.95
    assert metrics.by_status == {429: 1, 200: 1}


def test_retry_after_http_date_is_parsed() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 <= retry_after(format_datetime(soon, usegmt=True)) <= 30  # type: ignore[operator]
    assert retry_after("7") == 7.0
    assert retry_after("garbage") is None
    assert retry_after(None) is None


@pytest.mark.parametrize("path,status,message", [
    ("/400", 400, "The 'To' number is not valid."),
    ("/401", 401, "Your AccountSid or AuthToken was incorrect."),
])
def test_other_4xx_fail_at_once_with_the_api_message_and_no_credentials(
    server: RunningServer, path: str, status: int, message: str
) -> None:
    http = client(server, auth=("ACuser", SECRET))

    async def go() -> None:
        try:
            await http.get_json(f"{path}?api_key={SECRET}&PageSize=5")
        finally:
            await http.aclose()

    with pytest.raises(ApiError) as info:
        asyncio.run(go())
    error = info.value
    text = str(error)
    assert error.status == status
    assert text.startswith("twilio_main: ")
    assert f"HTTP {status}" in text and message in text
    assert SECRET not in text and "ACuser" not in text
    assert "PageSize=5" in text and path in text  # the URL is named, credentials masked
    assert http.metrics.requests == 1 and http.metrics.retries == 0 and http.metrics.errors == 1


def test_a_401_is_asked_once_and_then_every_request_of_the_client_fails_with_it(server: RunningServer) -> None:
    """Five streams starting at once with a wrong token: one request reaches the API, one error text."""
    async def go() -> tuple[list[BaseException], int]:
        async with client(server, auth=("ACuser", SECRET)) as http:
            errors = await asyncio.gather(*(http.get_json(f"/401?stream={i}") for i in range(5)),
                                          return_exceptions=True)
            with pytest.raises(ApiError):
                async with http.stream("GET", "/busy"):
                    pass
            return list(errors), http.metrics.requests

    before = server.app.state.hits["/401"]
    errors, sent = asyncio.run(go())
    assert server.app.state.hits["/401"] - before == 1 and sent == 1
    assert all(isinstance(e, ApiError) and e.status == 401 for e in errors)
    assert len({str(e) for e in errors}) == 1 and "Your AccountSid or AuthToken was incorrect." in str(errors[0])


def test_exhausted_retries_give_an_api_error_with_the_last_status(server: RunningServer) -> None:
    with pytest.raises(ApiError) as info:
        asyncio.run(_call(server, "/5xx?key=never&fail=99", max_retries=2))
    assert info.value.status == 503
    assert "gave up after 3 attempts" in str(info.value) and "try later" in str(info.value)


def test_timeouts_are_retried_then_reported(server: RunningServer) -> None:
    http = client(server, timeout=0.2, max_retries=1)

    async def go() -> None:
        try:
            await http.get_json("/slow?seconds=2")
        finally:
            await http.aclose()

    with pytest.raises(ApiError) as info:
        asyncio.run(go())
    assert "timed out" in str(info.value) and info.value.status is None
    assert http.metrics.requests == 2


def test_connection_refused_is_an_api_error() -> None:
    async def go() -> None:
        async with HttpClient("x", "http://127.0.0.1:9", max_retries=1, backoff_base=0.01) as http:
            await http.get_json("/nothing")

    with pytest.raises(ApiError, match="x: request failed: connection error"):
        asyncio.run(go())


def test_concurrency_is_limited_per_client(server: RunningServer) -> None:
    async def go() -> int:
        async with client(server, max_concurrency=3) as http:
            bodies = await asyncio.gather(*(http.get_json("/busy") for _ in range(15)))
        return max(b["max"] for b in bodies)

    assert asyncio.run(go()) == 3


def test_requests_do_not_search_for_modules(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """httpcore imports sniffio in several calls of every request: were it not installed, each
    import would search sys.path again (a tenth of the event loop's time on Twilio's pages)."""
    searched: list[str] = []

    class Missing:  # consulted only once every other finder came up empty
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            searched.append(name)

    async def go() -> None:
        async with client(server) as http:
            await http.get_json("/busy")  # the first request imports what the client uses
            monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Missing()])
            await asyncio.gather(*(http.get_json("/busy") for _ in range(5)))

    asyncio.run(go())
    assert searched == []


def test_stream_retries_before_the_body_is_handed_over(server: RunningServer) -> None:
    async def go() -> bytes:
        async with client(server) as http, http.stream("GET", "/5xx?key=stream1&fail=1") as response:
            return b"".join([chunk async for chunk in response.aiter_bytes()])

    assert b'"attempts":2' in asyncio.run(go())


def test_page_guard_stops_a_repeated_page() -> None:
    guard = PageGuard("twilio_main", "calls")
    guard.check("/2010-04-01/Accounts/AC1/Calls.json?Page=1&PageToken=PA1")
    guard.check("/2010-04-01/Accounts/AC1/Calls.json?Page=2&PageToken=PA2")
    guard.check(None)
    with pytest.raises(SourceError, match="twilio_main: pagination of calls repeated page"):
        guard.check("/2010-04-01/Accounts/AC1/Calls.json?Page=1&PageToken=PA1")


def test_safe_url_removes_credentials() -> None:
    url = safe_url(f"https://ACuser:{SECRET}@api.example.com/v2/x?api_key={SECRET}&Signature=abc&day=1")
    assert SECRET not in url and "ACuser" not in url and "abc" not in url
    assert url.startswith("https://api.example.com/v2/x?") and "day=1" in url


def test_credentials_go_only_to_the_base_urls_origin(server: RunningServer, elsewhere: RunningServer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Basic auth and credential headers reach the base URL, also after a redirect home; a redirect or an
    absolute URL to another origin is sent without them (other headers still go), and a chain that left
    home does not get them back."""
    home, away = f"{server.url}/echo", f"{elsewhere.url}/echo"

    async def go() -> list[dict[str, str]]:
        async with client(server, auth=("ACuser", SECRET), headers={"accept": "application/json"},
                          credentials={"x-pendo-integration-key": SECRET}) as http:
            bodies = [await http.get_json(url) for url in (
                "/echo", f"/redirect?to={home}", f"/redirect?to={away}", away)]
            bodies.append(await http.get_json(f"{elsewhere.url}/redirect?to={home}"))
            posted = await http.request("POST", f"/redirect?to={away}", content=b"[]")
            return [b["headers"] for b in bodies] + [posted.json()["headers"]]

    with caplog.at_level("INFO", logger="floe.http"):
        at_home, redirected_home, redirected_away, absolute_away, back_home, posted_away = asyncio.run(go())
    for headers in (at_home, redirected_home):
        assert headers["x-pendo-integration-key"] == SECRET and headers["authorization"].startswith("Basic ")
    for headers in (redirected_away, absolute_away, back_home, posted_away):
        assert "x-pendo-integration-key" not in headers and "authorization" not in headers
        assert headers["accept"] == "application/json"
    withheld = [r.getMessage() for r in caplog.records if "http_credentials_withheld" in r.getMessage()]
    assert len(withheld) == 4 and not any(SECRET in m for m in withheld)
