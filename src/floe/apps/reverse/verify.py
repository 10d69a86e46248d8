"""`floe sync --verify` and `--repair`: does Pendo hold what floe last sent?

For every key in `_floe_sync_snapshot` (what Pendo accepted, with the values as sent and when),
the same fields are read back with Pendo's aggregation API (`PendoClient.read_values`) and compared,
field by field. A value that differs is

- `not_applied`: Pendo accepted the write but does not hold its value, and the record has not been
  updated since floe sent it (`metadata.auto.lastupdated` <= `sent_at`): the write was lost or
  changed on the way;
- `changed_in_pendo`: the record was updated after floe sent it: someone (the UI, another
  integration) changed the value since;
- `missing_id`: Pendo has no record with that id any more.

`--repair` marks the keys that differ as not synced (their snapshot hash is cleared) and runs the
sync, which resends their current warehouse values through the usual path (batches, retries,
outcomes, commit); then it verifies again. The snapshot is read into memory (one small dict per key).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import orjson

from floe.apps.reverse import store
from floe.apps.reverse.config import SyncConfig
from floe.apps.reverse.engine import SyncResult, read_destination, run_sync, select, sync_ends
from floe.config import FloeConfig
from floe.core.destination import RowReader
from floe.core.errors import FloeError
from floe.core.secrets import redact
from floe.destinations.sql import SqlDestination
from floe.infra.threads import in_thread

Kind = Literal["not_applied", "changed_in_pendo", "missing_id"]
KINDS: tuple[Kind, ...] = ("not_applied", "changed_in_pendo", "missing_id")


@dataclass(frozen=True)
class Difference:
    key: str
    field: str
    kind: Kind
    sent: Any  # what floe sent
    pendo: Any  # what Pendo holds (None for a missing id)


@dataclass
class VerifyResult:
    name: str
    target: str
    checked: int = 0  # keys compared
    differences: list[Difference] = field(default_factory=list)
    error: str | None = None
    repair: SyncResult | None = None  # the sync --repair ran
    after: list[Difference] | None = None  # what still differed after the repair

    @property
    def ok(self) -> bool:
        """No error, and Pendo holds what floe sent (after the repair, if one ran)."""
        left = self.differences if self.after is None else self.after
        return self.error is None and not left and (self.repair is None or self.repair.ok)

    def by_field(self) -> dict[str, Counter[str]]:
        counts: dict[str, Counter[str]] = {}
        for d in self.differences:
            counts.setdefault(d.field, Counter())[d.kind] += 1
        return counts


Snapshot = dict[str, tuple[dict[str, Any], int]]  # key -> (values as sent, sent_at epoch ms)


def read_snapshot(dest: SqlDestination, sync: str) -> Snapshot:
    """What Pendo accepted for `sync`, per key (keys synced before floe kept the values are left out)."""
    table = dest.qualified(dest.meta_schema, store.SNAPSHOT)
    sql = (f"SELECT {dest.quote('key')}, sent, sent_at FROM {table} WHERE sync = {store.literal(sync)} "
           "AND sent IS NOT NULL")
    out: Snapshot = {}
    for batch in cast(RowReader, dest).read_batches(sql, batch_size=50_000):
        for key, sent, sent_at in zip(*(c.to_pylist() for c in batch.columns), strict=True):
            out[key] = (orjson.loads(sent), sent_at or 0)
    return out


def compare(snapshot: Snapshot, pendo: dict[str, dict[str, Any]]) -> list[Difference]:
    """Every field whose value in Pendo is not the one floe sent, sorted by key and field."""
    found = []
    for key, (sent, sent_at) in sorted(snapshot.items()):
        record = pendo.get(key)
        for name, value in sorted(sent.items()):
            if record is None:
                found.append(Difference(key, name, "missing_id", value, None))
            elif record.get(name) != value:
                edited = (record.get("lastupdated") or 0) > sent_at
                found.append(Difference(key, name, "changed_in_pendo" if edited else "not_applied", value,
                                        record.get(name)))
    return found


def mark_unsynced(dest: SqlDestination, sync: str, keys: list[str], chunk: int = 500) -> None:
    """Clear the snapshot hash of `keys`, so the next run of `sync` sends them again."""
    table, key = dest.qualified(dest.meta_schema, store.SNAPSHOT), dest.quote("key")
    with dest.transaction() as cur:
        for start in range(0, len(keys), chunk):
            listed = ", ".join(store.literal(k) for k in keys[start:start + chunk])
            cur.execute(f"UPDATE {table} SET hash = NULL WHERE sync = {store.literal(sync)} AND {key} IN ({listed})")


async def verify_sync(config: FloeConfig, name: str) -> VerifyResult:
    """Compare what Pendo holds with what floe last sent for sync `name`; errors are in the result."""
    sync: SyncConfig = config.syncs[name]
    result = VerifyResult(name, f"pendo {sync.to.kind}/{sync.to.group}")
    try:
        async with sync_ends(config, name, sync) as (dest, client):
            if not await in_thread(store.snapshot_exists, dest):
                raise FloeError(f"syncs.{name}: nothing to verify: the sync has not sent anything yet")
            snapshot = await in_thread(read_snapshot, dest, name)
            fields = sorted({f for values, _ in snapshot.values() for f in values})
            pendo = await client.read_values(fields) if snapshot else {}
            result.checked = len(snapshot)
            result.differences = compare(snapshot, pendo)
    except Exception as exc:  # noqa: BLE001 - reported in the result; other syncs go on
        result.error = redact(str(exc)) if isinstance(exc, FloeError) else redact(f"{type(exc).__name__}: {exc}")
    return result


async def repair_sync(config: FloeConfig, name: str, keys: list[str]) -> SyncResult:
    """Resend `keys` (with the sync's other changed rows) through a normal run of sync `name`."""
    dest = read_destination(config, name, config.syncs[name])
    try:
        await in_thread(mark_unsynced, dest, name, keys)
    finally:
        dest.close()
    return await run_sync(config, name)


async def verify_syncs(config: FloeConfig, names: list[str] | None = None, *,
                       repair: bool = False) -> list[VerifyResult]:
    """Verify the named syncs (all by default); with `repair`, resend what differs and verify again."""
    results = []
    for name in select(config, names):
        result = await verify_sync(config, name)
        if repair and result.error is None and result.differences:
            result.repair = await repair_sync(config, name, sorted({d.key for d in result.differences}))
            again = await verify_sync(config, name)
            result.after, result.error = again.differences, again.error
        results.append(result)
    return results
