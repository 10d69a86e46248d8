"""Bounded backfill end to end: `floe run --from DATE --to DATE` re-reads exactly those days.

An append stream's rows of the range are replaced in one commit (FullStory, Singular); a merge
stream's are upserted (Twilio). The committed state stays what it was (a new version of it notes the
backfill), the stream's lease is taken as by any run, a kill leaves the old rows, and a stream that
cannot re-read a range of days refuses before anything loads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from floe.config import parse_config
from floe.core.errors import ConfigError
from floe.core.stream import DayRange, RunOptions
from floe.engine import runner
from floe.sandbox import singular as singular_emu
from floe.sandbox.fullstory import DEFAULT_API_KEY, create_app
from floe.sandbox.server import RunningServer, serve_in_thread
from tests.fixtures.destinations import Place, place_of
from tests.test_singular import start as start_singular
from tests.test_singular import stored

TODAY = datetime.now(UTC).date()
DIMS = ["app", "source", "os", "country_field", "adn_campaign_name"]
SINGULAR_COLUMNS = ("reporting_date", *DIMS, "adn_impressions")


def project(place: Place, sources: dict[str, Any]) -> Path:
    """A floe.yml loading `sources` into `place` (destination `w`); its path."""
    path = place.base / "floe.yml"
    path.write_text(yaml.safe_dump({"sources": sources, "destinations": {"w": place.settings},
                                    "stage": str(place.base / "stage")}, sort_keys=False))
    return path


def run(path: Path, first: date | None = None, last: date | None = None, **kwargs: Any) -> list[Any]:
    options = RunOptions(backfill=DayRange(first, last) if first and last else None)
    results = runner.run(parse_config(yaml.safe_load(path.read_text()), path), options=options, **kwargs)
    assert [r.error for r in results] == [None] * len(results)
    return results


def state_log(place: Place, source: str, stream: str) -> list[Any]:
    dest = place.open()
    try:
        return dest.state_log(source, stream)
    finally:
        dest.close()


# --- Singular: an append stream of daily reports ---------------------------------------------------
def singular_rows(sandbox: singular_emu.SingularSandbox, days: list[date]) -> list[tuple[Any, ...]]:
    """The rows the emulator serves now for `days` (every day golden: values do not depend on the retrieval)."""
    return [(day, *combo, stored("adn_impressions", sandbox.cell("adn_impressions", day, combo, 1)))
            for day in days for combo in sandbox.combinations(DIMS)]


def loaded_singular(place: Place) -> list[tuple[Any, ...]]:
    return [(r[0] if isinstance(r[0], date) else date.fromisoformat(str(r[0])[:10]), *r[1:])
            for r in place.rows("ads", "campaign_stats", *SINGULAR_COLUMNS)]


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "bigquery", "files"])
def test_a_backfill_of_middle_days_replaces_their_rows_once_with_the_new_values(kind, emulator, request, tmp_path):
    place = place_of(kind, request, tmp_path)
    server, sandbox = start_singular(emulator, rows_per_day=6, settle_days=0)
    end = TODAY - timedelta(days=10)
    days = [end - timedelta(days=k) for k in range(6, -1, -1)]
    path = project(place, {"ads": {"type": "singular", "api_key": "sandbox-singular-api-key",
                                   "base_url": f"{server.url}/api", "lookback_days": 6, "end_date": end.isoformat(),
                                   "poll_interval": 0.01}})
    run(path)
    before = loaded_singular(place)
    assert sorted(before) == sorted(singular_rows(sandbox, days))
    state, versions = place.state("ads", "campaign_stats"), place.versions("ads", "campaign_stats")

    sandbox.seed = 2  # Singular restates its numbers (and the rows' dimensions) for every day
    first, last = days[2], days[4]
    [result] = run(path, first, last)
    assert result.rows == 3 * 6
    middle = set(days[2:5])
    expected = [r for r in before if r[0] not in middle] + singular_rows(sandbox, days[2:5])
    assert sorted(loaded_singular(place)) == sorted(expected)  # each row once: the range's new rows, the rest as before
    assert place.state("ads", "campaign_stats") == state  # the bookmark did not move
    assert place.versions("ads", "campaign_stats") == [*versions, versions[-1] + 1]
    latest = state_log(place, "ads", "campaign_stats")[0]
    assert latest.action == "backfill" and latest.state == state
    assert latest.details["backfill"] == {"from": first.isoformat(), "to": last.isoformat()}

    sandbox.seed = 1
    run(path, first, last)  # again: the same rows replace themselves, nothing doubles
    assert sorted(loaded_singular(place)) == sorted(before)
