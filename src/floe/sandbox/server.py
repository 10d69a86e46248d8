"""Runs an ASGI app (an emulator) on a free loopback port, in a thread or in a child process.

A thread is enough for tests; benchmarks use a process so that the emulator does not share the
GIL with the floe run being measured.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"emulator did not start listening on port {port} within {timeout}s")


@dataclass
class RunningServer:
    """A started emulator. `url` has no trailing slash. Call `stop()` (or use as a context manager)."""

    url: str
    app: Any
    _stop: Callable[[], None]

    def stop(self) -> None:
        self._stop()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _config(app: Any, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def serve_in_thread(app: Any, port: int | None = None) -> RunningServer:
    """Start `app` in a daemon thread; returns once it accepts connections."""
    port = port or free_port()
    server = uvicorn.Server(_config(app, port))
    thread = threading.Thread(target=server.run, daemon=True, name=f"emulator:{port}")
    thread.start()
    _wait_listening(port)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return RunningServer(f"http://127.0.0.1:{port}", app, stop)


def _run_factory(factory: Callable[..., Any], kwargs: dict[str, Any], port: int) -> None:
    uvicorn.Server(_config(factory(**kwargs), port)).run()


def serve_in_process(factory: Callable[..., Any], port: int | None = None, **kwargs: Any) -> RunningServer:
    """Start `factory(**kwargs)` (a module-level app factory) in a child process."""
    port = port or free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=_run_factory, args=(factory, kwargs, port), daemon=True
    )
    process.start()
    _wait_listening(port, timeout=60)

    def stop() -> None:
        process.terminate()
        process.join(timeout=10)

    return RunningServer(f"http://127.0.0.1:{port}", None, stop)
