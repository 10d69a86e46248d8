"""Singular: one async report per day of the lookback window, appended with one `when_retrieved` per run.

Ad-network spend takes days or weeks to "become golden" (networks keep removing fraudulent clicks),
so every run re-retrieves the last `lookback_days` days (plus the end day itself) and appends them,
stamped with the run's single `when_retrieved`. The view `<table>_latest` keeps, per reporting day
and dimension combination, only the latest retrieval: the most golden numbers, without writing the
MAX(when_retrieved) join by hand. All days of a run commit together (one transaction), so a failed
run appends nothing.

Reports are created concurrently (`create_async_report`), polled (`get_report_status`: QUEUED ->
STARTED -> DONE | FAILED; a FAILED report is re-created `report_retries` times) and downloaded from
the pre-signed URL without credentials. Numbers sent as strings are parsed; `""` and `"N/A"` become
null metrics; dimension values are kept as text (`""` becomes null).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar, Literal

import orjson
import pyarrow as pa
from pydantic import Field, SecretStr, field_validator

from floe.config import SourceConfig
from floe.engine.stream import Batch, Context, State, Stream
from floe.errors import SourceError
from floe.http import ApiSource, HttpClient

DEFAULT_DIMENSIONS = ["app", "source", "os", "country_field", "adn_campaign_name"]
DEFAULT_METRICS = ["adn_impressions", "adn_clicks", "adn_installs", "adn_cost", "custom_installs", "revenue"]
COUNT_WORDS = ("impressions", "clicks", "installs", "reengagements", "retained_users")
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SingularConfig(SourceConfig):
    type: Literal["singular"] = "singular"
    api_key: SecretStr
    lookback_days: int = Field(default=30, ge=0, le=400, description="Days before end_date re-retrieved every run.")
    end_date: date | None = Field(default=None, description="Last reporting day (default: today, UTC).")
    dimensions: list[str] = Field(default_factory=lambda: list(DEFAULT_DIMENSIONS), min_length=1)
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1)
    base_url: str = "https://api.singular.net/api"
    table: str = Field(default="campaign_stats", pattern=IDENTIFIER)
    poll_interval: float = Field(default=2.0, gt=0)
    report_timeout: float = Field(default=1200.0, gt=0, description="Seconds to wait for one report.")
    report_retries: int = Field(default=2, ge=0, description="Times a FAILED report is created again.")
    max_concurrency: int = Field(default=8, ge=1, le=100)

    @field_validator("dimensions", "metrics")
    @classmethod
    def _identifiers(cls, values: list[str]) -> list[str]:
        import re

        bad = [v for v in values if not re.match(IDENTIFIER, v)]
        if bad:
            raise ValueError(f"not a Singular field name: {', '.join(bad)}")
        return values

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


def metric_type(name: str) -> pa.DataType:
    return pa.int64() if any(word in name for word in COUNT_WORDS) else pa.float64()


def number(value: Any) -> float | None:
    """A metric as Singular sends it (number, numeric string, "", "N/A", {"actual": …}) -> float or None."""
    if isinstance(value, dict):  # cohort metrics nested by period
        value = value.get("actual")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().replace(",", "")
    if text in ("", "N/A", "n/a", "NA", "-", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


class SingularSource(ApiSource):
    Config: ClassVar[type[SingularConfig]] = SingularConfig
    config: SingularConfig

    def __init__(self, name: str, config: SingularConfig, context: Context | None = None) -> None:
        super().__init__(name, config, context)
        self.when_retrieved = datetime.now(UTC)

    def make_http(self) -> HttpClient:
        return HttpClient(self.name, max_concurrency=self.config.max_concurrency,
                          headers={"Accept": "application/json"})

    def streams(self) -> list[Stream]:
        return [SingularReport(self)]



class SingularReport(Stream):
    """Append-only daily report rows; `<table>_latest` view keeps each (day, dimensions)' latest retrieval."""

    disposition = "append"

    def __init__(self, source: SingularSource) -> None:
        config = source.config
        self.source = source
        self.name = config.table
        self.dimensions = list(config.dimensions)
        self.metrics = list(config.metrics)
        self.schema = pa.schema(
            [pa.field("channel_name", pa.string(), nullable=False),
             pa.field("when_retrieved", pa.timestamp("us", tz="UTC"), nullable=False),
             pa.field("reporting_date", pa.date32())]
            + [pa.field(d, pa.string()) for d in self.dimensions]
            + [pa.field(m, metric_type(m)) for m in self.metrics]
        )
        keys = ", ".join(f'"{c}"' for c in ["reporting_date", *self.dimensions])
        self.views = ((f"{self.name}_latest", (
            f'SELECT {{columns}} FROM (SELECT *, RANK() OVER (PARTITION BY {keys} ORDER BY "when_retrieved" DESC) '
            f'AS "_floe_rank" FROM {{table}}) AS "ranked" WHERE "_floe_rank" = 1'
        )),)

    def days(self) -> list[date]:
        end = self.source.config.end_date or datetime.now(UTC).date()
        return [end - timedelta(days=k) for k in range(self.source.config.lookback_days, -1, -1)]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": self.source.config.api_key.get_secret_value()}

    async def report(self, day: date) -> tuple[date, list[dict[str, Any]]]:
        """Create, poll and download the report of one day (re-created if Singular says FAILED)."""
        config, http = self.source.config, self.source.http
        form = {"start_date": day.isoformat(), "end_date": day.isoformat(), "format": "json",
                "dimensions": ",".join(self.dimensions), "metrics": ",".join(self.metrics),
                "time_breakdown": "day"}
        for attempt in range(config.report_retries + 1):
            response = await http.request("POST", f"{config.base_url}/v2.0/create_async_report", data=form,
                                          headers=self.auth)
            created = _value(_json(response.content, self.source.name), self.source.name, "create_async_report")
            report_id = created.get("report_id")
            if not report_id:
                raise SourceError(f"{self.source.name}: create_async_report returned no report_id for {day}")
            deadline = time.monotonic() + config.report_timeout
            while True:
                status = _value(await http.get_json(f"{config.base_url}/v2.0/get_report_status",
                                                    params={"report_id": report_id}, headers=self.auth),
                                self.source.name, "get_report_status")
                state = status.get("status")
                if state == "DONE":
                    document = await http.get_json(status["download_url"])
                    rows = document.get("results") if isinstance(document, dict) else document
                    return day, list(rows or [])
                if state == "FAILED":
                    if attempt < config.report_retries:
                        break
                    raise SourceError(f"{self.source.name}: report {report_id} for {day} FAILED: "
                                      f"{status.get('error_message') or 'no reason given'}")
                if time.monotonic() > deadline:
                    raise SourceError(f"{self.source.name}: report {report_id} for {day} still {state} after "
                                      f"{config.report_timeout:.0f}s (report_timeout)")
                await asyncio.sleep(config.poll_interval)
        raise AssertionError("unreachable")

    def to_batch(self, day: date, rows: list[dict[str, Any]]) -> pa.RecordBatch:
        n = len(rows)
        columns: dict[str, list[Any]] = {
            "channel_name": [self.source.name] * n, "when_retrieved": [self.source.when_retrieved] * n,
            "reporting_date": [_day(r.get("start_date")) or day for r in rows],
        }
        for d in self.dimensions:
            columns[d] = [None if (v := r.get(d)) is None or v == "" else str(v) for r in rows]
        for m in self.metrics:
            values = [number(r.get(m)) for r in rows]
            columns[m] = [None if v is None else round(v) for v in values] if metric_type(m) == pa.int64() else values
        return pa.RecordBatch.from_pydict(columns, schema=self.schema)

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        days = self.days()
        tasks = {asyncio.create_task(self.report(day)): day for day in days}
        try:
            for finished in asyncio.as_completed(list(tasks)):
                day, rows = await finished
                yield Batch(self.to_batch(day, rows))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield Batch(None, {"last_retrieved": self.source.when_retrieved.isoformat(),
                           "first_day": days[0].isoformat(), "last_day": days[-1].isoformat()})


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(str(value)[:10]) if value else None
    except ValueError:
        return None


def _json(body: bytes, source: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SourceError(f"{source}: Singular sent a response that is not JSON") from None


def _value(document: Any, source: str, call: str) -> dict[str, Any]:
    """The `value` of Singular's `{"status":0,"substatus":0,"value":{…}}` envelope; non-zero status is an error."""
    if not isinstance(document, dict):
        raise SourceError(f"{source}: {call}: unexpected response (not a JSON object)")
    if document.get("status") not in (0, None):
        value = document.get("value") or {}
        message = value.get("error") or value.get("error_message") if isinstance(value, dict) else value
        raise SourceError(f"{source}: {call}: Singular status {document.get('status')}: {message}")
    value = document.get("value")
    return value if isinstance(value, dict) else {}
