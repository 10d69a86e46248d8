"""Twilio v2010 list paging: every page of a list, each page's request sent while the previous is parsed.

A list is read by following each page's relative `next_page_uri` until it is null. The next
request does not wait for the parse: as soon as a page's body has arrived, its `next_page_uri` is
read from the raw bytes (`peek_next_uri`, the last `"next_page_uri":` of the body) and that page is
requested while this one is parsed on a worker thread and handed on. The parse has the last word:
when the URI it finds differs from the peeked one (a field of that name inside a record, a body
cut short and fetched again), the early request is cancelled and the right page fetched. So a list
keeps at most two requests of its own in flight, and a reader that stops after page N has caused
at most one request more (page N+1's); a list read until a condition holds (`last`) requests
none more. Pages parse on at most as many threads at once as there are
cores (`parse_slots`), on threads kept for the source's run (`parse_threads`): more would not be
faster, only hold more pages in memory.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncGenerator, Callable
from urllib.parse import urljoin, urlsplit

import pyarrow as pa

from floe.core.errors import SourceError
from floe.infra.http import HttpClient, PageGuard, safe_url
from floe.infra.threads import WorkerThreads
from floe.sources.twilio_records import PageParser

_NEXT = b'"next_page_uri":'
_VALUE = re.compile(rb'\s*(?:(null)|"([^"\\]*)")')


def parse_slots() -> asyncio.Semaphore:
    """How many pages a source parses at once: one per core."""
    return asyncio.Semaphore(os.cpu_count() or 1)


def parse_threads() -> WorkerThreads:
    """The threads a source's pages are parsed on (as many as `parse_slots`), kept for its run."""
    return WorkerThreads(os.cpu_count() or 1, "floe-twilio-parse")


def peek_next_uri(body: bytes) -> tuple[bool, str | None]:
    """(found, uri): the value of the body's last `"next_page_uri":` key (None for null), read
    without parsing the page; (False, None) when it is missing or not a plain string or null."""
    at = body.rfind(_NEXT)
    if at < 0:
        return False, None
    match = _VALUE.match(body, at + len(_NEXT))
    if match is None:
        return False, None
    return True, None if match.group(1) else match.group(2).decode()


class ListPages:
    """The pages of one list, as raw batches (`parser.convert` shapes them)."""

    def __init__(self, http: HttpClient, base_url: str, parser: PageParser, guard: PageGuard,
                 parsing: asyncio.Semaphore, threads: WorkerThreads) -> None:
        self.http, self.base_url, self.parser, self.guard = http, base_url, parser, guard
        self.parsing = parsing  # shared by a source's lists: more parses at once than cores only cost memory
        self.threads = threads  # shared too: the parses run there

    def absolute(self, uri: str | None) -> str | None:
        """`uri` (a page's `next_page_uri`) resolved against the base URL; SourceError if it leaves the
        base URL's host: the account's credentials go with every request."""
        if not uri:
            return None
        url = urljoin(self.base_url + "/", uri)
        if _leaves(self.base_url, uri):
            raise SourceError(f"twilio: a page's next_page_uri {safe_url(url)!r} leaves {safe_url(self.base_url)}; "
                              "not following it (the credentials would go with the request)")
        return url

    async def body(self, url: str, params: dict[str, str] | None) -> bytes:
        return (await self.http.request("GET", url, params=params)).content

    async def parse(self, url: str, params: dict[str, str] | None,
                    body: bytes) -> tuple[pa.RecordBatch, str | None]:
        """`body` parsed on a worker thread; a body the parser refuses (cut short, garbled) is fetched
        and parsed again, with `HttpClient.get_parsed`'s retries."""
        try:
            async with self.parsing:
                return await self.threads.call(self.parser, body)
        except ValueError:
            self.http.metrics.retries += 1
            return await self.http.get_parsed(url, self.parser, params=params, parse_in_thread=True)

    async def read(self, url: str, params: dict[str, str] | None,
                   last: Callable[[pa.RecordBatch], bool] | None = None) -> AsyncGenerator[pa.RecordBatch, None]:
        """Every page from `url`, following `next_page_uri` (the next page URI carries every parameter).
        With `last`, a page for which it is true ends the list, and each next request waits for the
        parse (to know whether there is one): no page is requested that is not read."""
        ahead: tuple[str, asyncio.Task[bytes]] | None = None  # (url, its request), sent before the parse
        next_url: str | None = url
        body = await self.body(url, params)
        try:
            while next_url is not None:
                found, peeked = peek_next_uri(body) if last is None else (False, None)
                if found and peeked is not None and not _leaves(self.base_url, peeked):
                    early = self.absolute(peeked)
                    assert early is not None
                    ahead = (early, asyncio.create_task(self.body(early, None)))
                batch, next_uri = await self.parse(next_url, params, body)
                params, next_url = None, self.absolute(next_uri)
                if last is not None and last(batch):
                    next_url = None
                self.guard.check(next_url)
                if ahead is not None and ahead[0] != next_url:  # the peek was wrong: not that page
                    await _cancel(ahead[1])
                    ahead = None
                if next_url is not None and ahead is None:
                    ahead = (next_url, asyncio.create_task(self.body(next_url, None)))
                yield batch
                if ahead is not None:
                    task, ahead = ahead[1], None
                    body = await task
        finally:
            if ahead is not None:
                await _cancel(ahead[1])


async def _cancel(task: asyncio.Task[bytes]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _leaves(base_url: str, uri: str) -> bool:
    """True if `uri` resolved against `base_url` is on another scheme or host (a peek never requests it;
    the parse decides, and `ListPages.absolute` refuses it)."""
    return urlsplit(urljoin(base_url + "/", uri))[:2] != urlsplit(base_url)[:2]
