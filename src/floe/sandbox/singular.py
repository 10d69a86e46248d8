"""A local Singular Reporting API v2.0 emulator (shared/reference/twilio_singular.md §3.2).

`POST /api/v2.0/create_async_report` (form-encoded; `api_key` parameter or a raw `Authorization`
header) -> `{"status":0,"substatus":0,"value":{"report_id":…}}`; `GET /api/v2.0/get_report_status`
walks QUEUED -> STARTED -> DONE (or FAILED for a share `fail_rate` of reports), one step per poll;
on DONE, `download_url` is a pre-signed-looking URL served without auth: `{"results":[row…]}`
(`envelope="value"`: the older `{"status":0,"value":{"results":[…]}}`; any other `envelope` is a
fault: `"list"` serves a bare array, a name like `"data"` serves `{"data": [...]}`).
`GET /api/cohort_metrics` lists the cohort metrics and periods.

Measures go in the parameter the official client's params.py gives them: `metrics`, `discrepancy_metrics`
(adn_/tracker_ clicks and installs) or `cohort_metrics`, which needs `cohort_periods`; a measure in
the wrong one, an unknown name or period is HTTP 400 with a non-zero envelope `status`. Cohort values
come nested by period (`"revenue": {"1d": 12.3, "actual": 88.5}`); a period longer than the day's age
is absent. At most `max_running` reports (Singular's documented 100) run at once; one more is
HTTP 429 (status and body inferred). The sandbox records what it saw: the most reports running at
once (`max_seen_running`) and every status poll's time (`min_poll_gap()`).

Data is a pure function of (seed, rows_per_day, day, retrieval): every day has `rows_per_day`
dimension combinations; spend for the last `settle_days` days before `today` is not golden yet:
it shrinks a little with every report created for that day, as networks remove fraudulent clicks.
`late_changes` ({age in days: share of rows}) says instead which share of each age's rows changes.
It is at least as irregular as what real clients meet: numbers sent as strings or `""`, whole numbers
as floats, `"N/A"` dimension and ratio values, metrics missing from some rows, fields nobody asked for.
"""

from __future__ import annotations

import secrets as _random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise, product
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from floe.sandbox.faults import FaultMiddleware, Faults
from floe.sandbox.twilio import hash_kind, mix

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "app": ("Snowplow Runner", "Floe Puzzle", "Huskimo Sled"),
    "source": ("Facebook", "AdWords", "AppLovin", "IronSource", "Unity Ads", "TikTok"),
    "os": ("iOS", "Android"),
    "platform": ("iOS", "Android", "Web"),
    "country_field": ("USA", "DEU", "GBR", "FRA", "JPN", "BRA", "N/A"),
    "adn_campaign_name": ("Spring_Sale", "Retarget_Q4", "Brand_Always_On", "Simba_Android", "UA_Tier1"),
    "adn_campaign_id": ("c-1001", "c-1002", "c-1003", "c-1004"),
    "adn_sub_campaign_name": ("adset_a", "adset_b", "N/A"),
    "adn_account_id": ("acct-1", "acct-2"),
    "site_public_id": ("com.example.runner", "id123456789"),
    "keyword": ("runner game", "puzzle", "N/A"),
    "publisher_site_name": ("news.example", "games.example", "N/A"),
    "adn_creative_name": ("video_15s", "banner_320x50", "playable_v2"),
    "data_source_name": ("Facebook API", "AdWords API", "Tracker"),
}
PARAMETER: dict[str, str] = {  # measure -> the create_async_report parameter it must be sent in
    **dict.fromkeys(("adn_impressions", "adn_cost", "adn_original_cost", "custom_clicks", "custom_installs",
                     "custom_impressions", "ctr", "cvr", "ecpi", "ecpm"), "metrics"),
    **dict.fromkeys(("adn_clicks", "adn_installs", "tracker_clicks", "tracker_installs"), "discrepancy_metrics"),
    **dict.fromkeys(("revenue", "ad_revenue", "unified_revenue", "retained_users", "retention_rate"),
                    "cohort_metrics"),
}
COHORT_PERIODS = {"1d": 1, "3d": 3, "7d": 7, "14d": 14, "30d": 30, "actual": 0}  # period -> days (0: no limit)
REVENUE_SHARE = {1: 0.35, 3: 0.5, 7: 0.7, 14: 0.85, 30: 0.95, 0: 1.0}  # of the actual value, by period length
RETAINED_SHARE = {1: 0.4, 3: 0.3, 7: 0.2, 14: 0.12, 30: 0.07, 0: 0.05}  # of installs, by period length
RATIOS = ("ctr", "cvr", "ecpi", "ecpm", "retention_rate")
STATUS_FLOW = ("QUEUED", "STARTED", "DONE")
MISSING = object()  # a measure the row does not carry at all


