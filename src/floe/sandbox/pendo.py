"""A local emulator of Pendo's metadata and aggregation APIs (facts: reference/singer_pendo.md §3).

Endpoints (all need the `x-pendo-integration-key` header):
- `POST /api/v1/metadata/{visitor|account}/{agent|custom}/value[?create=true]`: a JSON array of
  `{"visitorId"|"accountId": id, "values": {field: value}}`. Answers
  `{"total", "updated", "failed", "missing", "errors"}` with `total = updated + failed` and
  `failed = len(missing) + len(errors)`. Unknown ids are `missing` unless `create=true`; a value of
  the wrong type is an entry `{"id", "error"}` in `errors` (the row is not applied). Malformed JSON or
  a field absent from the schema ("Data Mappings") is a 400 and nothing is applied.
- `GET /api/v1/metadata/schema/{kind}`: `{group: {field: {"type": ..., ...}}}`. Pendo's key casing
  is not documented and answers vary: with `schema_casing="mixed"` (the default) every other field
  is spelled `{"Type": ..., "DisplayName": ...}`; "camel" and "pascal" use one casing throughout. A
  field whose type is None in `schema` is answered without a type.
- `POST /api/v1/aggregation`: a small subset of pipelines over visitors/accounts (source, identified,
  filter, select, sort, limit, count).

Knobs (arguments of `create_app`): `latency` seconds per call; `time_limit` (Pendo: 300 s) and
`seconds_per_record`: a call whose records × cost exceeds the limit answers 408 and applies nothing;
`rate_limit_every`: every Nth metadata call answers 429 with `Retry-After: retry_after`; `rate_429` /
`rate_5xx`: shares of metadata calls answered 429 / 503 (seeded by `seed`); faults queued with
`store.inject(status, count)` or `POST /_sandbox/pendo/faults`; `reject`: ids answered as row errors.

Writes that go wrong without an error (what `floe sync --verify` must find): `drop_rate` / `alter_rate`
(seeded shares of records) and `store.drop` / `store.alter` (`{id: times}`, or `POST
/_sandbox/pendo/writes {"drop": [...], "alter": [...]}`) make records answered as `updated` but not
applied (dropped) or applied with other values (altered: text halved, numbers + 1, booleans flipped).
`store.edit(kind, group, id, values)` (or `POST /_sandbox/pendo/edit`) changes values as someone in
Pendo's UI would, stamping `metadata.auto.lastupdated`.

Tests read back what it holds from `app.state.pendo` (a `PendoStore`) or `GET /_sandbox/pendo/{kind}`.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

KINDS = ("visitor", "account")
GROUPS = ("agent", "custom")
ID_KEYS = {"visitor": "visitorId", "account": "accountId"}
PENDO_TYPES = ("string", "boolean", "integer", "float", "time")

Schema = dict[str, dict[str, dict[str, str | None]]]  # kind -> group -> field -> type (None: not given)
DEFAULT_SCHEMA: Schema = {
    "account": {
        "agent": {"name": "string", "planlevel": "string"},
        "custom": {"plan": "string", "seats": "integer", "mrr": "float", "active": "boolean",
                   "renewal_date": "time", "region": "string"},
    },
    "visitor": {
        "agent": {"email": "string", "full_name": "string", "role": "string"},
        "custom": {"plan": "string", "logins": "integer", "score": "float", "is_admin": "boolean",
                   "signed_up": "time"},
    },
}

# Exact Python types a JSON value of each Pendo type may decode to (`type(True)` is bool, not int).
_NONE = type(None)
_TYPES: dict[str, frozenset[type]] = {
    "string": frozenset({str, _NONE}),
    "boolean": frozenset({bool, _NONE}),
    "integer": frozenset({int, _NONE}),
    "float": frozenset({int, float, _NONE}),
    "time": frozenset({int, str, _NONE}),
}
_ANY = frozenset({str, bool, int, float, list, dict, _NONE})


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None, option: int = 0) -> Response:
    return Response(orjson.dumps(data, option=option), status, headers=headers, media_type="application/json")


def _text(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(message, status, headers=headers, media_type="text/plain")


@dataclass
class PendoStore:
    """What the emulator holds: records per kind (`{id: {"auto"|"agent"|"custom": {...}}}`), the
    metadata schema, queued faults and call statistics."""

    schema: Schema
    records: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(
        default_factory=lambda: {k: {} for k in KINDS})
    faults: deque[tuple[int, float]] = field(default_factory=deque)
    calls: int = 0  # metadata value calls received (faulted ones included)
    records_received: int = 0  # records in calls that were applied
    statuses: dict[int, int] = field(default_factory=dict)
    inflight: int = 0
    max_inflight: int = 0  # most metadata value calls in progress at once
    largest_call: int = 0  # most records in one applied call
    largest_body: int = 0  # most bytes in one call's body
    reject: dict[str, str] = field(default_factory=dict)  # id -> error Pendo reports for that row
    drop: dict[str, int] = field(default_factory=dict)  # id -> writes still to answer `updated` but not apply
    alter: dict[str, int] = field(default_factory=dict)  # id -> writes still to apply with altered values
    dropped: int = 0  # records answered `updated` but not applied
    altered: int = 0  # records applied with other values than sent

    def add(self, kind: str, ids: list[str], **custom: Any) -> None:
        """Create records (as the Pendo snippet would) with optional custom values."""
        now = int(time.time() * 1000)
        table = self.records[kind]
        for record_id in ids:
            table[record_id] = {"auto": {"id": record_id, "lastupdated": now}, "agent": {},
                                "custom": dict(custom)}

    def values(self, kind: str, group: str = "custom") -> dict[str, dict[str, Any]]:
        """`{id: {field: value}}` of one group (records without values in it included, as `{}`)."""
        return {rid: dict(rec.get(group, {})) for rid, rec in self.records[kind].items()}

    def edit(self, kind: str, group: str, record_id: str, values: dict[str, Any]) -> None:
        """Change values as a user in Pendo's UI would (the record's `lastupdated` moves)."""
        record = self.records[kind][record_id]
        record[group].update(values)
        record["auto"]["lastupdated"] = int(time.time() * 1000)

    def inject(self, status: int, count: int = 1, retry_after: float = 0) -> None:
        """Make the next `count` metadata value calls answer `status` (429 carries Retry-After)."""
        self.faults.extend([(status, retry_after)] * count)

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "records_received": self.records_received,
                "statuses": dict(self.statuses), "max_inflight": self.max_inflight,
                "largest_call": self.largest_call, "largest_body": self.largest_body,
                "counts": {k: len(v) for k, v in self.records.items()}}


def create_app(
    *,
    integration_key: str | None = "sandbox-pendo-key",
    schema: Schema | None = None,
    schema_casing: Literal["camel", "pascal", "mixed"] = "mixed",
    accounts: list[str] | None = None,
    visitors: list[str] | None = None,
    latency: float = 0.0,
    time_limit: float = 300.0,
    seconds_per_record: float = 0.0,
    rate_limit_every: int = 0,
    retry_after: float = 1.0,
    reject: dict[str, str] | None = None,
    rate_429: float = 0.0,
    rate_5xx: float = 0.0,
    drop_rate: float = 0.0,
    alter_rate: float = 0.0,
    seed: int = 1,
) -> Starlette:
    """The emulator app. `integration_key=None` accepts any non-empty key; `reject` maps ids to a
    per-row error. `app.state.pendo` is its store."""
    store = PendoStore(schema={k: {g: dict(f) for g, f in v.items()} for k, v in (schema or DEFAULT_SCHEMA).items()})
    for kind in KINDS:
        store.schema.setdefault(kind, {}).setdefault("agent", {})
        store.schema[kind].setdefault("custom", {})
    store.add("account", accounts or [])
    store.add("visitor", visitors or [])
    store.reject.update(reject or {})
    rng = random.Random(seed)

    def unauthorized(request: Request) -> Response | None:
        key = request.headers.get("x-pendo-integration-key")
        if not key or (integration_key is not None and key != integration_key):
            return _text("Unauthorized: missing or invalid x-pendo-integration-key", 401)
        return None

    def count(status: int) -> None:
        store.statuses[status] = store.statuses.get(status, 0) + 1

    async def set_values(request: Request) -> Response:
        store.calls += 1
        store.inflight += 1
        store.max_inflight = max(store.max_inflight, store.inflight)
        try:
            if latency:
                await asyncio.sleep(latency)
            body = await request.body()
            store.largest_body = max(store.largest_body, len(body))
            response = _set_values(request, body)
        finally:
            store.inflight -= 1
        count(response.status_code)
        return response

    def _set_values(request: Request, body: bytes) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        kind, group = request.path_params["kind"], request.path_params["group"]
        if kind not in KINDS or group not in GROUPS:
            return _text(f"Not Found: no metadata {kind}/{group}", 404)
        if store.faults:
            status, wait = store.faults.popleft()
            return _text(HTTPStatus(status).phrase, status, {"Retry-After": f"{wait:g}"} if status == 429 else None)
        if rate_limit_every and store.calls % rate_limit_every == 0:
            return _text("Too Many Requests", 429, {"Retry-After": f"{retry_after:g}"})
        if rate_429 or rate_5xx:
            draw = rng.random()
            if draw < rate_429:
                return _text("Too Many Requests", 429, {"Retry-After": f"{retry_after:g}"})
            if draw < rate_429 + rate_5xx:
                return _text("Service Unavailable", 503)
        try:
            records = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _text(f"The format is unacceptable due to malformed JSON: {exc}", 400)
        if not isinstance(records, list):
            return _text("The format is unacceptable due to malformed JSON: the body must be a JSON array", 400)
        if seconds_per_record and len(records) * seconds_per_record > time_limit:
            return _text("The call took too long and timed out.", 408)
        id_key, fields = ID_KEYS[kind], store.schema[kind][group]
        allowed = {name: _TYPES.get(t or "", _ANY) for name, t in fields.items()}
        bad: dict[int, list[str]] = {}  # record index -> type errors
        # Pass 1 validates everything (a 400 applies nothing); a tight loop: this is the hot path.
        for i, rec in enumerate(records):
            if type(rec) is not dict or type(values := rec.get("values")) is not dict or \
                    rec.get(id_key) in (None, ""):
                return _text(f"The format is unacceptable due to malformed JSON: item {i} needs "
                             f"{id_key} and a values object", 400)
            for name, v in values.items():
                ok = allowed.get(name)
                if ok is None:
                    unknown = sorted(values.keys() - fields.keys())
                    return _text("The format is unacceptable due to missing field mappings: "
                                 f"{kind} {group} field(s) {', '.join(unknown)} do not exist", 400)
                if type(v) not in ok:
                    bad.setdefault(i, []).append(f"{name}: expected {fields[name]}, got {type(v).__name__}")
        create = request.query_params.get("create", "").lower() == "true"
        table, now, reject = store.records[kind], int(time.time() * 1000), store.reject
        missing: list[str] = []
        errors: list[dict[str, str]] = []
        updated = 0
        for i, rec in enumerate(records):
            rid = rec[id_key]
            if type(rid) is not str:
                rid = str(rid)
            if bad and i in bad or reject and rid in reject:
                errors.append({"id": rid, "error": "; ".join(bad.get(i, ())) or reject[rid]})
                continue
            record = table.get(rid)
            if record is None:
                if not create:
                    missing.append(rid)
                    continue
                record = table[rid] = {"auto": {"id": rid}, "agent": {}, "custom": {}}
            updated += 1
            if _fate(store.drop, rid) or drop_rate and rng.random() < drop_rate:
                store.dropped += 1
                continue
            values = rec["values"]
            if _fate(store.alter, rid) or alter_rate and rng.random() < alter_rate:
                store.altered += 1
                values = {name: _altered(v) for name, v in values.items()}
            record[group].update(values)
            record["auto"]["lastupdated"] = now
        store.records_received += len(records)
        store.largest_call = max(store.largest_call, len(records))
        failed = len(missing) + len(errors)
        return _json({"total": updated + failed, "updated": updated, "failed": failed,
                      "missing": missing, "errors": errors})

    async def get_schema(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        kind = request.path_params["kind"]
        if kind not in KINDS:
            return _text(f"Not Found: no metadata kind {kind}", 404)
        auto: dict[str, str | None] = {"id": "string", "lastupdated": "time"}
        groups = {"auto": auto, **store.schema[kind]}
        out: dict[str, dict[str, Any]] = {}
        for group, fields in groups.items():
            out[group] = {}
            for i, (name, type_) in enumerate(fields.items()):
                pascal = schema_casing == "pascal" or (schema_casing == "mixed" and i % 2 == 1)
                out[group][name] = _field(type_, pascal)
        return _json(out)

    async def aggregation(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        try:
            query = orjson.loads(await request.body())
            pipeline = query["request"]["pipeline"]
            return _json({"results": _run_pipeline(store, pipeline)})
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return _text(f"Bad Request: invalid aggregation: {exc}", 400)

    async def sandbox_records(request: Request) -> Response:
        return _json(store.records.get(request.path_params["kind"], {}))

    async def sandbox_stats(request: Request) -> Response:
        return _json(store.stats(), option=orjson.OPT_NON_STR_KEYS)

    async def sandbox_writes(request: Request) -> Response:
        data = orjson.loads(await request.body())
        for what, table in (("drop", store.drop), ("alter", store.alter)):
            for rid in data.get(what, []):
                table[str(rid)] = table.get(str(rid), 0) + 1
        return _json({"drop": len(store.drop), "alter": len(store.alter)})

    async def sandbox_edit(request: Request) -> Response:
        data = orjson.loads(await request.body())
        try:
            store.edit(data["kind"], data.get("group", "custom"), str(data["id"]), data["values"])
        except KeyError as exc:
            return _text(f"Not Found: {exc}", 404)
        return _json({"edited": data["id"]})

    async def sandbox_faults(request: Request) -> Response:
        data = orjson.loads(await request.body())
        store.inject(int(data["status"]), int(data.get("count", 1)), float(data.get("retry_after", 0)))
        return _json({"queued": len(store.faults)})

    app = Starlette(routes=[
        Route("/api/v1/metadata/schema/{kind}", get_schema, methods=["GET"]),
        Route("/api/v1/metadata/{kind}/{group}/value", set_values, methods=["POST"]),
        Route("/api/v1/aggregation", aggregation, methods=["POST"]),
        Route("/_sandbox/pendo/stats", sandbox_stats, methods=["GET"]),
        Route("/_sandbox/pendo/faults", sandbox_faults, methods=["POST"]),
        Route("/_sandbox/pendo/writes", sandbox_writes, methods=["POST"]),
        Route("/_sandbox/pendo/edit", sandbox_edit, methods=["POST"]),
        Route("/_sandbox/pendo/records/{kind}", sandbox_records, methods=["GET"]),
    ])
    app.state.pendo = store
    app.state.pendo_key = integration_key
    return app


def describe(app: Any, url: str) -> dict[str, Any]:
    """Credentials for `floe sandbox` (Pendo is a sync target: it feeds no source)."""
    key = app.state.pendo_key
    return {"credentials": {"base_url": url, "integration_key": key or "(any non-empty key)"}, "sources": {}}


def _fate(table: dict[str, int], record_id: str) -> bool:
    """Take one from `table[record_id]` if any is left."""
    left = table.get(record_id, 0)
    if left <= 0:
        return False
    table[record_id] = left - 1
    return True


def _altered(value: Any) -> Any:
    """Another value of the same type: text halved, numbers plus one, booleans flipped."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value[: len(value) // 2]
    return value


