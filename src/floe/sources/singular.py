"""Singular: one async report per day of the lookback window, appended with one `when_retrieved` per run.

Ad-network spend takes days or weeks to "become golden" (networks keep removing fraudulent clicks),
so every run re-retrieves the last `lookback_days` days (plus the end day itself) and appends them,
stamped with the run's single `when_retrieved`. The view `<table>_latest` keeps, per reporting day
and dimension combination, only the latest retrieval: the most golden numbers, without writing the
MAX(when_retrieved) join by hand. All days of a run commit together (one transaction), so a failed
run appends nothing.

Singular takes measures in three parameters (its official client, `params.py`): `metrics`,
`discrepancy_metrics` (adn_/tracker_ clicks and installs) and `cohort_metrics` (with
`cohort_periods`); a cohort metric comes back keyed by period (`"revenue": {"7d": 40.1, "actual": 88.5}`)
and becomes one column per metric and period (`revenue_7d`, `revenue_actual`).

Reports are polled as the official client's ETLManager does: at most `max_queued_reports` created and
not yet finished at once, `poll_interval` (10 s) between two status polls of one report
(QUEUED -> STARTED -> DONE | FAILED; a FAILED report is created again `report_retries` times). The
rows are downloaded from the pre-signed URL without credentials and must be `{"results": [...]}`
(or the older `{"value": {"results": [...]}}`). Numbers sent as strings are parsed; `""` and `"N/A"`
become null; dimension values are kept as text (`""` becomes null).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar, Literal

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from floe.core.errors import SourceError
from floe.core.settings import SourceConfig
from floe.core.stream import MONEY, Batch, Context, DayRange, DriftSpec, RefreshScope, State, Stream
from floe.infra.http import ApiSource, HttpClient

DEFAULT_DIMENSIONS = ["app", "source", "os", "country_field", "adn_campaign_name"]
DEFAULT_METRICS = ["adn_impressions", "adn_cost", "custom_installs"]
DEFAULT_DISCREPANCY_METRICS = ["adn_clicks", "adn_installs"]
DEFAULT_COHORT_METRICS = ["revenue"]
DEFAULT_COHORT_PERIODS = ["1d", "7d", "14d", "30d", "actual"]

# The request parameter each known measure belongs in: the official client's params.py (Metrics,
# DiscrepancyMetrics), the help center's cohort metrics, and the client README's cohort_metrics example.
# Names not listed (custom metrics, other adn_* fields, account-defined cohort metrics) are passed as given.
PLAIN_METRICS = frozenset({
    "adn_impressions", "adn_cost", "adn_original_cost", "adn_estimated_total_conversions", "custom_clicks",
    "custom_installs", "skan_installs", "unified_installs", "unified_ecpi", "unified_cvr", "unified_ocvr",
    "ctr", "cvr", "ecpi", "ocvr", "ecpm", "ecpc"})
DISCREPANCY_METRICS = frozenset({"adn_clicks", "adn_installs", "tracker_clicks", "tracker_installs"})
COHORT_METRICS = frozenset({"revenue", "ad_revenue", "unified_revenue", "retained_users", "retention_rate",
                            "original_revenue", "roi", "arpu"})
HOME = {**dict.fromkeys(PLAIN_METRICS, "metrics"), **dict.fromkeys(DISCREPANCY_METRICS, "discrepancy_metrics"),
        **dict.fromkeys(COHORT_METRICS, "cohort_metrics")}

COUNT_WORDS = ("impressions", "clicks", "installs", "reengagements", "retained_users")
MONEY_WORDS = ("cost", "revenue")  # amounts of money (ratios such as ecpi, roi, arpu stay double)
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
PERIOD = r"^[A-Za-z0-9_]+$"
FIXED_COLUMNS = ("channel_name", "when_retrieved", "reporting_date")
NOT_A_NUMBER = frozenset({"", "N/A", "n/a", "NA", "-", "null"})


class SingularConfig(SourceConfig):
    type: Literal["singular"] = "singular"
    api_key: SecretStr
    lookback_days: int = Field(default=30, ge=0, le=400, description="Days before end_date re-retrieved every run.")
    end_date: date | None = Field(default=None, description="Last reporting day (default: today, UTC).")
    dimensions: list[str] = Field(default_factory=lambda: list(DEFAULT_DIMENSIONS), min_length=1)
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    discrepancy_metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_DISCREPANCY_METRICS))
    cohort_metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_COHORT_METRICS))
    cohort_periods: list[str] = Field(default_factory=lambda: list(DEFAULT_COHORT_PERIODS))
    base_url: str = "https://api.singular.net/api"
    table: str = Field(default="campaign_stats", pattern=IDENTIFIER)
    poll_interval: float = Field(default=10.0, gt=0, description="Seconds between two status polls of one report.")
    max_queued_reports: int = Field(default=10, ge=1, le=100, description="Reports created and not yet done at once.")
    report_timeout: float = Field(default=1200.0, gt=0, description="Seconds to wait for one report.")
    report_retries: int = Field(default=2, ge=0, description="Times a FAILED report is created again.")
    max_concurrency: int = Field(default=8, ge=1, le=100)

    @field_validator("dimensions", "metrics", "discrepancy_metrics", "cohort_metrics")
    @classmethod
    def _identifiers(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not re.match(IDENTIFIER, v)]
        if bad:
            raise ValueError(f"not a Singular field name: {', '.join(bad)}")
        return values

    @field_validator("metrics", "discrepancy_metrics", "cohort_metrics")
    @classmethod
    def _in_its_parameter(cls, values: list[str], info: ValidationInfo) -> list[str]:
        parameter = info.field_name
        misplaced = [f"{name} belongs in {home}" for name in values if (home := HOME.get(name)) not in (None, parameter)]
        if parameter == "discrepancy_metrics":
            misplaced += [f"{name} is not a discrepancy metric (those are {', '.join(sorted(DISCREPANCY_METRICS))}): "
                          "list it under metrics or cohort_metrics" for name in values if name not in HOME]
        if misplaced:
            raise ValueError(", ".join(misplaced))
        return values

    @field_validator("cohort_periods")
    @classmethod
    def _periods(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not re.match(PERIOD, v)]
        if bad:
            raise ValueError(f"not a cohort period (like 1d, 7d, actual): {', '.join(bad)}")
        return values

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _measures(self) -> SingularConfig:
        if self.cohort_metrics and not self.cohort_periods:
            raise ValueError("cohort_metrics needs cohort_periods (e.g. 1d, 7d, 14d, 30d, actual)")
        if not self.flat_metrics and not self.cohort_metrics:
            raise ValueError("no metric requested: set metrics, discrepancy_metrics or cohort_metrics")
        columns = [*FIXED_COLUMNS, *self.dimensions, *self.flat_metrics, *(c for _, _, c in self.cohort_columns)]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ValueError(f"column named twice: {', '.join(twice)}")
        return self

    @property
    def flat_metrics(self) -> list[str]:
        """Measures sent as one value per row: `metrics` and `discrepancy_metrics`."""
        return [*self.metrics, *self.discrepancy_metrics]

    @property
    def cohort_columns(self) -> list[tuple[str, str, str]]:
        """(metric, period, column) for every cohort value kept, e.g. ("revenue", "7d", "revenue_7d")."""
        return [(m, p, f"{m}_{p}") for m in self.cohort_metrics for p in self.cohort_periods]

    def form(self, day: date) -> dict[str, str]:
        """The create_async_report form of one day (as the official client builds it)."""
        form = {"start_date": day.isoformat(), "end_date": day.isoformat(), "format": "json",
                "dimensions": ",".join(self.dimensions), "metrics": ",".join(self.metrics),
                "discrepancy_metrics": ",".join(self.discrepancy_metrics), "time_breakdown": "day"}
        if self.cohort_metrics:
            form |= {"cohort_metrics": ",".join(self.cohort_metrics), "cohort_periods": ",".join(self.cohort_periods)}
        return form


def metric_type(name: str) -> pa.DataType:
    """int64 for counts, MONEY (an exact decimal) for amounts, float64 for the other measures."""
    if any(word in name for word in COUNT_WORDS):
        return pa.int64()
    return MONEY if any(word in name for word in MONEY_WORDS) else pa.float64()


def number(value: Any) -> float | None:
    """One metric value as Singular sends it (number, numeric string, "", "N/A") -> float or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict | list):
        raise TypeError(f"a {type(value).__name__}, not a number")
    text = str(value).strip().replace(",", "")
    if text in NOT_A_NUMBER:
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

    async def check(self) -> list[str]:
        # The cheapest authenticated call: it lists the cohort metrics, creates no report.
        _value(await self.http.get_json(f"{self.config.base_url}/cohort_metrics", headers={
            "Authorization": self.config.api_key.get_secret_value()}), self.name, "cohort_metrics")
        return [f"API key accepted by {self.config.base_url}"]