@dataclass
class Report:
    report_id: str
    start: date
    end: date
    dimensions: list[str]
    metrics: list[str]  # sent one value per row: metrics and discrepancy_metrics
    versions: dict[date, int]  # the retrieval number of each day, fixed when the report was created
    cohort_metrics: list[str] = field(default_factory=list)
    cohort_periods: list[str] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)  # time.monotonic() of each status poll
    failed: bool = False


@dataclass
class SingularSandbox:
    seed: int = 1
    rows_per_day: int = 40
    settle_days: int = 7
    today: date = field(default_factory=lambda: datetime.now(UTC).date())
    api_key: str = "sandbox-singular-api-key"
    fail_rate: float = 0.0
    polls_to_done: int = 2  # polls answered QUEUED/STARTED before DONE
    envelope: str = "results"
    max_running: int = 100
    # Late changes by age: {age in days: share of that day's rows whose numbers change with every
    # retrieval}. Empty: every row younger than `settle_days` changes.
    late_changes: dict[int, float] = field(default_factory=dict)
    reports: dict[str, Report] = field(default_factory=dict)
    retrievals: Counter[date] = field(default_factory=Counter)
    created: int = 0
    running: set[str] = field(default_factory=set)  # created, and DONE or FAILED not yet answered
    max_seen_running: int = 0
    refused_busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def combinations(self, dimensions: list[str]) -> list[tuple[str, ...]]:
        """The day's distinct dimension combinations (the same set every day)."""
        pools = [DIMENSIONS[d] for d in dimensions]
        every = list(product(*pools))
        salt = mix(self.seed * 104729 + sum(hash_kind(d) for d in dimensions))
        every.sort(key=lambda combo: mix(salt ^ hash_kind("|".join(combo))))
        return every[: self.rows_per_day]

    def _row_hash(self, day: date, combo: tuple[str, ...]) -> int:
        return mix(self.seed ^ hash_kind(f"{day}|{'|'.join(combo)}"))  # one row's measures stay consistent

    def measures(self, day: date, combo: tuple[str, ...], version: int) -> dict[str, Any]:
        """The true numbers of one row (revenues: their `actual` value), before Singular's quirks."""
        h = self._row_hash(day, combo)
        impressions = 1000 + h % 50000
        clicks = impressions // (20 + (h >> 20) % 30)
        installs = clicks // (5 + (h >> 30) % 10)
        cost = round(installs * (0.5 + ((h >> 40) % 300) / 100), 2)
        age = (self.today - day).days
        if self.late_changes:
            unsettled = (mix(h ^ age) % 10_000) / 10_000 < self.late_changes.get(age, 0.0)
        else:
            unsettled = 0 <= age < self.settle_days
        if unsettled:  # not golden: fraud is still being removed, more each retrieval
            keep = 1 - 0.04 * min(version, 5) - 0.01 * max(self.settle_days - age, 0)
            clicks, installs, cost = int(clicks * keep), int(installs * keep), round(cost * keep, 2)
        return {
            "adn_impressions": impressions, "adn_clicks": clicks, "adn_installs": installs, "adn_cost": cost,
            "adn_original_cost": cost, "custom_clicks": clicks, "custom_installs": installs,
            "custom_impressions": impressions, "tracker_clicks": clicks - clicks // 50,
            "tracker_installs": installs - installs // 20,
            "revenue": round(installs * 1.7, 2), "ad_revenue": round(installs * 0.3, 2),
            "unified_revenue": round(installs * 2.0, 2),
            "ctr": round(clicks / impressions, 6), "cvr": round(installs / clicks, 6) if clicks else None,
            "ecpi": round(cost / installs, 4) if installs else None,
            "ecpm": round(1000 * cost / impressions, 4),
        }

    def _as_sent(self, value: Any, h: int, metric: str) -> Any:
        """One value the way Singular may send it: sometimes a string, `""`, `"N/A"`, a float, or absent."""
        quirk = (h >> 50) % 25
        if quirk == 0:
            return str(float(value)) if value is not None else ""  # a number sent as a string
        if quirk == 1 and metric not in ("adn_impressions", "adn_cost"):
            return ""  # missing
        if quirk == 2 and metric in RATIOS:
            return "N/A"
        if quirk == 3 and metric != "adn_impressions":
            return MISSING  # the row does not carry the measure
        return float(value) if isinstance(value, int) and (h >> 45) % 2 else value

    def cell(self, metric: str, day: date, combo: tuple[str, ...], version: int) -> Any:
        """One flat measure of one row as sent (MISSING: the key is absent)."""
        h = mix(self._row_hash(day, combo) ^ hash_kind(metric))
        return self._as_sent(self.measures(day, combo, version)[metric], h, metric)

    def cohort_cell(self, metric: str, periods: list[str], day: date, combo: tuple[str, ...], version: int) -> Any:
        """One cohort measure of one row as sent: `{period: value}` (periods not reached yet are absent), or MISSING."""
        h = mix(self._row_hash(day, combo) ^ hash_kind(metric))
        if (h >> 50) % 25 == 3:
            return MISSING
        measures = self.measures(day, combo, version)
        installs = measures["adn_installs"]
        age = (self.today - day).days
        nested: dict[str, Any] = {}
        for period in periods:
            days = COHORT_PERIODS[period]
            if days > age:
                continue  # the cohort is not that old yet
            if metric == "retained_users":
                value: Any = round(installs * RETAINED_SHARE[days])
            elif metric == "retention_rate":
                value = round(RETAINED_SHARE[days], 4) if installs else None
            else:
                value = round(measures[metric] * REVENUE_SHARE[days], 2)
            sent = self._as_sent(value, mix(h ^ hash_kind(period)), metric)
            if sent is not MISSING:
                nested[period] = sent
        return nested

    def rows(self, report: Report) -> list[dict[str, Any]]:
        combos = self.combinations(report.dimensions)
        out = []
        day = report.start
        while day <= report.end:
            version = report.versions.get(day, 1)
            for combo in combos:
                row: dict[str, Any] = dict(zip(report.dimensions, combo, strict=True))
                row["start_date"] = row["end_date"] = day.isoformat()
                cells = [(m, self.cell(m, day, combo, version)) for m in report.metrics]
                cells += [(m, self.cohort_cell(m, report.cohort_periods, day, combo, version))
                          for m in report.cohort_metrics]
                row.update((m, v) for m, v in cells if v is not MISSING)
                h = self._row_hash(day, combo)
                row["data_connector_id"] = 4000 + h % 9  # fields nobody asked for
                if h % 3 == 0:
                    row["last_updated_utc"] = f"{day.isoformat()}T0{h % 10}:15:00"
                out.append(row)
            day += timedelta(days=1)
        return out

    def create(self, start: date, end: date, dimensions: list[str], metrics: list[str],
               cohort_metrics: list[str] | None = None, cohort_periods: list[str] | None = None) -> Report:
        versions: dict[date, int] = {}
        day = start
        while day <= end:
            self.retrievals[day] += 1
            versions[day] = self.retrievals[day]
            day += timedelta(days=1)
        self.created += 1
        failed = self.fail_rate > 0 and (mix(self.seed * 7 + self.created) % 10_000) / 10_000 < self.fail_rate
        report = Report(_random.token_hex(16), start, end, dimensions, metrics, versions,
                        list(cohort_metrics or []), list(cohort_periods or []), failed=failed)
        self.reports[report.report_id] = report
        self.running.add(report.report_id)
        self.max_seen_running = max(self.max_seen_running, len(self.running))
        return report

    def min_poll_gap(self) -> float | None:
        """The shortest time between two status polls of one report (None: no report was polled twice)."""
        gaps = [b - a for report in self.reports.values() for a, b in pairwise(report.polls)]
        return min(gaps) if gaps else None


