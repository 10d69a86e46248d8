"""floe.infra.threads: blocking work on threads that never keep a run alive."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import floe
from floe.infra.threads import in_thread, iterate_in_thread, prefetch_in_thread


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


def test_floe_never_runs_blocking_work_on_asyncios_default_executor() -> None:
    """`asyncio.run` ends by joining that executor's threads: one call stuck there keeps a failed run
    alive. (The emulators run in their own servers' loops and may.)"""
    root = Path(floe.__file__).parent
    offenders = [f"{path.relative_to(root)}:{number}" for path in sorted(root.rglob("*.py")) if path.parent.name != "sandbox"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if "to_thread(" in line and "in_thread(" not in line or "run_in_executor(None" in line]
    assert offenders == [], "use floe.infra.threads.in_thread / iterate_in_thread"


def test_prefetch_raises_the_producers_error_in_sequence_and_closing_early_joins_the_producer() -> None:
    def failing() -> Iterator[int]:
        yield from range(3)
        raise OSError("disk gone")

    got: list[int] = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch_in_thread(failing(), threading.Event()):
            got.append(item)
    assert got == [0, 1, 2]

    stop = threading.Event()
    pulled: list[int] = []

    def endless() -> Iterator[int]:
        for i in itertools.count():
            if stop.is_set():
                return
            pulled.append(i)
            yield i

    before = threading.active_count()
    items = prefetch_in_thread(endless(), stop, depth=2, name="endless")
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert stop.is_set() and threading.active_count() == before
    assert len(pulled) <= 3 + 2 + 1  # consumed, `depth` queued, one in the producer's hand