class SingularReport(Stream):
    """Append-only daily report rows; `<table>_latest` view keeps each (day, dimensions)' latest retrieval."""

    disposition = "append"
    run_columns = ("when_retrieved",)

    def __init__(self, source: SingularSource) -> None:
        config = source.config
        self.source = source
        self.name = config.table
        self.dimensions = list(config.dimensions)
        self.schema = pa.schema(
            [pa.field("channel_name", pa.string(), nullable=False),
             pa.field("when_retrieved", pa.timestamp("us", tz="UTC"), nullable=False),
             pa.field("reporting_date", pa.date32())]
            + [pa.field(d, pa.string()) for d in self.dimensions]
            + [pa.field(m, metric_type(m)) for m in config.flat_metrics]
            + [pa.field(column, metric_type(m)) for m, _, column in config.cohort_columns]
        )
        keys = ", ".join(f'"{c}"' for c in ["reporting_date", *self.dimensions])
        measures = [*config.flat_metrics, *(column for _, _, column in config.cohort_columns)]
        self.drift = DriftSpec(("reporting_date", *self.dimensions), "reporting_date", tuple(measures),
                               tuple(m for m in config.flat_metrics if metric_type(m) == MONEY))
        self.current_view = f"{self.name}_latest"
        self.views = ((self.current_view, (
            f'SELECT {{columns}} FROM (SELECT *, RANK() OVER (PARTITION BY {keys} ORDER BY "when_retrieved" DESC) '
            f'AS "_floe_rank" FROM {{table}}) AS "ranked" WHERE "_floe_rank" = 1'
        )),)

    def days(self) -> list[date]:
        end = self.source.config.end_date or datetime.now(UTC).date()
        return [end - timedelta(days=k) for k in range(self.source.config.lookback_days, -1, -1)]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": self.source.config.api_key.get_secret_value()}

    async def report(self, day: date, queue: asyncio.Semaphore) -> pa.RecordBatch:
        """Create, poll and download the report of one day (re-created if Singular says FAILED).

        The report holds a place in `queue` from its creation until its rows are read."""
        config, http, name = self.source.config, self.source.http, self.source.name
        async with queue:
            for attempt in range(config.report_retries + 1):
                response = await http.request("POST", f"{config.base_url}/v2.0/create_async_report",
                                              data=config.form(day), headers=self.auth)
                report_id = _value(_json(response.content, name), name, "create_async_report").get("report_id")
                if not report_id:
                    raise SourceError(f"{name}: create_async_report returned no report_id for {day}")
                where = f"{name}: report {report_id} for {day}"
                status = await self.finished(report_id, where)
                if status["status"] == "DONE":
                    if not status.get("download_url"):
                        raise SourceError(f"{where}: DONE without a download_url")
                    document = await http.get_json(status["download_url"])
                    return self.to_batch(day, report_rows(document, where), where)
                if attempt == config.report_retries:
                    raise SourceError(f"{where} FAILED: {status.get('error_message') or 'no reason given'}")
        raise AssertionError("unreachable")

    async def finished(self, report_id: str, where: str) -> dict[str, Any]:
        """Poll get_report_status every `poll_interval` seconds until DONE or FAILED; the last status."""
        config, name = self.source.config, self.source.name
        deadline = time.monotonic() + config.report_timeout
        while True:
            status = _value(await self.source.http.get_json(
                f"{config.base_url}/v2.0/get_report_status", params={"report_id": report_id}, headers=self.auth),
                name, "get_report_status")
            state = status.get("status")
            if state in ("DONE", "FAILED"):
                return status
            if state not in ("QUEUED", "STARTED"):
                raise SourceError(f"{where}: unexpected report status {state!r}")
            if time.monotonic() > deadline:
                raise SourceError(f"{where} still {state} after {config.report_timeout:.0f}s (report_timeout)")
            await asyncio.sleep(config.poll_interval)

    def to_batch(self, day: date, rows: list[dict[str, Any]], where: str = "report") -> pa.RecordBatch:
        """Report rows -> one batch of the stream's schema (column by column; `where` names the report in errors)."""
        config, n = self.source.config, len(rows)
        starts = _text([r.get("start_date") for r in rows])
        columns: list[pa.Array] = [
            pa.array([self.source.name] * n, pa.string()),
            pa.array([self.source.when_retrieved] * n, pa.timestamp("us", tz="UTC")),
            pc.strptime(pc.utf8_slice_codeunits(starts, 0, 10), "%Y-%m-%d", "s", error_is_null=True)
            .cast(pa.date32()).fill_null(pa.scalar(day, pa.date32())),
        ]
        columns += [_text([r.get(d) for r in rows]) for d in self.dimensions]
        columns += [_numbers([r.get(m) for r in rows], m, where) for m in config.flat_metrics]
        for metric in config.cohort_metrics:
            by_period = _by_period([r.get(metric) for r in rows], config.cohort_periods, f"{where}: {metric}")
            columns += [_numbers(values, metric, where) for values in by_period]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    # --- backfill: the reports of a day range; its retrieval replaces the range's earlier ones -------
    range_column = "reporting_date"

    def backfill_scope(self, days: DayRange, state: State | None) -> RefreshScope:
        return RefreshScope(self.range_column, days.first, days.last + timedelta(days=1))

    def read_range(self, scope: RefreshScope) -> AsyncIterator[Batch]:
        return self._read_days([scope.start + timedelta(days=k) for k in range((scope.end - scope.start).days)])

    def read(self, state: State | None) -> AsyncIterator[Batch]:
        return self._read_days(self.days())  # the generator itself: the engine's aclose() reaches its `finally`

    async def _read_days(self, days: list[date]) -> AsyncIterator[Batch]:
        """The reports of `days`, then one checkpoint: every day commits together."""
        queue = asyncio.Semaphore(self.source.config.max_queued_reports)
        tasks = [asyncio.create_task(self.report(day, queue)) for day in days]
        try:
            for finished in asyncio.as_completed(tasks):
                yield Batch(await finished)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield Batch(None, {"last_retrieved": self.source.when_retrieved.isoformat(),
                           "first_day": days[0].isoformat(), "last_day": days[-1].isoformat()})


