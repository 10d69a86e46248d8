"""A local emulator of FullStory's Segment Export API (facts: reference/fullstory_hauser.md §2.2).

Flow, every API call needing `Authorization: Basic <api key>` (the raw key):
1. `POST /segments/v1/exports` with `{"segmentId", "type": "TYPE_EVENT", "format": "FORMAT_JSON" |
   "FORMAT_NDJSON", "timeRange": {"start", "end"}, "fields": [...]?}` -> `{"operationId"}`.
2. `GET /operations/v1/{operationId}` -> `{"type": "SEARCH_EXPORT", "state": "PENDING" | "COMPLETED" |
   "FAILED", "estimatePctComplete", "errorDetails", "results": {"searchExportId", "expires"}}`.
3. `GET /search/v1/exports/{searchExportId}/results` -> `{"location": <signed URL>, "expires"}`.
4. `GET <location>` (no auth; the signature and expiry are in the query) -> the gzip file: one JSON
   array (FORMAT_JSON) or one event per line (FORMAT_NDJSON).

Events are a pure function of time: event `k` happens at `k * step + jitter(k)` microseconds since
the Unix epoch (`step = 1 h / events_per_hour`), so any time range has the same events on every
call. They are as irregular as FullStory's own test export (hauser's testdata/raw.json): a field
without a value is mostly left out and sometimes sent as `null`; about two events in three carry no
custom var, and each custom var (`user_*`, `evt_*`, `page_*`, including a list `_strs`, a date-like
text and ints above 2^53) is set on a few events only; ids are int64 above 2^53; some strings are
empty; click and seen events may carry the legacy `EventTargetSelectorTok`; a few keys come in
another casing (`pageUrl`, `USERID`). Exports whose window starts at or after `new_fields_from`
also carry `ReqUrl`/`ReqMethod`/`ReqStatus` on request events and `EventFutureField`, which no
client knows yet.

A request's `fields` (names, or `prefix_*` patterns, matched case-insensitively) restricts every
event to those fields; without `fields` an export has `default_fields` (default: every field, as
FullStory documents). FORMAT_JSON is one element per line for windows starting on an even
hour + day, one minified line otherwise (`json_layout` "lines" or "minified" fixes one). Files are
built by DuckDB (vectorised, see `fullstory_events`) and cached on disk by (range, format, fields, layout), then streamed.

Fault knobs (constructor arguments, or `POST /_sandbox/fullstory/faults` with the same names, or
`app.state.fullstory.faults`): `rate_limit_every` (every Nth API call answers 429 with
`Retry-After: retry_after`), `fail_operations` (the next N exports end FAILED), `expire_links`
(the next N results carry an already expired location), `cut_downloads` (the next N downloads
close the connection half way), `truncate_downloads` (the next N downloads are a well-formed
response whose gzip is cut short).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from floe.sandbox.fullstory_events import (
    COLUMNS,
    LATER_COLUMNS,
    MOBILE_COLUMNS,
    parse_time,
    rfc3339,
    wanted,
    write_events,
)

DEFAULT_API_KEY = "fs-sandbox-key"
FORMATS = {"FORMAT_JSON", "FORMAT_NDJSON"}

@dataclass
class Faults:
    rate_limit_every: int = 0
    retry_after: int = 1
    error_every: int = 0  # every Nth API call answers 503
    fail_operations: int = 0
    expire_links: int = 0
    cut_downloads: int = 0
    truncate_downloads: int = 0


@dataclass
class Export:
    id: str
    start: datetime
    end: datetime
    format: str
    fields: list[str] | None
    created: float
    path: Path | None = None
    failed: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class FullStoryEmulator:
    """The emulator's state; `app.state.fullstory` in a running app."""

    api_key: str = DEFAULT_API_KEY
    events_per_hour: int = 3600
    seed: int = 1
    new_fields_from: datetime | None = None
    default_fields: list[str] | None = None  # what an export without `fields` holds (None: every field)
    json_layout: str = "mixed"  # FORMAT_JSON: "lines", "minified", or "mixed" (by window, see above)
    processing_seconds: float = 0.0  # an export stays in progress at least this long
    link_ttl_seconds: float = 600.0
    cache_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "floe-fullstory-emulator")
    faults: Faults = field(default_factory=Faults)
    exports: dict[str, Export] = field(default_factory=dict)
    operations: dict[str, str] = field(default_factory=dict)  # operation id -> export id
    created: list[dict[str, Any]] = field(default_factory=list)  # every accepted create request
    downloads: int = 0
    api_calls: int = 0
    _secret: bytes = field(default_factory=lambda: os.urandom(16))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _builders: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(2))  # files built at once

    @property
    def step_us(self) -> int:
        return max(1, 3_600_000_000 // self.events_per_hour)

    # --- data ---------------------------------------------------------------------------
    def columns(self, start: datetime, fields: list[str] | None) -> list[tuple[str, str]]:
        cols = list(COLUMNS) + list(MOBILE_COLUMNS)
        if self.new_fields_from is not None and start >= self.new_fields_from:
            cols += LATER_COLUMNS
        fields = self.default_fields if fields is None else fields
        return [(n, e) for n, e in cols if wanted(n, fields)]

    def minified(self, start: datetime) -> bool:
        """Whether a FORMAT_JSON export of the window starting at `start` is one minified line."""
        return self.json_layout == "minified" or (self.json_layout == "mixed" and (start.hour + start.day) % 2 == 1)

    def build(self, export: Export) -> Path:
        """Write (or reuse) the gzip file of `export`."""
        minified = export.format == "FORMAT_JSON" and self.minified(export.start)
        key = orjson.dumps([rfc3339(export.start), rfc3339(export.end), export.format, export.fields,
                            self.default_fields, minified, self.events_per_hour, str(self.new_fields_from),
                            self.seed, 4])
        name = hashlib.sha1(key).hexdigest()[:20]
        path = self.cache_dir / f"{name}.{'ndjson' if export.format == 'FORMAT_NDJSON' else 'json'}.gz"
        if path.exists():
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        write_events(tmp, export.format, minified, self.columns(export.start, export.fields), self.step_us,
                     self.seed, export.start, export.end)
        os.replace(tmp, path)
        return path

    # --- signing --------------------------------------------------------------------------
    def sign(self, export_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{export_id}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def take(self, name: str) -> bool:
        """Consume one unit of a counting fault."""
        with self._lock:
            left = getattr(self.faults, name)
            if left > 0:
                setattr(self.faults, name, left - 1)
                return True
            return False


def _error(status: int, message: str, code: str | None = None) -> Response:
    body: dict[str, Any] = {"code": code or {400: "invalid_argument", 401: "unauthenticated",
                                             404: "not_found", 429: "resource_exhausted"}.get(status, "internal"),
                            "message": message}
    return Response(orjson.dumps(body), status, media_type="application/json")


def create_app(
    api_key: str = DEFAULT_API_KEY,
    events_per_hour: int = 3600,
    new_fields_from: str | None = None,
    processing_seconds: float = 0.0,
    link_ttl_seconds: float = 600.0,
    cache_dir: str | None = None,
    seed: int = 1,
    rate_429: float = 0.0,
    rate_5xx: float = 0.0,
    default_fields: list[str] | None = None,
    json_layout: str = "mixed",
    **faults: int,
) -> Starlette:
    """The emulator as an ASGI app (a module-level factory, so it can run in another process).

    `rate_429`/`rate_5xx` (as in `floe sandbox`) answer that share of API calls with 429 + Retry-After
    or 503; `seed` varies the generated events."""
    if rate_429 > 0 and "rate_limit_every" not in faults:
        faults["rate_limit_every"] = max(1, round(1 / rate_429))
    if rate_5xx > 0:
        faults["error_every"] = max(1, round(1 / rate_5xx))
    emu = FullStoryEmulator(
        api_key=api_key, events_per_hour=events_per_hour,
        new_fields_from=parse_time(new_fields_from) if new_fields_from else None,
        processing_seconds=processing_seconds, link_ttl_seconds=link_ttl_seconds,
        faults=Faults(**faults), seed=seed, default_fields=default_fields, json_layout=json_layout,
    )
    if cache_dir:
        emu.cache_dir = Path(cache_dir)

    def authorized(request: Request) -> Response | None:
        with emu._lock:
            emu.api_calls += 1
            calls = emu.api_calls
        header = request.headers.get("authorization", "")
        if header != f"Basic {emu.api_key}":
            return _error(401, "Unauthorized: invalid API key")
        if emu.faults.error_every and calls % emu.faults.error_every == 0:
            return _error(503, "Service temporarily unavailable")
        every = emu.faults.rate_limit_every
        if every and calls % every == 0:
            response = _error(429, "Too many requests")
            response.headers["Retry-After"] = str(emu.faults.retry_after)
            return response
        return None

    async def create_export(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        try:
            body = orjson.loads(await request.body())
            fmt = body.get("format", "FORMAT_JSON")
            rng = body["timeRange"]
            start, end = parse_time(rng["start"]), parse_time(rng["end"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            return _error(400, f"invalid request body: {exc}")
        if body.get("type", "TYPE_EVENT") != "TYPE_EVENT":
            return _error(400, f"unsupported export type {body.get('type')!r}")
        if fmt not in FORMATS:
            return _error(400, f"unsupported format {fmt!r} (this emulator serves {', '.join(sorted(FORMATS))})")
        if end <= start:
            return _error(400, "timeRange.end must be after timeRange.start")
        fields = body.get("fields") or None
        if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) and f for f in fields)):
            return _error(400, "fields must be a list of field names")
        export = Export(uuid.uuid4().hex, start, end, fmt, fields, time.time())
        if emu.take("fail_operations"):
            export.failed = "export failed: internal error while building the export (injected)"
            export.done.set()
        else:
            def work() -> None:
                try:
                    with emu._builders:
                        export.path = emu.build(export)
                except Exception as exc:  # noqa: BLE001 - reported through the operation
                    export.failed = f"export failed: {exc}"
                export.done.set()

            threading.Thread(target=work, daemon=True).start()
        operation = f"op-{uuid.uuid4().hex[:16]}"
        with emu._lock:
            emu.exports[export.id] = export
            emu.operations[operation] = export.id
            emu.created.append({"segmentId": body.get("segmentId"), "start": rfc3339(start), "end": rfc3339(end),
                                "format": fmt, "fields": export.fields})
        return JSONResponse({"operationId": operation})

    async def operation(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        export_id = emu.operations.get(request.path_params["op"])
        if export_id is None:
            return _error(404, "operation not found")
        export = emu.exports[export_id]
        elapsed = time.time() - export.created
        result: dict[str, Any] = {"id": request.path_params["op"], "type": "SEARCH_EXPORT",
                                  "createdAt": rfc3339(datetime.fromtimestamp(export.created, UTC))}
        if export.failed:
            result.update(state="FAILED", errorDetails=export.failed, estimatePctComplete=100)
        elif export.done.is_set() and elapsed >= emu.processing_seconds:
            expires = datetime.fromtimestamp(time.time() + 7 * 86400, UTC)
            result.update(state="COMPLETED", estimatePctComplete=100,
                          results={"searchExportId": export.id, "expires": rfc3339(expires)})
        else:
            pct = min(99, int(100 * elapsed / emu.processing_seconds)) if emu.processing_seconds else 50
            result.update(state="PENDING", estimatePctComplete=pct)
        return JSONResponse(result)

    async def results(request: Request) -> Response:
        if (denied := authorized(request)) is not None:
            return denied
        export = emu.exports.get(request.path_params["export_id"])
        if export is None or export.path is None:
            return _error(404, "search export not found")
        now = time.time()
        expires = int(now - 60) if emu.take("expire_links") else int(now + emu.link_ttl_seconds)
        suffix = "ndjson" if export.format == "FORMAT_NDJSON" else "json"
        location = (f"{request.base_url}fullstoryapp-search-export/{export.id}.{suffix}.gz"
                    f"?Expires={expires}&Signature={emu.sign(export.id, expires)}")
        return JSONResponse({"location": location,
                             "expires": rfc3339(datetime.fromtimestamp(expires, UTC))})

    async def download(request: Request) -> Response:
        export_id = request.path_params["name"].split(".", 1)[0]
        export = emu.exports.get(export_id)
        try:
            expires = int(request.query_params.get("Expires", "0"))
        except ValueError:
            expires = 0
        signature = request.query_params.get("Signature", "")
        if export is None or export.path is None or not hmac.compare_digest(signature, emu.sign(export_id, expires)):
            return Response(b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SignatureDoesNotMatch</Code>"
                            b"<Message>The request signature we calculated does not match.</Message></Error>",
                            403, media_type="application/xml")
        if expires < time.time():
            return Response(b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
                            b"<Message>Invalid argument.</Message><Details>The provided token has expired."
                            b"</Details></Error>", 400, media_type="application/xml")
        with emu._lock:
            emu.downloads += 1
        path = export.path
        size = path.stat().st_size
        cut = emu.take("cut_downloads")
        truncate = not cut and emu.take("truncate_downloads")
        limit = size // 2 if (cut or truncate) else size

        headers = [(b"content-type", b"application/gzip"), (b"content-length", str(size if cut else limit).encode()),
                   (b"content-disposition", f'attachment; filename="{path.name}"'.encode())]

        class Body(Response):
            """Streams the file; a cut download stops half way without finishing the response."""

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                sent = 0
                with path.open("rb") as f:
                    while sent < limit:
                        chunk = await asyncio.to_thread(f.read, min(1 << 20, limit - sent))
                        if not chunk:
                            break
                        sent += len(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if not cut:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

        return Body()

    async def set_faults(request: Request) -> Response:
        values = orjson.loads(await request.body() or b"{}")
        for name, value in values.items():
            if not hasattr(emu.faults, name):
                return _error(400, f"unknown fault {name!r}")
            setattr(emu.faults, name, int(value))
        return JSONResponse(emu.faults.__dict__)

    async def stats(request: Request) -> Response:
        return JSONResponse({"created": emu.created, "downloads": emu.downloads, "api_calls": emu.api_calls})

    app = Starlette(routes=[
        Route("/segments/v1/exports", create_export, methods=["POST"]),
        Route("/operations/v1/{op}", operation),
        Route("/search/v1/exports/{export_id}/results", results),
        Route("/fullstoryapp-search-export/{name}", download),
        Route("/_sandbox/fullstory/faults", set_faults, methods=["POST"]),
        Route("/_sandbox/fullstory/stats", stats),
    ])
    app.state.fullstory = emu
    return app


def describe(app: Starlette, url: str) -> dict[str, Any]:
    """Credentials and a ready floe.yml source entry for `floe sandbox` / demos."""
    emu: FullStoryEmulator = app.state.fullstory
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {
        "credentials": {"api_key": emu.api_key},
        "sources": {"fullstory": {"type": "fullstory", "api_key": emu.api_key, "base_url": url,
                                  "start_time": rfc3339(start - timedelta(days=2)),
                                  "export_duration": "6h", "export_delay": "1h"}},
    }
