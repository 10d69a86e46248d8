"""Pendo's metadata API as a sync target: read the metadata schema, send one bulk update.

Retries of 429/5xx/connection errors (honouring Retry-After) are `floe.infra.http`'s; a 408 (the call
ran past Pendo's time limit) reaches the caller as `ApiError(status=408)` so the sync can split the
batch. Not a warehouse destination: it is not in the destinations registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from floe.apps.reverse.config import PendoTarget
from floe.core.errors import FloeError
from floe.infra.http import ApiError, HttpClient

# Pendo field type -> what the warehouse column may be (Arrow type families, see syncs.values).
PENDO_TYPES = ("string", "integer", "float", "boolean", "time")


class PendoError(FloeError):
    """Pendo refused the sync (bad mapping, auth, malformed answer)."""


@dataclass
class Outcome:
    """Per-row result of one bulk update. `errors` maps id -> Pendo's message."""

    updated: int = 0
    missing: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    unattributed: list[str] = field(default_factory=list)  # error messages without an id


class PendoClient:
    def __init__(self, target: PendoTarget) -> None:
        self.target = target
        self.http = HttpClient(
            "pendo", target.url,
            headers={"content-type": "application/json", "accept": "application/json"},
            credentials={"x-pendo-integration-key": target.integration_key.get_secret_value()},
            timeout=target.timeout, max_concurrency=target.concurrency, max_retries=target.max_retries,
            backoff_base=target.backoff_base,
        )
        self.path = f"/api/v1/metadata/{target.kind}/{target.group}/value"

    async def schema(self) -> dict[str, dict[str, str | None]]:
        """`{group: {field: type}}` of the target kind, from `GET /api/v1/metadata/schema/{kind}`
        (see `field_type`; None where Pendo gives no type)."""
        data = await self.http.get_json(f"/api/v1/metadata/schema/{self.target.kind}")
        if not isinstance(data, dict):
            raise PendoError(f"pendo: metadata schema of {self.target.kind} is not a JSON object")
        return {group: {name: field_type(attrs) for name, attrs in fields.items()}
                for group, fields in data.items() if isinstance(fields, dict)}

    async def update(self, body: bytes, create: bool) -> Outcome:
        """POST one JSON array of records; raises ApiError (status 408 included) when Pendo refuses it."""
        response = await self.http.request(
            "POST", self.path, content=body, params={"create": "true"} if create else None)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ApiError("pendo", "bulk update answered with a body that is not JSON",
                           status=response.status_code, url=self.path) from None
        if not isinstance(data, dict):
            raise ApiError("pendo", "bulk update answered with JSON that is not an object",
                           status=response.status_code, url=self.path)
        return parse_outcome(data, self.target.id_field)

    async def read_values(self, fields: list[str], page_rows: int = 5_000,
                          only: str | None = None) -> dict[str, dict[str, Any]]:
        """`{id: {"lastupdated": ms, field: value, ...}}` of every record of the target kind (or of
        the one id `only`), read back with the aggregation API: pages sorted by id, each after the
        last id read (tap-pendo's pattern)."""
        target = self.target
        source = {"accounts" if target.kind == "account" else "visitors": None}
        select = {"id": target.id_field, "lastupdated": "metadata.auto.lastupdated",
                  **{f"v{i}": f"metadata.{target.group}.{name}" for i, name in enumerate(fields)}}
        out: dict[str, dict[str, Any]] = {}
        after: str | None = None
        while True:
            steps: list[dict[str, Any]] = [{"source": source}]
            if only is not None:
                steps.append({"filter": f"{target.id_field} == {orjson.dumps(only).decode()}"})
            if after is not None:
                steps.append({"filter": f"{target.id_field} > {orjson.dumps(after).decode()}"})
            steps += [{"sort": [target.id_field]}, {"limit": page_rows}, {"select": select}]
            body = {"response": {"mimeType": "application/json"}, "request": {"pipeline": steps}}
            response = await self.http.request("POST", "/api/v1/aggregation", content=orjson.dumps(body))
            try:
                data = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise PendoError("pendo: aggregation answered with a body that is not JSON") from None
            rows = data.get("results") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise PendoError("pendo: aggregation answered without a results list")
            for row in rows:
                out[str(row["id"])] = {"lastupdated": row.get("lastupdated"),
                                       **{name: row.get(f"v{i}") for i, name in enumerate(fields)}}
            if len(rows) < page_rows or only is not None:
                return out
            after = str(rows[-1]["id"])

    async def aclose(self) -> None:
        await self.http.aclose()


def field_type(attrs: Any) -> str | None:
    """A schema entry's type, lower-cased, its key read case-insensitively (`type`, `Type`: Pendo's
    casing is not documented and answers vary); None when it has no non-empty text type."""
    if isinstance(attrs, dict):
        for key, value in attrs.items():
            if isinstance(key, str) and key.lower() == "type" and isinstance(value, str) and value.strip():
                return value.strip().lower()
    return None


def parse_outcome(data: dict[str, Any], id_field: str) -> Outcome:
    """Read `{total, updated, failed, missing, errors}`. Pendo does not document the shape of an
    error: an object with `id` (or the id field) is attributed to that row; anything else is not."""
    outcome = Outcome(updated=int(data.get("updated") or 0),
                      missing=[str(m) for m in data.get("missing") or []])
    for error in data.get("errors") or []:
        if isinstance(error, dict) and (rid := error.get("id", error.get(id_field))) is not None:
            message = error.get("error") or error.get("message") or error.get("reason") or orjson.dumps(error).decode()
            outcome.errors[str(rid)] = str(message)[:1000]
        else:
            outcome.unattributed.append(str(error)[:1000])
    failed = int(data.get("failed") or 0)
    counted = len(outcome.missing) + len(outcome.errors) + len(outcome.unattributed)
    if failed > counted:
        outcome.unattributed.append(f"Pendo reported {failed} failed records but named only {counted}")
    return outcome
