"""The `syncs:` section of floe.yml: warehouse rows -> a SaaS tool (today: Pendo metadata).

```yaml
syncs:
  pendo_accounts:
    from: warehouse                      # a configured SQL destination, read as a source of rows
    query: select account_id, plan, seats from analytics.accounts   # or table: analytics.accounts
    to: {type: pendo, integration_key: "${PENDO_KEY}", kind: account, group: custom, region: us}
    key: {account_id: accountId}         # warehouse column -> Pendo id field
    fields: {plan: plan, seats: seats}   # warehouse column -> Pendo metadata field
    mode: update                         # update: existing records only | upsert: create=true
    deletes: clear                       # ignore (default) | clear: empty floe's fields of keys gone from the rows
    max_deletes: 10%                     # with clear: stop (unless --force) above this many keys (or share)
```
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from floe.core.settings import Model

REGIONS = {"us": "https://app.pendo.io", "eu": "https://app.eu.pendo.io"}
ID_FIELDS = {"account": "accountId", "visitor": "visitorId"}
_PENDO_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _share(text: str) -> float | None:
    """`"10%"` -> 10.0; None unless a percentage between 0 and 100."""
    number = text.strip().removesuffix("%")
    if number == text.strip():
        return None
    try:
        share = float(number)
    except ValueError:
        return None
    return share if 0 <= share <= 100 else None


class PendoTarget(Model):
    """Where a sync writes: one Pendo metadata kind and group. `base_url` overrides `region`."""

    type: Literal["pendo"]
    integration_key: SecretStr
    kind: Literal["account", "visitor"]
    group: Literal["custom", "agent"] = "custom"
    region: Literal["us", "eu"] = "us"
    base_url: str | None = None
    batch_rows: int = Field(default=1000, ge=1, le=100_000, description="Records per request at most.")
    batch_bytes: int = Field(default=5_000_000, ge=1_000, description="JSON bytes per request at most.")
    concurrency: int = Field(default=4, ge=1, le=64, description="Requests in flight at most.")
    timeout: float = Field(default=330.0, gt=0, description="Seconds per request (Pendo's own limit is 300).")
    max_retries: int = Field(default=6, ge=0, le=20, description="Retries of 429/5xx/connection errors.")
    backoff_base: float = Field(default=0.5, ge=0, description="First retry delay in seconds (doubles).")

    @property
    def url(self) -> str:
        return (self.base_url or REGIONS[self.region]).rstrip("/")

    @property
    def id_field(self) -> str:
        return ID_FIELDS[self.kind]


class SyncConfig(Model):
    """One sync: rows of `query` (or `table`) in destination `from` -> Pendo `to`."""

    source: str = Field(alias="from", description="A configured destination to read rows from.")
    query: str | None = None
    table: str | None = None
    to: PendoTarget
    key: dict[str, str]
    fields: dict[str, str]
    mode: Literal["update", "upsert"] = "update"
    deletes: Literal["ignore", "clear"] = Field(default="ignore", description=(
        "Keys floe synced before that are gone from the rows: ignore them, or clear the fields floe set."))
    max_deletes: int | str | None = Field(default=None, description=(
        "With deletes: clear, the most keys one run may clear: a count (100) or a share of the keys "
        "synced before (\"10%\"); above it the sync stops unless --force. Default: no limit."))

    @field_validator("key")
    @classmethod
    def _one_key(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) != 1:
            raise PydanticCustomError("sync_key", "must map exactly one column to accountId or visitorId")
        return value

    @field_validator("fields")
    @classmethod
    def _field_names(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise PydanticCustomError("sync_fields", "must map at least one column to a Pendo field")
        bad = [f for f in value.values() if not _PENDO_FIELD.match(f)]
        if bad:
            raise PydanticCustomError(
                "sync_fields", "a Pendo field name holds letters, digits and _ and starts with a letter or _: {bad}",
                {"bad": ", ".join(bad)})
        if len(set(value.values())) != len(value):
            raise PydanticCustomError("sync_fields", "two columns map to the same Pendo field")
        return value

    @field_validator("max_deletes")
    @classmethod
    def _limit(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0 or isinstance(value, str) and _share(value) is None:
            raise PydanticCustomError("sync_max_deletes", "a count (0 or more) or a share like \"10%\"")
        return value

    def delete_limit(self, synced: int) -> int | None:
        """The most keys a run may clear when `synced` keys were synced before (None: no limit)."""
        if self.max_deletes is None:
            return None
        if isinstance(self.max_deletes, int):
            return self.max_deletes
        share = _share(self.max_deletes)
        assert share is not None
        return int(synced * share / 100)

    @model_validator(mode="after")
    def _consistent(self) -> SyncConfig:
        if (self.query is None) == (self.table is None):
            raise PydanticCustomError("sync_rows", "give exactly one of query: or table:")
        (target,) = self.key.values()
        if target != self.to.id_field:
            raise PydanticCustomError(
                "sync_key", "key: a {kind} sync maps its key column to {want}, not {got}",
                {"kind": self.to.kind, "want": self.to.id_field, "got": target})
        return self

    @property
    def key_column(self) -> str:
        return next(iter(self.key))

    def relation(self, quote: object) -> str:
        """The rows as a SQL relation: `(query)` or the quoted `table` (schema.table allowed)."""
        if self.query is not None:
            return "(" + self.query.strip().rstrip(";") + ")"
        assert self.table is not None and callable(quote)
        return "(SELECT * FROM " + ".".join(quote(p) for p in self.table.split(".")) + ")"
