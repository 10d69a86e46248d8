"""What a sync keeps in the warehouse it reads from, and the SQL that finds changed rows.

- `_floe_sync_snapshot (sync, key, hash, sent, sent_at, load_ids)`: per key, the hash of the mapped
  values Pendo last accepted, those values as Pendo got them (`sent`, JSON), when (`sent_at`, epoch
  ms) and the `_floe_load_id`s of the warehouse rows they came from (`load_ids`, when the rows carry
  a `_floe_load_id` column); its `_floe_load_id` is the sync run's. A row is sent when its current
  hash differs (or it has none), so rows Pendo rejected (missing ids, errors) are retried on the next
  run until they are accepted. With `deletes: clear`, a key gone from the rows leaves the snapshot in
  the commit that records Pendo accepting its cleared fields.
- `_floe_sync_failures (sync, key, outcome, message)`: the rows whose last attempt failed
  (`outcome` is `missing` or `error`); a key leaves the table once Pendo accepts it.
- `_floe_loads`: one row per sync run (source `_floe_sync`, stream = the sync's name), `rows` =
  rows accepted, `details` = {sent, updated, missing, errors, failed, ...}.

Both tables live in the destination's meta schema (next to `_floe_state`) and are written in one
transaction with the `_floe_loads` row, through the same bulk staging hooks as ordinary loads, so
this works unchanged on every SQL destination. The diff is a SQL join in the warehouse: memory
does not grow with the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from floe.core.destination import LoadJob, StagedFile, TableSpec
from floe.destinations.sql import SqlDestination

SNAPSHOT = "_floe_sync_snapshot"
FAILURES = "_floe_sync_failures"
SYNC_SOURCE = "_floe_sync"  # the `source` of a sync's row in _floe_loads
KEY, HASH, RETRY = "_floe_key", "_floe_hash", "_floe_retry"  # diff query columns besides the mapped values
LINEAGE, LOAD_ID = "_floe_lineage", "_floe_load_id"  # the rows' load ids, as the diff query names them

SNAPSHOT_SCHEMA = pa.schema([("sync", pa.string()), ("key", pa.string()), ("hash", pa.string()),
                             ("sent", pa.string()), ("sent_at", pa.int64()), ("load_ids", pa.string())])
GONE_SCHEMA = pa.schema([("sync", pa.string()), ("key", pa.string())])  # keys cleared in Pendo
FAILURES_SCHEMA = pa.schema([("sync", pa.string()), ("key", pa.string()), ("outcome", pa.string()),
                             ("message", pa.string())])


def snapshot_spec(dest: SqlDestination) -> TableSpec:
    return TableSpec(dest.meta_schema, SNAPSHOT, SNAPSHOT_SCHEMA, ("sync", "key"), "merge")


def failures_spec(dest: SqlDestination) -> TableSpec:
    return TableSpec(dest.meta_schema, FAILURES, FAILURES_SCHEMA, ("sync", "key"), "merge")


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def value_alias(i: int) -> str:
    return f"_floe_v{i}"


def hash_sql(dest: SqlDestination, signature: str, columns: list[str]) -> str:
    """md5 of the mapped values as text, each length-prefixed (NULL is `~`), after `signature`
    (the mapping), so a changed mapping resends every row. Text forms differ between warehouses
    but are stable within one, which is all a diff needs."""
    t = dest.text_type
    parts = [literal(signature)]
    for c in columns:
        text = f"CAST(src.{dest.quote(c)} AS {t})"
        parts.append(f"COALESCE(CAST(LENGTH({text}) AS {t}) || ':' || {text}, '~')")
    return "md5(" + " || ".join(parts) + ")"


def diff_sql(dest: SqlDestination, sync: str, relation: str, key: str, columns: list[str], signature: str,
             *, full: bool, snapshot_exists: bool = True, lineage: bool = False) -> str:
    """Rows to send: `_floe_key`, `_floe_hash`, `_floe_v<i>` per mapped column, `_floe_lineage` (the
    rows' `_floe_load_id` as text, when `lineage`), then `_floe_retry` (the key's last attempt
    failed). Without `full`, only rows whose hash differs from the snapshot's."""
    t = dest.text_type
    values = "".join(f", src.{dest.quote(c)} AS {value_alias(i)}" for i, c in enumerate(columns))
    if lineage:
        values += f", CAST(src.{dest.quote(LOAD_ID)} AS {t}) AS {LINEAGE}"
    rows = (f"SELECT CAST(src.{dest.quote(key)} AS {t}) AS {KEY}, {hash_sql(dest, signature, columns)} "
            f"AS {HASH}{values} FROM {relation} AS src")
    if not snapshot_exists:  # (nor the failures: both are created together)
        return f"SELECT r.*, FALSE AS {RETRY} FROM ({rows}) AS r"
    failures, snapshot = dest.qualified(dest.meta_schema, FAILURES), dest.qualified(dest.meta_schema, SNAPSHOT)
    flagged = (f"WITH floe_rows AS ({rows}) SELECT r.*, fail.{dest.quote('key')} IS NOT NULL AS {RETRY} "
               f"FROM floe_rows AS r LEFT JOIN {failures} AS fail "
               f"ON fail.sync = {literal(sync)} AND fail.{dest.quote('key')} = r.{KEY}")
    if full:
        return flagged
    return (f"{flagged} LEFT JOIN {snapshot} AS snap ON snap.sync = {literal(sync)} AND "
            f"snap.{dest.quote('key')} = r.{KEY} WHERE snap.hash IS NULL OR snap.hash <> r.{HASH}")


