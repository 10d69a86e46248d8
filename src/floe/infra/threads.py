"""Blocking work off the event loop, on threads that can always be abandoned.

floe never waits for a thread it cannot stop. Both helpers run their work on daemon threads of
their own, never on an executor: `asyncio.run` ends by joining its default executor's threads,
so a single call stuck there (a queue nobody feeds, a socket that never answers) would keep a
failed run alive forever.

- `in_thread(fn, *args)` is `asyncio.to_thread`: cancelling the await abandons the call.
- `iterate_in_thread(make)` pulls a blocking iterator on one thread, up to `ahead` items ahead
  of the consumer. Leaving the `async with` block, by the end, an error or a cancellation, stops
  the thread at its next item and closes the iterator on that thread (so its `finally` runs
  where its work ran); the block waits `grace` seconds for that at most, then abandons it.
- `prefetch_in_thread(items, stop)` is the same for a blocking consumer: a producer thread at
  most `depth` items ahead; closing the generator sets `stop` and joins the producer.
- `WorkerThreads(size)` is `in_thread` on up to `size` daemon threads kept for many short calls:
  starting a thread waits until it runs, which stalls the event loop on a busy machine.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("floe.threads")
_ITEM, _END, _ERROR = 0, 1, 2


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    """`loop.call_soon_threadsafe` from a worker; False once the loop is closed (nobody listens)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled and has moved on
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _run(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], context: contextvars.Context,
         fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """`fn(*args)` in `context`; its result or exception settles `future` on `loop`."""
    try:
        result = context.run(fn, *args)
    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
        _call_soon(loop, _settle, future, None, exc)
    else:
        _call_soon(loop, _settle, future, result, None)


async def in_thread(fn: Callable[..., T], /, *args: Any) -> T:
    """`fn(*args)` on a daemon thread of its own; its result or exception comes back here."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    threading.Thread(target=_run, args=(loop, future, contextvars.copy_context(), fn, args),
                     name=f"floe:{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future


class WorkerThreads:
    """Up to `size` daemon threads, started as calls need them and kept: `await workers.call(fn, *args)`
    is `in_thread` without a thread started per call. Cancelling the await abandons the call (its
    result is dropped). For calls that always return soon (work on data in memory): one that hung
    would keep its thread. `close()` ends the threads once the calls given before it are done."""

    def __init__(self, size: int, name: str = "floe-worker") -> None:
        self.size, self.name = max(1, size), name
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._busy = 0  # calls given and not finished

    async def call(self, fn: Callable[..., T], /, *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._busy += 1
            start = self._busy > self._threads and self._threads < self.size
            self._threads += start
        if start:
            threading.Thread(target=self._work, name=self.name, daemon=True).start()
        self._calls.put((loop, future, contextvars.copy_context(), fn, args))
        return await future

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                _run(*call)
            finally:
                with self._lock:
                    self._busy -= 1

    def close(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, 0
        for _ in range(threads):
            self._calls.put(None)


@asynccontextmanager
async def iterate_in_thread(
    make: Callable[[], Iterator[T]], *, ahead: int = 1, name: str = "floe-iterate", grace: float = 5.0
) -> AsyncIterator[AsyncIterator[T]]:
    """`async with iterate_in_thread(lambda: blocking_iterator()) as items: async for item in items: ...`

    `make` runs on the worker thread too (opening a file or a cursor is blocking work as well).
    An exception of the iterator is raised to the consumer at its place in the sequence."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()  # bounded by `room`, not by the queue
    room = threading.Semaphore(ahead)
    stop = threading.Event()
    finished = asyncio.Event()

    def hand(kind: int, value: Any) -> bool:
        if stop.is_set() or not _call_soon(loop, items.put_nowait, (kind, value)):
            stop.set()
            return False
        return True

    def work() -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = make()
            for item in iterator:
                room.acquire()
                if not hand(_ITEM, item):
                    return
            hand(_END, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            hand(_ERROR, exc)
        finally:
            if isinstance(iterator, Generator):  # its `finally` blocks run here, on the thread that ran it
                try:
                    iterator.close()
                except Exception:  # noqa: BLE001 - the consumer has its answer already
                    log.debug("closing %s failed", name, exc_info=True)
            _call_soon(loop, finished.set)

    async def consume() -> AsyncGenerator[T, None]:
        while True:
            kind, value = await items.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            room.release()
            yield value

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    consumer = consume()
    try:
        yield consumer
    finally:
        stop.set()
        room.release()  # a worker waiting for room wakes up, sees `stop` and ends
        await consumer.aclose()
        ended = asyncio.ensure_future(finished.wait())
        try:  # not wait_for: on Python 3.11 it can swallow a cancellation that comes as the thread ends
            done, _ = await asyncio.wait({ended}, timeout=grace)
        finally:
            ended.cancel()
        if not done:
            log.warning("event=thread_abandoned thread=%s reason=still_busy_after_%.0fs", name, grace)


def prefetch_in_thread(
    items: Iterator[T], stop: threading.Event, depth: int = 2, name: str = "floe-prefetch"
) -> Generator[T, None, None]:
    """`items`, produced by a thread of their own at most `depth` ahead of a blocking consumer.

    Closing this iterator sets `stop` and waits for the thread: `items` must return soon after."""
    box: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((False, exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                more, item = box.get(timeout=0.5)
            except queue.Empty:
                if not thread.is_alive() and box.empty():
                    raise RuntimeError(f"{name} stopped without a word") from None
                continue
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()
