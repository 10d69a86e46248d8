"""The unique index on `_floe_state` versions, which keeps two commits of one state version out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from floe.core.errors import DestinationError

if TYPE_CHECKING:
    from floe.destinations.sql import SqlDestination

STATE_TABLE = "_floe_state"


def index_state_versions(dest: SqlDestination) -> None:
    """Make `_floe_state` versions unique per stream (a unique index), or say which streams committed a
    version twice (runs that overlapped before floe took leases) and what to do."""
    table = dest.qualified(dest.meta_schema, STATE_TABLE)
    try:
        with dest.transaction() as cur:
            cur.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {dest.quote(STATE_TABLE + '_version')} "
                        f"ON {table} (source, stream, version)")
    except Exception as exc:
        if dest.is_ddl_race(exc):
            raise
        with dest.transaction() as cur:
            cur.execute(f"SELECT source, stream, version FROM {table} GROUP BY source, stream, version "
                        "HAVING COUNT(*) > 1 ORDER BY source, stream, version")
            duplicates = cur.fetchall()
        if not duplicates:
            raise
        streams: dict[str, list[str]] = {}
        for source, stream, version in duplicates:
            streams.setdefault(f"{source}.{stream}", []).append(str(version))
        listed = "; ".join(f"{k} (versions {', '.join(v[:5])}{', ...' if len(v) > 5 else ''})"
                           for k, v in streams.items())
        raise DestinationError(
            f"destinations.{dest.name}: {dest.meta_schema}.{STATE_TABLE} holds the same state version more "
            f"than once for {listed}: runs that overlapped before floe took leases committed twice, so these "
            "streams' tables may hold rows twice. Check them, then number the versions anew (docs/"
            "destinations.md, 'Duplicate state versions') and run again"
        ) from None
