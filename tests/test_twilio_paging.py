"""Twilio paging: the next page is requested while a page is parsed, exactly the pages read (plus at
most the one being fetched ahead), and a `next_page_uri` found inside a record never misleads it."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import aclosing
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from floe.sources.twilio_paging import peek_next_uri
from floe.sources.twilio_records import CALLS
from tests.test_twilio import make_source, start_twilio

SID = "AC" + "1" * 32
LIST = f"/2010-04-01/Accounts/{SID}/Calls.json"


@pytest.mark.parametrize(("body", "peeked"), [
    (b'{"calls":[],"next_page_uri":"/a?Page=1","page":0}', (True, "/a?Page=1")),
    (b'{"calls":[], "next_page_uri": null}', (True, None)),
    (b'{"next_page_uri":"/a","calls":[{"x":"\\"next_page_uri\\":\\"/b\\""}]}', (True, "/a")),
    (b'{"calls":[],"next_page_uri":"/a\\u0026b"}', (False, None)),  # escapes: the parse decides
    (b'{"calls":[]}', (False, None)),
    (b'{"calls":[],"next_page_uri":"/a', (False, None)),  # cut short
])
def test_the_next_page_uri_is_peeked_from_the_body(body: bytes, peeked: tuple[bool, str | None]) -> None:
    assert peek_next_uri(body) == peeked


def test_a_list_read_to_its_end_requests_each_page_once_and_a_stopped_one_at_most_one_more(emulator: Any) -> None:
    server, sandbox = start_twilio(emulator, size=500, days=2)
    source = make_source(server, sandbox, page_size=50)
    sid = sandbox.credentials()[0][0]
    url = source.list_url("Calls")

    async def read(pages: int | None, last_after: int | None = None) -> tuple[int, int]:
        seen = 0

        def last(_: Any) -> bool:
            nonlocal seen
            seen += 1
            return seen == last_after

        read = 0
        async with aclosing(source.pages(url, {"PageSize": "50"}, source.parser("calls", CALLS), "calls",
                                         last if last_after else None)) as batches:
            async for _ in batches:
                read += 1
                if read == pages:
                    break
        requests = source.http.metrics.requests
        await source.aclose()
        return read, requests

    assert asyncio.run(asyncio.wait_for(read(None), 60)) == (10, 10)
    assert sandbox.served[f"{sid}/calls"] == 500
    assert asyncio.run(asyncio.wait_for(read(3), 60)) == (3, 4)  # page 4 was on its way
    assert asyncio.run(asyncio.wait_for(read(None, last_after=3), 60)) == (3, 3)  # no page after the last


def decoy_app() -> Starlette:
    """Three pages of one record each; the first page's record holds an object with a
    `next_page_uri` key after the page's own, pointing at a page that must never be read."""
    served: Counter[str] = Counter()

    async def calls(request: Request) -> Response:
        page = int(request.query_params.get("Page", "0"))
        served[str(page)] += 1
        record: dict[str, Any] = {"sid": f"CA{page:032d}", "account_sid": SID}
        nxt = f"{LIST}?PageSize=1&Page={page + 1}" if page < 2 else None
        body: dict[str, Any] = {"next_page_uri": nxt, "calls": [record]}
        if page == 0:
            record["annotation"] = {"next_page_uri": f"{LIST}?PageSize=1&Page=9"}
        return Response(orjson.dumps(body), media_type="application/json")

    app = Starlette(routes=[Route(LIST, calls)])
    app.state.served = served
    return app


def test_a_next_page_uri_inside_a_record_does_not_mislead_the_paging(emulator: Any) -> None:
    server = emulator(decoy_app)
    from floe.config import parse_config
    from floe.core.stream import Context
    from floe.sources.twilio import TwilioSource

    config = parse_config({"sources": {"tw": {"type": "twilio", "account_sid": SID, "auth_token": "t",
                                              "start_date": "2026-01-01", "base_url": server.url}}}).sources["tw"]
    source = TwilioSource("tw", config, Context())

    async def read() -> list[str]:
        parser = source.parser("calls", CALLS)
        sids = [sid for batch in [b async for b in source.pages(source.list_url("Calls"), {"PageSize": "1"},
                                                               parser, "calls")]
                for sid in batch.column("sid").to_pylist()]
        await source.aclose()
        return sids

    assert asyncio.run(asyncio.wait_for(read(), 30)) == [f"CA{p:032d}" for p in range(3)]
    served = server.app.state.served
    assert {p: served[p] for p in "012"} == {"0": 1, "1": 1, "2": 1} and served["9"] <= 1