def report_rows(document: Any, where: str) -> list[dict[str, Any]]:
    """The rows of a downloaded report: `{"results": [...]}`, or the older `{"status": 0, "value": {"results": [...]}}`.

    Any other shape is an error naming the report (`where`), never zero rows."""
    results: Any = None
    if isinstance(document, dict):
        if "results" in document:
            results = document["results"]
        elif isinstance(document.get("value"), dict) and "results" in document["value"]:
            _value(document, where, "download")  # a non-zero envelope status is an error
            results = document["value"]["results"]
    if isinstance(results, list) and all(isinstance(row, dict) for row in results):
        return results
    if isinstance(document, dict):
        got = (f"results is {_kind(results)}" if results is not None
               else f"an object with keys {', '.join(sorted(document)[:10]) or '(none)'}")
    else:
        got = _kind(document)
    raise SourceError(f'{where}: the downloaded report is not {{"results": [row, ...]}}: got {got}')


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array of non-objects" if value else "an empty array"
    return {dict: "an object", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def _by_period(cells: list[Any], periods: list[str], where: str) -> list[list[Any]]:
    """One cohort metric's cells (`{"7d": …, "actual": …}` per row) -> one list of values per period.

    A value not keyed by period is the only requested period's; with several periods it is an error."""
    flat = [c for c in cells if c.__class__ is not dict and c is not None and c != ""]
    if flat and len(periods) > 1:
        raise SourceError(f"{where} came as one value ({flat[0]!r}), not keyed by period ({', '.join(periods)})")
    return [[c.get(period) if c.__class__ is dict else c for c in cells] for period in periods]


def _text(values: list[Any]) -> pa.Array:
    """Dimension values as text; `""` is null."""
    try:
        array = pa.array(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        array = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pc.if_else(pc.equal(array, ""), pa.scalar(None, pa.string()), array)


def _numbers(values: list[Any], metric: str, where: str) -> pa.Array:
    """One metric's values -> float64 (int64, rounded, for counts; MONEY, rounded to its six decimal
    places, for amounts); numbers sent as text are parsed."""
    try:  # JSON numbers pass straight through; only the odd ones pay for a call
        array = pa.array([v if (kind := v.__class__) is float or kind is int or v is None else number(v)
                          for v in values], pa.float64())
    except TypeError as exc:
        raise SourceError(f"{where}: {metric} is {exc}; is it in the right list "
                          f"(metrics, discrepancy_metrics, cohort_metrics)?") from None
    kind = metric_type(metric)
    if kind == pa.float64():
        return array
    try:
        return pc.round(array).cast(pa.int64()) if kind == pa.int64() else array.cast(MONEY)
    except pa.ArrowInvalid:
        raise SourceError(f"{where}: {metric} has a value too large for {kind}") from None


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
