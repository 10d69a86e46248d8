"""`floe drift`: how late a stream's rows still change, and the lookback that would have caught them.

Reads `_floe_drift` (see `floe.destinations.drift`) summed by age in days over every recorded re-read,
and finds the shortest lookback whose ages hold the chosen share of all changed rows. The cost of a
lookback is what one run re-reads: rows (the recorded average per day of age) and API calls (by the
source's way of reading: one async report per day for Singular, pages of `page_size` for Twilio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from floe.config import FloeConfig
from floe.core.destination import Destination
from floe.core.errors import ConfigError, FloeError
from floe.destinations.drift import DRIFT_TABLE
from floe.engine.factory import context_for, make_destination

SINGULAR_CALLS_PER_DAY = 3  # create_async_report, at least one get_report_status, the download


@dataclass(frozen=True)
class Age:
    days: int
    loads: int  # re-reads that covered this age
    reread: int
    changed: int
    amount_changed: float
    amount_before: float


@dataclass(frozen=True)
class Cost:
    lookback_days: int
    rows: int  # rows re-read by one run
    api_calls: int | None  # None: not known for this source type


@dataclass(frozen=True)
class Drift:
    source: str
    stream: str
    destination: str
    ages: list[Age]
    share: float
    suggested: int | None  # lookback days catching `share` of the changes (None: nothing changed)
    configured: Cost | None
    proposed: Cost | None

    @property
    def changed(self) -> int:
        return sum(a.changed for a in self.ages)

    @property
    def loads(self) -> int:
        return max((a.loads for a in self.ages), default=0)


def read_ages(destination: Destination, source: str, stream: str) -> list[Age]:
    """What `destination` (one that `records_drift`) recorded of the stream's re-reads, by age."""
    return [Age(int(row[0]), int(row[1]), int(row[2] or 0), int(row[3] or 0), float(row[4] or 0),
                float(row[5] or 0)) for row in destination.drift_ages(source, stream)]


def suggested_lookback(ages: list[Age], share: float) -> int | None:
    """The fewest days of lookback whose ages hold at least `share` of every changed row."""
    total = sum(a.changed for a in ages)
    if not total:
        return None
    caught = 0
    for age in sorted(ages, key=lambda a: a.days):
        caught += age.changed
        if caught >= share * total:
            return max(age.days, 0)
    return max(a.days for a in ages)


def cost(source_config: Any, ages: list[Age], days: int) -> Cost:
    """What one run with a lookback of `days` re-reads: rows (recorded averages per age) and API calls."""
    per_age = {a.days: a.reread / a.loads for a in ages if a.loads}
    typical = sum(per_age.values()) / len(per_age) if per_age else 0.0
    rows = round(sum(per_age.get(age, typical) for age in range(days + 1)))
    calls: int | None = None
    if source_config.type == "singular":
        calls = SINGULAR_CALLS_PER_DAY * (days + 1)
    elif source_config.type == "twilio":
        calls = max(1, math.ceil(rows / source_config.page_size))
    return Cost(days, rows, calls)


def drift(config: FloeConfig, target: str, share: float, destination_name: str | None = None) -> Drift:
    source_name, dot, stream = target.partition(".")
    if not dot or not stream:
        raise ConfigError(f"{target}: name a stream as SOURCE.STREAM (e.g. singular.campaign_stats)")
    source_config = config.source(source_name)
    names = config.destinations_for(source_name)
    name = destination_name or (names[0] if names else None)
    if name is None:
        raise ConfigError(f"sources.{source_name}: loads into no destination")
    destination = make_destination(config, name, context_for(config))
    try:
        if not destination.records_drift:
            raise FloeError(f"destinations.{name} ({destination.config.type}) does not record {DRIFT_TABLE}")
        ages = read_ages(destination, source_name, stream)
    finally:
        destination.close()
    suggested = suggested_lookback(ages, share)
    # Every source that re-reads a window names its length lookback_days.
    configured_days: int | None = getattr(source_config, "lookback_days", None)
    return Drift(source_name, stream, name, ages, share, suggested,
                 cost(source_config, ages, configured_days) if configured_days is not None else None,
                 cost(source_config, ages, suggested) if suggested is not None else None)