def _envelope(value: Any, status: int = 0, http: int = 200) -> Response:
    return Response(orjson.dumps({"status": status, "substatus": 0, "value": value}), http,
                    media_type="application/json")


def _error(message: str, http: int) -> Response:
    return _envelope({"error": message}, status=1, http=http)


def singular_error(status: int) -> dict[str, Any]:
    messages = {429: "Too many requests, please retry later", 500: "Internal server error"}
    return {"status": 1, "substatus": status, "value": {"error": messages.get(status, "Internal server error")}}


def create_app(seed: int = 1, rows_per_day: int = 40, settle_days: int = 7, today: str | None = None,
               api_key: str = "sandbox-singular-api-key", fail_rate: float = 0.0, polls_to_done: int = 2,
               envelope: str = "results", max_running: int = 100, rate_429: float = 0.0, rate_5xx: float = 0.0,
               latency: float = 0.0, truncate_rate: float = 0.0, retry_after: float = 1.0,
               late_changes: dict[int, float] | None = None) -> Any:
    """The Singular emulator as an ASGI app; `app.state.singular` is the `SingularSandbox`."""
    sandbox = SingularSandbox(seed, rows_per_day, settle_days,
                              date.fromisoformat(today) if today else datetime.now(UTC).date(),
                              api_key, fail_rate, polls_to_done, envelope, max_running,
                              {int(age): share for age, share in (late_changes or {}).items()})
    faults = Faults(rate_429, rate_5xx, truncate_rate, latency, retry_after, seed)

    async def params(request: Request) -> dict[str, str]:
        values = dict(request.query_params)
        if request.method == "POST":
            # form-encoded, parsed here so the emulator needs no python-multipart
            values.update(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        return values

    def authorised(request: Request, values: dict[str, str]) -> bool:
        key = values.get("api_key") or request.headers.get("authorization", "")
        return key == sandbox.api_key

    def measures_refused(lists: dict[str, list[str]]) -> str | None:
        """Why Singular would refuse these metric parameters (None: it would not)."""
        for parameter in ("metrics", "discrepancy_metrics", "cohort_metrics"):
            for name in lists[parameter]:
                home = PARAMETER.get(name)
                if home is None:
                    return f"Unknown metric {name!r} in {parameter}"
                if home != parameter:
                    return f"{name!r} is not a valid value for {parameter}; send it in {home}"
        if bool(lists["cohort_metrics"]) != bool(lists["cohort_periods"]):
            return "cohort_metrics must be used with cohort_periods"
        unknown = [p for p in lists["cohort_periods"] if p not in COHORT_PERIODS]
        if unknown:
            return f"Unknown cohort_periods: {', '.join(unknown)} (available: {', '.join(COHORT_PERIODS)})"
        if not (lists["metrics"] or lists["discrepancy_metrics"] or lists["cohort_metrics"]):
            return "No metrics requested"
        return None

    async def create_report(request: Request) -> Response:
        values = await params(request)
        if not authorised(request, values):
            return _error("Invalid API key", 401)
        try:
            start, end = date.fromisoformat(values["start_date"]), date.fromisoformat(values["end_date"])
        except (KeyError, ValueError):
            return _error("start_date and end_date are required, as YYYY-MM-DD", 400)
        if end < start:
            return _error("end_date is before start_date", 400)
        if values.get("format", "json") != "json":
            return _error("this emulator serves format=json only", 400)
        dimensions = [d for d in values.get("dimensions", "app,os,source").split(",") if d]
        if unknown := [d for d in dimensions if d not in DIMENSIONS]:
            return _error(f"Unknown dimensions: {', '.join(unknown)}", 400)
        lists = {name: [m for m in values.get(name, default).split(",") if m] for name, default in (
            ("metrics", "adn_cost,adn_impressions"), ("discrepancy_metrics", ""), ("cohort_metrics", ""),
            ("cohort_periods", ""))}
        if refused := measures_refused(lists):
            return _error(refused, 400)
        if values.get("time_breakdown", "all") not in ("all", "day"):
            return _error("time_breakdown must be all or day in this emulator", 400)
        with sandbox.lock:
            if len(sandbox.running) >= sandbox.max_running:
                sandbox.refused_busy += 1
                return _error(f"Too many concurrent async reports (limit {sandbox.max_running})", 429)
            report = sandbox.create(start, end, dimensions, lists["metrics"] + lists["discrepancy_metrics"],
                                    lists["cohort_metrics"], lists["cohort_periods"])
        return _envelope({"report_id": report.report_id})

    async def report_status(request: Request) -> Response:
        values = await params(request)
        if not authorised(request, values):
            return _error("Invalid API key", 401)
        report = sandbox.reports.get(values.get("report_id", ""))
        if report is None:
            return _error("Report not found", 404)
        with sandbox.lock:
            report.polls.append(time.monotonic())
            step = min(len(report.polls) - 1, sandbox.polls_to_done)
            if step == sandbox.polls_to_done:
                sandbox.running.discard(report.report_id)
        value: dict[str, Any] = {"report_id": report.report_id}
        if step < sandbox.polls_to_done:
            value["status"] = STATUS_FLOW[min(step, 1)]
        elif report.failed:
            value.update(status="FAILED", error_message="Report generation failed: network data unavailable")
        else:
            base = str(request.base_url).rstrip("/")
            value.update(status="DONE", url_expires_in=3600, download_url=(
                f"{base}/singular-reports-results/{report.report_id}?Signature={_random.token_hex(8)}"
                f"&Expires=9999999999&AWSAccessKeyId=ASIASANDBOX"))
        return _envelope(value)

    async def download(request: Request) -> Response:
        report = sandbox.reports.get(request.path_params["report_id"])
        if report is None or report.failed:
            return Response(b"<Error><Code>NoSuchKey</Code></Error>", 404, media_type="application/xml")
        rows = sandbox.rows(report)
        document: Any = {
            "results": {"results": rows},
            "value": {"status": 0, "substatus": 0, "value": {"results": rows, "report_id": report.report_id}},
            "list": rows,
        }.get(sandbox.envelope, {sandbox.envelope: rows})
        return Response(orjson.dumps(document), media_type="application/json")

    async def cohort_metrics(request: Request) -> Response:
        if not authorised(request, await params(request)):
            return _error("Invalid API key", 401)
        names = [m for m, parameter in PARAMETER.items() if parameter == "cohort_metrics"]
        return _envelope({"periods": list(COHORT_PERIODS), "metrics": [
            {"name": m, "display_name": m.replace("_", " ").title()} for m in names]})

    app = Starlette(routes=[
        Route("/api/v2.0/create_async_report", create_report, methods=["POST"]),
        Route("/api/v2.0/get_report_status", report_status),
        Route("/api/cohort_metrics", cohort_metrics),
        Route("/singular-reports-results/{report_id}", download),
    ])
    wrapped = FaultMiddleware(app, faults, singular_error)
    wrapped.state = app.state  # type: ignore[attr-defined]
    app.state.singular = sandbox
    app.state.faults = faults
    return wrapped


def describe(app: Any, url: str) -> dict[str, Any]:
    """Credentials and a floe.yml source entry for a running Singular emulator."""
    sandbox: SingularSandbox = app.state.singular
    base = f"{url}/api"
    return {"credentials": {"base_url": base, "api_key": sandbox.api_key},
            "sources": {"singular": {"type": "singular", "api_key": sandbox.api_key, "base_url": base,
                                     "lookback_days": 7, "poll_interval": 0.2}}}