def synced_keys_sql(dest: SqlDestination, sync: str) -> str:
    """One row: how many keys the snapshot holds for `sync`."""
    return f"SELECT COUNT(*) FROM {dest.qualified(dest.meta_schema, SNAPSHOT)} WHERE sync = {literal(sync)}"


def gone_sql(dest: SqlDestination, sync: str, relation: str, key: str) -> str:
    """Keys in the snapshot of `sync` that the rows no longer hold: `_floe_key`, `sent` (the values
    floe last set for it, JSON), sorted by key."""
    snapshot, t = dest.qualified(dest.meta_schema, SNAPSHOT), dest.text_type
    return (f"SELECT snap.{dest.quote('key')} AS {KEY}, snap.sent AS sent FROM {snapshot} AS snap "
            f"LEFT JOIN (SELECT DISTINCT CAST(src.{dest.quote(key)} AS {t}) AS k FROM {relation} AS src) AS cur "
            f"ON cur.k = snap.{dest.quote('key')} WHERE snap.sync = {literal(sync)} AND cur.k IS NULL "
            f"ORDER BY snap.{dest.quote('key')}")


def accepted_sql(dest: SqlDestination, sync: str) -> str:
    """One row counting 1 if the snapshot holds any row Pendo accepted for `sync`, else 0."""
    snapshot = dest.qualified(dest.meta_schema, SNAPSHOT)
    return f"SELECT COUNT(*) FROM (SELECT 1 AS one FROM {snapshot} WHERE sync = {literal(sync)} LIMIT 1) AS s"


def ensure_tables(dest: SqlDestination) -> None:
    dest.prepare_meta()
    with dest.transaction() as cur:
        dest.ensure_table(cur, snapshot_spec(dest))
        dest.ensure_table(cur, failures_spec(dest))


def snapshot_exists(dest: SqlDestination) -> bool:
    with dest.transaction() as cur:
        return bool(dest.existing_columns(cur, dest.meta_schema, SNAPSHOT))


def _stage(dest: SqlDestination, cur: Any, spec: TableSpec, files: Sequence[StagedFile], load_id: str,
           suffix: str) -> str:
    """Bulk-load `files` into a staging relation through the destination's own hook; its name."""
    job = LoadJob(load_id, SYNC_SOURCE, spec.table, spec, list(files), {}, datetime.now(UTC))
    staging = f"_floe_staging_{load_id.replace('-', '_')}_{suffix}"
    dest.stage_rows(cur, job, staging)
    return staging


def _upsert(dest: SqlDestination, cur: Any, spec: TableSpec, files: list[StagedFile], load_id: str,
            suffix: str) -> str:
    """Bulk-load `files` into a staging relation (the destination's own hook) and replace the rows
    of the same (sync, key). Keys are unique within one run's files, so no de-duplication is needed."""
    staging = _stage(dest, cur, spec, files, load_id, suffix)
    target, key = dest.qualified(spec.schema_name, spec.table), dest.quote("key")
    columns = ", ".join(dest.quote(f.name) for f in spec.columns)
    sync = f"(SELECT DISTINCT sync FROM {staging})"
    cur.execute(f"DELETE FROM {target} WHERE sync IN {sync} AND {key} IN (SELECT {key} FROM {staging})")
    cur.execute(f"INSERT INTO {target} ({columns}, _floe_load_id, _floe_loaded_at) "
                f"SELECT {columns}, {literal(load_id)}, CURRENT_TIMESTAMP FROM {staging}")
    return staging


def gone_spec(dest: SqlDestination) -> TableSpec:
    """The keys to remove from the snapshot, staged as a relation shaped like (part of) the snapshot."""
    return TableSpec(dest.meta_schema, SNAPSHOT, GONE_SCHEMA, ("sync", "key"), "merge")


def commit(dest: SqlDestination, sync: str, job: LoadJob, failure_files: list[StagedFile], *, final: bool,
           complete: bool = False, status: str = "committed", error: str | None = None,
           gone_files: Sequence[StagedFile] = ()) -> None:
    """In one transaction: merge accepted rows (`job.files`) into the snapshot and clear their
    failures, merge new failures, remove the keys whose fields Pendo cleared (`gone_files`) from the
    snapshot and the failures; when `final`, write the `_floe_loads` row and, after a complete
    run, drop the sync's failures not re-attempted by this run (their rows left the query)."""
    snap, fails = snapshot_spec(dest), failures_spec(dest)
    failures_table = dest.qualified(dest.meta_schema, FAILURES)
    key = dest.quote("key")
    dest.prepare_meta()
    with dest.transaction() as cur:
        dest.ensure_table(cur, snap)
        dest.ensure_table(cur, fails)
        if job.files:
            staging = _upsert(dest, cur, snap, job.files, job.load_id, "ok")
            cur.execute(f"DELETE FROM {failures_table} WHERE sync = {literal(sync)} AND "
                        f"{key} IN (SELECT {key} FROM {staging})")
            dest.drop_staging(cur, staging)
        if failure_files:
            dest.drop_staging(cur, _upsert(dest, cur, fails, failure_files, job.load_id, "failed"))
        if gone_files:
            staging = _stage(dest, cur, gone_spec(dest), gone_files, job.load_id, "gone")
            for table in (dest.qualified(dest.meta_schema, SNAPSHOT), failures_table):
                cur.execute(f"DELETE FROM {table} WHERE sync = {literal(sync)} AND "
                            f"{key} IN (SELECT {key} FROM {staging})")
            dest.drop_staging(cur, staging)
        if final:
            if complete:
                cur.execute(f"DELETE FROM {failures_table} WHERE sync = {literal(sync)} AND "
                            f"_floe_load_id <> {literal(job.load_id)}")
            dest.write_load_row(cur, job, status, error, datetime.now(UTC))