def other_host_app(elsewhere: list[str]) -> Starlette:
    """One page whose `next_page_uri` is the URL of another host (`elsewhere[0]`, set once it runs), and
    whose record holds a key of that name pointing there too."""

    async def calls(request: Request) -> Response:
        record = {"sid": "CA" + "0" * 32, "account_sid": SID, "annotation": {"next_page_uri": elsewhere[0]}}
        return Response(orjson.dumps({"calls": [record], "next_page_uri": elsewhere[0]}),
                        media_type="application/json")

    return Starlette(routes=[Route(LIST, calls)])


def test_a_next_page_uri_on_another_host_is_refused_and_never_requested(emulator: Any) -> None:
    """The account's credentials go with every request: a page pointing elsewhere ends the read with an
    error naming it, and neither the peek nor the parse sends a request there."""
    from floe.config import parse_config
    from floe.core.errors import SourceError
    from floe.core.stream import Context
    from floe.sources.twilio import TwilioSource

    reached: Counter[str] = Counter()

    async def anything(request: Request) -> Response:
        reached[request.url.path] += 1
        return Response(b'{"calls": [], "next_page_uri": null}', media_type="application/json")

    other = emulator(lambda: Starlette(routes=[Route(LIST, anything)]))
    elsewhere = [f"{other.url}{LIST}?PageSize=1&Page=1"]
    server = emulator(lambda: other_host_app(elsewhere))
    config = parse_config({"sources": {"tw": {"type": "twilio", "account_sid": SID, "auth_token": "t",
                                              "start_date": "2026-01-01", "base_url": server.url}}}).sources["tw"]
    source = TwilioSource("tw", config, Context())

    async def read() -> None:
        try:
            async for _ in source.pages(source.list_url("Calls"), {"PageSize": "1"},
                                        source.parser("calls", CALLS), "calls"):
                pass
        finally:
            await source.aclose()

    with pytest.raises(SourceError, match="next_page_uri .* leaves"):
        asyncio.run(asyncio.wait_for(read(), 30))
    assert not reached


def test_pages_parse_and_convert_on_threads_kept_for_the_run_one_per_core_at_most(emulator: Any) -> None:
    """No thread is started per page (starting one stalls the event loop until it runs): the parses
    and conversions of a whole read share at most one kept thread per core, which end with the run."""
    import os
    import threading
    import time

    server, sandbox = start_twilio(emulator, size=2000, days=3)
    # no sweeps: their pages are converted on the event loop (a sweep's next request waits for that)
    source = make_source(server, sandbox, streams=["calls"], page_size=50, window_days=1, null_cursor_rows=False)
    stream = source.streams()[0]
    seen: set[str] = set()
    parse, convert = stream.parser._read_arrow, stream.parser.convert

    def named(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            seen.add(threading.current_thread().name)
            return fn(*args)
        return call

    stream.parser._read_arrow = named(parse)  # type: ignore[method-assign]
    stream.parser.convert = named(convert)  # type: ignore[method-assign]

    def pool() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "floe-twilio-parse"]

    async def read() -> tuple[int, int, int]:
        rows = 0
        try:
            async for batch in stream.read(None):
                rows += batch.records.num_rows if batch.records is not None else 0
            return rows, source.http.metrics.requests, len(pool())
        finally:
            await source.aclose()

    rows, requests, threads = asyncio.run(read())
    assert rows > 1500 and requests > 30
    assert seen == {"floe-twilio-parse"} and 1 <= threads <= (os.cpu_count() or 1)
    deadline = time.monotonic() + 5
    while pool() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool() == []
