"""`floe explain SYNC ID`: from a value in Pendo back to the load that brought it into the warehouse.

The chain, each link read where floe keeps it:

1. what Pendo holds for the id now (the aggregation API, as `--verify` reads it);
2. what floe last sent for it, when, and from which sync run (`_floe_sync_snapshot`: `sent`,
   `sent_at`, `_floe_load_id`), and that run's `_floe_loads` row;
3. the sync's rows for that id in the warehouse now (its query, filtered on the key);
4. the loads those rows came from: the `_floe_load_id`s the rows carried when floe sent them
   (`_floe_sync_snapshot.load_ids`; recorded when the rows have a `_floe_load_id` column) and the
   ones they carry now, each with its `_floe_loads` row and the source position it read: the state
   committed with it in `_floe_state` (where the read ended: window, file or page) beside the
   version before it (where it began).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pyarrow as pa

from floe.apps.reverse import store
from floe.apps.reverse.config import SyncConfig
from floe.apps.reverse.engine import read_destination
from floe.apps.reverse.pendo import PendoClient
from floe.config import FloeConfig
from floe.core.destination import RowReader
from floe.core.errors import ConfigError, FloeError
from floe.core.secrets import redact
from floe.destinations.sql import LOADS_TABLE, STATE_TABLE, SqlDestination
from floe.infra.threads import in_thread


@dataclass
class LoadLink:
    """One load of warehouse rows: its `_floe_loads` row and the source positions around it."""

    load_id: str
    load: dict[str, Any] | None = None  # None: no such load in `_floe_loads`
    read_to: Any = None  # the state committed with the load (where its read ended)
    read_from: Any = None  # the state version before it (where its read began; None: the start)
    version: int | None = None


@dataclass
class Explanation:
    sync: str
    key: str
    target: str
    fields: dict[str, str]  # warehouse column -> Pendo field
    pendo: dict[str, Any] | None = None  # None: no such record in Pendo
    sent: dict[str, Any] | None = None  # None: floe has not sent this id (or has cleared it)
    sent_at: int | None = None
    sync_run: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # the sync's rows for the id now
    loads: list[LoadLink] = field(default_factory=list)
    sent_load_ids: list[str] = field(default_factory=list)  # the rows' load ids when floe sent them

    def as_json(self) -> dict[str, Any]:
        return {"sync": self.sync, "key": self.key, "target": self.target, "pendo": self.pendo,
                "sent": self.sent, "sent_at": self.sent_at, "sync_run": self.sync_run, "rows": self.rows,
                "sent_load_ids": self.sent_load_ids,
                "loads": [link.__dict__ for link in self.loads]}


def _rows(dest: SqlDestination, sql: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for batch in cast(RowReader, dest).read_batches(sql, batch_size=1_000):
        out += pa.Table.from_batches([batch]).to_pylist()
    return out


def _json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def split_load_ids(value: Any) -> list[str]:
    """Load ids from a `_floe_load_id` value: one id, or several joined by commas (an aggregate)."""
    if value is None:
        return []
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _load(dest: SqlDestination, load_id: str) -> LoadLink:
    lit, meta = store.literal(load_id), dest.meta_schema
    link = LoadLink(load_id)
    loads = _rows(dest, f"SELECT source, stream, destination, rows, started_at, finished_at, status, error, details "
                        f"FROM {dest.qualified(meta, LOADS_TABLE)} WHERE load_id = {lit} ORDER BY finished_at")
    if loads:
        link.load = {**loads[-1], "details": _json(loads[-1]["details"])}
    states = _rows(dest, f"SELECT source, stream, version, state FROM {dest.qualified(meta, STATE_TABLE)} "
                         f"WHERE load_id = {lit} ORDER BY version")
    if states:
        last = states[-1]
        link.version, link.read_to = last["version"], _json(last["state"])
        before = _rows(dest, f"SELECT state FROM {dest.qualified(meta, STATE_TABLE)} WHERE source = "
                             f"{store.literal(last['source'])} AND stream = {store.literal(last['stream'])} AND "
                             f"version < {int(last['version'])} ORDER BY version DESC LIMIT 1")
        link.read_from = _json(before[0]["state"]) if before else None
    return link


def _warehouse_chain(dest: SqlDestination, name: str, sync: SyncConfig, found: Explanation) -> None:
    """Links 2-4, read from the warehouse (runs in a worker thread)."""
    key = store.literal(found.key)
    snapshot = dest.qualified(dest.meta_schema, store.SNAPSHOT)
    if store.snapshot_exists(dest):
        snap = _rows(dest, f"SELECT sent, sent_at, load_ids, _floe_load_id FROM {snapshot} WHERE sync = "
                           f"{store.literal(name)} AND {dest.quote('key')} = {key}")
        if snap:
            found.sent, found.sent_at = _json(snap[0]["sent"]), snap[0]["sent_at"]
            found.sent_load_ids = split_load_ids(snap[0]["load_ids"])
            run = _load(dest, snap[0]["_floe_load_id"])
            found.sync_run = {"load_id": run.load_id, **(run.load or {})}
    column = f"CAST(src.{dest.quote(sync.key_column)} AS {dest.text_type})"
    found.rows = _rows(dest, f"SELECT * FROM {sync.relation(dest.quote)} AS src WHERE {column} = {key}")
    now = [i for row in found.rows for i in split_load_ids(row.get(store.LOAD_ID))]
    found.loads = [_load(dest, load_id) for load_id in dict.fromkeys(found.sent_load_ids + now)]


async def explain(config: FloeConfig, name: str, key: str) -> Explanation:
    """The chain from Pendo's value for `key` back to the loads (see the module docstring)."""
    if name not in config.syncs:
        raise ConfigError(f"syncs.{name}: no such sync (configured: {', '.join(config.syncs) or 'none'})")
    sync: SyncConfig = config.syncs[name]
    found = Explanation(name, key, f"pendo {sync.to.kind}/{sync.to.group}", dict(sync.fields))
    dest = read_destination(config, name, sync)
    try:
        await in_thread(_warehouse_chain, dest, name, sync, found)
    except FloeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the warehouse's own message says what is wrong
        raise FloeError(f"syncs.{name}: reading the lineage from {sync.source!r} failed: "
                        f"{redact(str(exc)).strip().splitlines()[0]}") from None
    finally:
        dest.close()
    client = PendoClient(sync.to)
    try:
        names = sorted(set(sync.fields.values()) | set(found.sent or {}))
        found.pendo = (await client.read_values(names, only=key)).get(key)
    finally:
        await client.aclose()
    return found
