"""floe.threads: blocking work on threads that never keep a run alive."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from floe.threads import in_thread, iterate_in_thread


def test_leaving_early_stops_the_thread_and_closes_the_generator_on_it() -> None:
    pulled: list[int] = []
    closed_on: list[str] = []

    def numbers() -> Iterator[int]:
        try:
            for i in itertools.count():
                pulled.append(i)
                yield i
        finally:
            closed_on.append(threading.current_thread().name)

    async def main() -> None:
        async with iterate_in_thread(numbers, ahead=2, name="numbers") as items:
            async for i in items:
                if i == 3:
                    break

    asyncio.run(main())
    assert closed_on == ["numbers"]
    assert len(pulled) <= 4 + 2 + 1  # consumed, `ahead` waiting, one in the thread's hand


def test_an_error_of_the_iterator_comes_after_the_items_before_it() -> None:
    got: list[int] = []

    def broken() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("line 3 is not JSON")

    async def main() -> None:
        async with iterate_in_thread(broken) as items:
            async for i in items:
                got.append(i)

    with pytest.raises(ValueError, match="line 3 is not JSON"):
        asyncio.run(main())
    assert got == [1, 2]


def test_threads_blocked_for_good_never_keep_asyncio_run_waiting() -> None:
    """`asyncio.to_thread` here would leave asyncio.run joining its executor for ever."""
    never = threading.Event()

    def stuck() -> Iterator[int]:
        never.wait()
        yield 1

    async def main() -> None:
        call = asyncio.ensure_future(in_thread(never.wait))
        await asyncio.sleep(0.05)
        call.cancel()
        async with iterate_in_thread(stuck, grace=0.2) as items:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    async for _ in items:
                        pass

    started = time.monotonic()
    try:
        asyncio.run(main())
        assert time.monotonic() - started < 3
    finally:
        never.set()  # let the abandoned threads end
