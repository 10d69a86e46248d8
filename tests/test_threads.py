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
from floe.infra.threads import WorkerThreads, in_thread, iterate_in_thread, prefetch_in_thread


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


def test_worker_threads_keep_at_most_size_threads_and_hand_back_results_errors_and_context() -> None:
    import contextvars

    request = contextvars.ContextVar("request", default="none")
    workers = WorkerThreads(2, "floe-test-worker")
    gate = threading.Barrier(2, timeout=5)  # two calls must run at once to pass it

    def work(n: int) -> tuple[int, str, str]:
        if n < 2:
            gate.wait()
        if n == 5:
            raise ValueError("five")
        return n * n, threading.current_thread().name, request.get()

    async def main() -> list[object]:
        request.set("r1")
        calls = [workers.call(work, n) for n in range(8)]
        return await asyncio.gather(*calls, return_exceptions=True)

    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "floe-test-worker"]

    try:
        results = asyncio.run(main())
        assert [r[0] for r in results if isinstance(r, tuple)] == [0, 1, 4, 9, 16, 36, 49]
        assert isinstance(results[5], ValueError) and str(results[5]) == "five"
        assert {r[1] for r in results if isinstance(r, tuple)} == {"floe-test-worker"}
        assert {r[2] for r in results if isinstance(r, tuple)} == {"r1"}  # the caller's context
        assert len(threads()) == 2 and all(t.daemon for t in threads())
        asyncio.run(main())  # a later run's calls go to the same threads
        assert len(threads()) == 2
    finally:
        workers.close()
    deadline = time.monotonic() + 5
    while threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() == []


def test_a_cancelled_worker_call_is_abandoned_and_the_thread_serves_the_next() -> None:
    workers = WorkerThreads(1, "floe-test-worker-1")
    release = threading.Event()

    async def main() -> str:
        slow = asyncio.ensure_future(workers.call(release.wait, 5))
        await asyncio.sleep(0.05)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        after = asyncio.ensure_future(workers.call(lambda: threading.current_thread().name))
        await asyncio.sleep(0.05)
        assert not after.done()  # behind the abandoned call, on the one thread
        release.set()
        return await asyncio.wait_for(after, 5)

    try:
        assert asyncio.run(main()) == "floe-test-worker-1"
    finally:
        release.set()
        workers.close()