def _field(kind: str | None, pascal: bool) -> dict[str, Any]:
    """A schema entry with the attributes tap-pendo reads, camelCase or PascalCase; no type if None."""
    entry = {"type": kind, "displayName": "", "elementType": "", "elementFormat": "", "dirty": False,
             "isHidden": False, "isDeleted": False, "isCalculated": False, "isPerApp": False,
             "neverIndex": False}
    if kind is None:
        del entry["type"]
    return {key[0].upper() + key[1:]: value for key, value in entry.items()} if pascal else entry


_FILTER = re.compile(r'^\s*(len\(\s*)?([A-Za-z_][\w.]*)\s*\)?\s*(==|!=|>=|<=|>|<)\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false)\s*$')
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
}


def _path(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _compare(row: dict[str, Any], expr: str) -> bool:
    match = _FILTER.match(expr)
    if not match:
        raise ValueError(f"unsupported filter {expr!r}")
    use_len, path, op, literal = match.groups()
    value = _path(row, path)
    if use_len:
        value = len(value) if value is not None else 0
    wanted = orjson.loads(literal)
    if value is None:
        return False
    try:
        return _OPS[op](value, wanted)
    except TypeError:
        return False


def _sort_key(path: str) -> Callable[[dict[str, Any]], tuple[bool, Any]]:
    def key(row: dict[str, Any]) -> tuple[bool, Any]:
        value = _path(row, path)
        return value is None, value
    return key


def _run_pipeline(store: PendoStore, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for step in pipeline:
        (name, arg), = step.items()
        if name == "source":
            (what, _), = arg.items()
            kind = {"visitors": "visitor", "accounts": "account"}.get(what)
            if kind is None:
                raise ValueError(f"unsupported source {what!r}")
            id_key = ID_KEYS[kind]
            rows = [{id_key: rid, "metadata": rec} for rid, rec in store.records[kind].items()]
        elif name == "identified":
            rows = [r for r in rows if not str(r.get(arg, "")).startswith("_PENDO_T_")]
        elif name == "filter":
            rows = [r for r in rows if _compare(r, arg)]
        elif name == "select":
            rows = [{out: _path(r, expr) for out, expr in arg.items()} for r in rows]
        elif name == "sort":
            for key in reversed(arg):
                rows.sort(key=_sort_key(key.lstrip("-")), reverse=key.startswith("-"))
        elif name == "limit":
            rows = rows[: int(arg)]
        elif name == "count":
            rows = [{"count": len(rows)}]
        else:
            raise ValueError(f"unsupported pipeline step {name!r}")
    return rows
