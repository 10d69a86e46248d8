"""A local Singular Reporting API v2.0 emulator (shared/reference/twilio_singular.md §3.2).

`POST /api/v2.0/create_async_report` (form-encoded; `api_key` parameter or a raw `Authorization`
header) -> `{"status":0,"substatus":0,"value":{"report_id":…}}`; `GET /api/v2.0/get_report_status`
walks QUEUED -> STARTED -> DONE (or FAILED for a share `fail_rate` of reports), one step per poll;
on DONE, `download_url` is a pre-signed-looking URL served without auth: `{"results":[row…]}`.

Data is a pure function of (seed, rows_per_day, day, retrieval): every day has `rows_per_day`
dimension combinations; spend for the last `settle_days` days before `today` is not golden yet:
it shrinks a little with every report created for that day, as networks remove fraudulent clicks.
Quirks real clients meet: some numbers sent as strings, `""` for missing values, `"N/A"` dimension values.
"""

from __future__ import annotations

import secrets as _random
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import product
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
METRICS = ("adn_impressions", "adn_clicks", "adn_installs", "adn_cost", "adn_original_cost", "custom_clicks",
           "custom_installs", "custom_impressions", "tracker_installs", "revenue", "ad_revenue", "ctr", "cvr",
           "ecpi", "ecpm")
STATUS_FLOW = ("QUEUED", "STARTED", "DONE")


@dataclass
class Report:
    report_id: str
    start: date
    end: date
    dimensions: list[str]
    metrics: list[str]
    versions: dict[date, int]  # the retrieval number of each day, fixed when the report was created
    polls: int = 0
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
    reports: dict[str, Report] = field(default_factory=dict)
    retrievals: Counter[date] = field(default_factory=Counter)
    created: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def combinations(self, dimensions: list[str]) -> list[tuple[str, ...]]:
        """The day's distinct dimension combinations (the same set every day)."""
        pools = [DIMENSIONS[d] for d in dimensions]
        every = list(product(*pools))
        salt = mix(self.seed * 104729 + sum(hash_kind(d) for d in dimensions))
        every.sort(key=lambda combo: mix(salt ^ hash_kind("|".join(combo))))
        return every[: self.rows_per_day]

    def value(self, metric: str, day: date, combo: tuple[str, ...], version: int) -> Any:
        """One metric of one row: deterministic, shrinking per retrieval while the day is not golden."""
        h = mix(self.seed ^ hash_kind(f"{day}|{'|'.join(combo)}"))  # one row's metrics stay consistent
        impressions = 1000 + h % 50000
        clicks = impressions // (20 + (h >> 20) % 30)
        installs = clicks // (5 + (h >> 30) % 10)
        cost = round(installs * (0.5 + ((h >> 40) % 300) / 100), 2)
        age = (self.today - day).days
        if 0 <= age < self.settle_days:  # not golden: fraud is still being removed, more each retrieval
            keep = 1 - 0.04 * min(version, 5) - 0.01 * (self.settle_days - age)
            clicks, installs, cost = int(clicks * keep), int(installs * keep), round(cost * keep, 2)
        base: dict[str, Any] = {
            "adn_impressions": impressions, "adn_clicks": clicks, "adn_installs": installs, "adn_cost": cost,
            "adn_original_cost": cost, "custom_clicks": clicks, "custom_installs": installs,
            "custom_impressions": impressions, "tracker_installs": installs,
            "revenue": round(installs * 1.7, 2), "ad_revenue": round(installs * 0.3, 2),
            "ctr": round(clicks / impressions, 6), "cvr": round(installs / clicks, 6) if clicks else None,
            "ecpi": round(cost / installs, 4) if installs else None,
            "ecpm": round(1000 * cost / impressions, 4),
        }
        value = base[metric]
        h = mix(h ^ hash_kind(metric))
        quirk = (h >> 50) % 25
        if quirk == 0:
            return str(float(value)) if value is not None else ""  # a number sent as a string
        if quirk == 1 and metric not in ("adn_impressions", "adn_cost"):
            return ""  # missing
        if quirk == 2 and metric in ("ctr", "cvr", "ecpi", "ecpm"):
            return "N/A"
        return float(value) if isinstance(value, int) and (h >> 45) % 2 else value

    def rows(self, report: Report) -> list[dict[str, Any]]:
        combos = self.combinations(report.dimensions)
        out = []
        day = report.start
        while day <= report.end:
            version = report.versions.get(day, 1)
            for combo in combos:
                row: dict[str, Any] = dict(zip(report.dimensions, combo, strict=True))
                row["start_date"] = row["end_date"] = day.isoformat()
                for metric in report.metrics:
                    row[metric] = self.value(metric, day, combo, version)
                out.append(row)
            day += timedelta(days=1)
        return out

    def create(self, start: date, end: date, dimensions: list[str], metrics: list[str]) -> Report:
        versions: dict[date, int] = {}
        day = start
        while day <= end:
            self.retrievals[day] += 1
            versions[day] = self.retrievals[day]
            day += timedelta(days=1)
        self.created += 1
        failed = self.fail_rate > 0 and (mix(self.seed * 7 + self.created) % 10_000) / 10_000 < self.fail_rate
        report = Report(_random.token_hex(16), start, end, dimensions, metrics, versions, failed=failed)
        self.reports[report.report_id] = report
        return report


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
               rate_429: float = 0.0, rate_5xx: float = 0.0, latency: float = 0.0, truncate_rate: float = 0.0,
               retry_after: float = 1.0) -> Any:
    """The Singular emulator as an ASGI app; `app.state.singular` is the `SingularSandbox`."""
    sandbox = SingularSandbox(seed, rows_per_day, settle_days,
                              date.fromisoformat(today) if today else datetime.now(UTC).date(),
                              api_key, fail_rate, polls_to_done)
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
        metrics = [m for m in values.get("metrics", "adn_cost,adn_impressions").split(",") if m]
        unknown = [d for d in dimensions if d not in DIMENSIONS] + [m for m in metrics if m not in METRICS]
        if unknown:
            return _error(f"Unknown dimensions or metrics: {', '.join(unknown)}", 400)
        if values.get("time_breakdown", "all") not in ("all", "day"):
            return _error("time_breakdown must be all or day in this emulator", 400)
        with sandbox.lock:
            report = sandbox.create(start, end, dimensions, metrics)
        return _envelope({"report_id": report.report_id})

    async def report_status(request: Request) -> Response:
        values = await params(request)
        if not authorised(request, values):
            return _error("Invalid API key", 401)
        report = sandbox.reports.get(values.get("report_id", ""))
        if report is None:
            return _error("Report not found", 404)
        with sandbox.lock:
            report.polls += 1
            step = min(report.polls - 1, sandbox.polls_to_done)
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
        return Response(orjson.dumps({"results": sandbox.rows(report)}), media_type="application/json")

    app = Starlette(routes=[
        Route("/api/v2.0/create_async_report", create_report, methods=["POST"]),
        Route("/api/v2.0/get_report_status", report_status),
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
