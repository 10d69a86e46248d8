"""Fault injection shared by the emulators: 429 + Retry-After, 5xx, latency and truncated bodies.

`FaultMiddleware` wraps an emulator's ASGI app. Every API request (paths under `/_sandbox/` are
control endpoints and never faulted) draws from a seeded RNG: with probability `rate_429` it gets
a 429 with `Retry-After`, with `rate_5xx` a 500/502/503, with `truncate_rate` a body cut in half
(Content-Length still promising the full body), and every request waits `latency` seconds first.
With `refuse_after` N (>= 0), every request after the first N is refused for good: a 403 with the
API's error body, as when a token is revoked or a plan runs out in the middle of a run.
The knobs can be changed while the server runs (`POST /_sandbox/faults` with a JSON object); the
answer also tells the most API requests that were in progress at once (`most_in_flight`).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

ASGIApp = Callable[..., Any]


@dataclass
class Faults:
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    truncate_rate: float = 0.0
    latency: float = 0.0  # seconds added to every API request
    retry_after: float = 1.0  # seconds sent in Retry-After with each injected 429 (negative: no header)
    seed: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    refuse_after: float = -1  # API requests served before every later one is refused (-1: never)
    in_flight: int = 0  # API requests in progress (from arrival, latency included, to the response)
    most_in_flight: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._requests = 0

    def update(self, values: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)} - {"injected", "in_flight", "most_in_flight"}
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"unknown fault knob {key!r} (known: {', '.join(sorted(names))})")
            setattr(self, key, float(value) if key != "seed" else int(value))
        if "seed" in values:
            self._rng = random.Random(self.seed)
        if "refuse_after" in values:  # counted from now
            self._requests = 0

    def draw(self) -> str | None:
        """Which fault (if any) the next request gets."""
        self._requests += 1
        if 0 <= self.refuse_after < self._requests:
            return "refuse"
        r = self._rng.random()
        if r < self.rate_429:
            return "429"
        if r < self.rate_429 + self.rate_5xx:
            return "5xx"
        if r < self.rate_429 + self.rate_5xx + self.truncate_rate:
            return "truncate"
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"rate_429": self.rate_429, "rate_5xx": self.rate_5xx, "truncate_rate": self.truncate_rate,
                "latency": self.latency, "retry_after": self.retry_after, "seed": self.seed,
                "refuse_after": self.refuse_after, "injected": dict(self.injected),
                "most_in_flight": self.most_in_flight}


ErrorBody = Callable[[int], dict[str, Any]]  # HTTP status -> the API's own error document


class FaultMiddleware:
    """ASGI middleware applying `faults` to every request outside `/_sandbox/`."""

    def __init__(self, app: ASGIApp, faults: Faults, error_body: ErrorBody) -> None:
        self.app = app
        self.faults = faults
        self.error_body = error_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/_sandbox/"):
            if scope["path"] == "/_sandbox/faults":
                await self._control(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        faults = self.faults
        faults.in_flight += 1
        faults.most_in_flight = max(faults.most_in_flight, faults.in_flight)
        try:
            await self._serve(scope, receive, send)
        finally:
            faults.in_flight -= 1

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        faults = self.faults
        if faults.latency:
            await asyncio.sleep(faults.latency)
        fault = faults.draw()
        if fault is None:
            await self.app(scope, receive, send)
            return
        faults.injected[fault] += 1
        if fault == "refuse":
            await _send(send, 403, self.error_body(403), [])
        elif fault == "429":
            hint = [(b"retry-after", str(faults.retry_after).encode())] if faults.retry_after >= 0 else []
            await _send(send, 429, self.error_body(429), hint)
        elif fault == "5xx":
            await _send(send, faults._rng.choice((500, 502, 503)), self.error_body(500), [])
        else:
            await self.app(scope, receive, _Truncating(send))

    async def _control(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "POST" and body:
            try:
                self.faults.update(orjson.loads(body))
            except (ValueError, orjson.JSONDecodeError) as exc:
                await _send(send, 400, {"error": str(exc)}, [])
                return
        await _send(send, 200, self.faults.as_dict(), [])


class _Truncating:
    """Wraps `send`: keeps the promised Content-Length but delivers only half of the body."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.done = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if self.done:
            return
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            self.done = True
            await self.send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": False})
            return
        await self.send(message)


async def _send(send: Any, status: int, document: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    body = orjson.dumps(document)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
