"""Singular source end to end: async reports over real HTTP against the emulator, into DuckDB (and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pyarrow as pa
import pytest

from floe.config import parse_config
from floe.core.errors import ConfigError, SourceError
from floe.engine import runner
from floe.sandbox import singular as emu
from floe.sources.singular import (
    DEFAULT_COHORT_METRICS,
    DEFAULT_COHORT_PERIODS,
    DEFAULT_DIMENSIONS,
    DEFAULT_DISCREPANCY_METRICS,
    DEFAULT_METRICS,
    SingularConfig,
    SingularSource,
    metric_type,
    number,
    report_rows,
)

TODAY = datetime.now(UTC).date()
LOOKBACK = 9
ROWS = 12
FLAT = [*DEFAULT_METRICS, *DEFAULT_DISCREPANCY_METRICS]
COHORT = [f"{m}_{p}" for m in DEFAULT_COHORT_METRICS for p in DEFAULT_COHORT_PERIODS]
COLUMNS = ", ".join(["reporting_date", *DEFAULT_DIMENSIONS, *FLAT, *COHORT])


def start(emulator: Any, **options: Any) -> tuple[Any, emu.SingularSandbox]:
    options.setdefault("rows_per_day", ROWS)
    options.setdefault("today", TODAY.isoformat())
    server = emulator(emu.create_app, **options)
    return server, server.app.state.singular


def source(server: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "singular", "api_key": "sandbox-singular-api-key", "base_url": f"{server.url}/api",
            "lookback_days": LOOKBACK, "end_date": TODAY.isoformat(), "poll_interval": 0.01, **extra}


def stored(metric: str, sent: Any) -> Any:
    """A value as the warehouse should hold it, from the value as the emulator sent it."""
    value = None if sent is emu.MISSING else number(sent)
    if value is None or metric_type(metric) == pa.float64():
        return value
    return round(value) if metric_type(metric) == pa.int64() else Decimal(repr(value)).quantize(Decimal("0.000001"))


def expected(sandbox: emu.SingularSandbox, version: int, lookback: int = LOOKBACK) -> set[tuple[Any, ...]]:
    """Rows as the source should store them: (day, dims..., metrics..., cohort values...)."""
    rows = set()
    for k in range(lookback + 1):
        day = TODAY - timedelta(days=k)
        for combo in sandbox.combinations(DEFAULT_DIMENSIONS):
            values = [stored(m, sandbox.cell(m, day, combo, version)) for m in FLAT]
            for metric in DEFAULT_COHORT_METRICS:
                nested = sandbox.cohort_cell(metric, DEFAULT_COHORT_PERIODS, day, combo, version)
                nested = {} if nested is emu.MISSING else nested
                values += [stored(metric, nested.get(p)) for p in DEFAULT_COHORT_PERIODS]
            rows.add((day, *combo, *values))
    return rows


def column_types(project: Any, table: str = "campaign_stats") -> dict[str, str]:
    return dict(project.query("SELECT column_name, data_type FROM information_schema.columns "
                              "WHERE table_schema = 'ads' AND table_name = ?", (table,)))


def test_each_run_appends_one_retrieval_and_the_latest_view_keeps_the_newest(emulator: Any, api_project: Any) -> None:
    server, sandbox = start(emulator)
    project = api_project(ads=source(server))
    for _ in range(2):
        results = project.run()
        assert all(r.ok for r in results), [r.error for r in results]
    days = LOOKBACK + 1
    assert project.query("SELECT count(*), count(DISTINCT when_retrieved) FROM ads.campaign_stats") == [
        (2 * days * ROWS, 2)]
    first, second = sorted(r[0] for r in project.query("SELECT DISTINCT when_retrieved FROM ads.campaign_stats"))

    # every retrieval holds exactly what the emulator served at that time
    for when, version in ((first, 1), (second, 2)):
        rows = set(project.query(f"SELECT {COLUMNS} FROM ads.campaign_stats WHERE when_retrieved = ?", (when,)))
        assert rows == expected(sandbox, version)

    latest = project.query(f"SELECT {COLUMNS}, when_retrieved FROM ads.campaign_stats_latest")
    assert len(latest) == days * ROWS and {r[-1] for r in latest} == {second}
    assert {r[:-1] for r in latest} == expected(sandbox, 2)

    # spend for recent days is not golden yet: it changed between the retrievals; older days did not
    changed = project.query(
        "SELECT a.reporting_date, count(*) FROM ads.campaign_stats a JOIN ads.campaign_stats b "
        "ON a.reporting_date = b.reporting_date AND a.app = b.app AND a.source = b.source AND a.os = b.os "
        "AND a.country_field = b.country_field AND a.adn_campaign_name = b.adn_campaign_name "
        "WHERE a.when_retrieved = ? AND b.when_retrieved = ? AND a.adn_cost IS DISTINCT FROM b.adn_cost "
        "GROUP BY 1", (first, second))
    assert changed and all((TODAY - day).days < sandbox.settle_days for day, _ in changed)


def test_every_cohort_period_is_a_numeric_column_of_the_table_and_the_latest_view(emulator: Any,
                                                                                  api_project: Any) -> None:
    server, sandbox = start(emulator, rows_per_day=6)
    end = TODAY - timedelta(days=22)  # cohorts 22 to 31 days old: the 30d period is reached by the oldest only
    project = api_project(ads=source(server, cohort_metrics=["revenue", "retained_users"], end_date=end.isoformat()))
    assert all(r.ok for r in project.run())
    for table in ("campaign_stats", "campaign_stats_latest"):
        types = column_types(project, table)
        assert {types[f"revenue_{p}"] for p in DEFAULT_COHORT_PERIODS} == {"DECIMAL(18,6)"}, table
        assert {types[f"retained_users_{p}"] for p in DEFAULT_COHORT_PERIODS} == {"BIGINT"}, table
        assert "revenue" not in types
    by_age = {(TODAY - day).days: counts for day, *counts in project.query(
        "SELECT reporting_date, count(*), count(revenue_1d), count(revenue_14d), count(revenue_30d), "
        "count(retained_users_30d), count(*) FILTER (WHERE revenue_actual < revenue_7d) "
        "FROM ads.campaign_stats_latest GROUP BY 1")}
    assert sorted(by_age) == list(range(22, 32))
    assert all(counts[1] > 0 and counts[2] > 0 for counts in by_age.values()), by_age
    assert all((counts[3] > 0 and counts[4] > 0) == (age >= 30) for age, counts in by_age.items())
    assert sum(counts[5] for counts in by_age.values()) == 0  # the actual value is the largest
    sent = {(day, *combo): sandbox.cohort_cell("revenue", DEFAULT_COHORT_PERIODS, day, combo, 1)
            for k in range(22, 32) if (day := TODAY - timedelta(days=k))
            for combo in sandbox.combinations(DEFAULT_DIMENSIONS)}
    stored_rows = project.query(f"SELECT reporting_date, {', '.join(DEFAULT_DIMENSIONS)}, "
                                f"{', '.join(COHORT[:5])} FROM ads.campaign_stats")
    assert len(stored_rows) == len(sent) == 10 * 6
    for row in stored_rows:
        nested = sent[row[:6]]
        nested = {} if nested is emu.MISSING else nested
        assert list(row[6:]) == [stored("revenue", nested.get(p)) for p in DEFAULT_COHORT_PERIODS]


@pytest.mark.parametrize(("key", "names", "message"), [
    ("metrics", ["adn_cost", "adn_clicks"], "sources.ads.metrics: .*adn_clicks belongs in discrepancy_metrics"),
    ("metrics", ["revenue"], "sources.ads.metrics: .*revenue belongs in cohort_metrics"),
    ("discrepancy_metrics", ["adn_cost"], "sources.ads.discrepancy_metrics: .*adn_cost belongs in metrics"),
    ("discrepancy_metrics", ["my_custom"], "my_custom is not a discrepancy metric .*metrics or cohort_metrics"),
    ("cohort_metrics", ["tracker_installs"], "sources.ads.cohort_metrics: .*tracker_installs belongs in discrepancy"),
    ("cohort_metrics", ["ecpi"], "sources.ads.cohort_metrics: .*ecpi belongs in metrics"),
    ("cohort_periods", [], "cohort_metrics needs cohort_periods"),
])
def test_a_metric_in_the_wrong_list_is_a_config_error_naming_it_and_its_list(key: str, names: list[str],
                                                                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"sources": {"ads": {"type": "singular", "api_key": "k" * 10, key: names}}})


def test_defaults_request_each_measure_in_its_parameter_and_poll_like_the_official_client() -> None:
    config = SingularConfig(api_key="k" * 10)
    form = config.form(date(2026, 3, 1))
    assert form["metrics"] == "adn_impressions,adn_cost,custom_installs"
    assert form["discrepancy_metrics"] == "adn_clicks,adn_installs"
    assert form["cohort_metrics"] == "revenue" and form["cohort_periods"].split(",")[-1] == "actual"
    assert config.poll_interval >= 10 and config.max_queued_reports == 10
    # custom names (account-defined metrics, cohort metrics by id) pass through as given
    custom = SingularConfig(api_key="k" * 10, metrics=["adn_cost", "my_metric"], cohort_metrics=["arpu", "ltv_x"],
                            cohort_periods=["7d"])
    assert custom.form(date(2026, 3, 1))["cohort_metrics"] == "arpu,ltv_x"


def test_the_emulator_refuses_what_singular_refuses(emulator: Any) -> None:
    server, sandbox = start(emulator)
    good = {"start_date": "2026-01-01", "end_date": "2026-01-01", "dimensions": "app", "metrics": "adn_cost"}
    refused = [
        ({"metrics": "adn_cost,adn_clicks"}, "send it in discrepancy_metrics"),
        ({"metrics": "revenue"}, "send it in cohort_metrics"),
        ({"discrepancy_metrics": "adn_cost"}, "send it in metrics"),
        ({"cohort_metrics": "revenue"}, "cohort_metrics must be used with cohort_periods"),
        ({"cohort_periods": "7d"}, "cohort_metrics must be used with cohort_periods"),
        ({"cohort_metrics": "revenue", "cohort_periods": "7d,9d"}, "Unknown cohort_periods: 9d"),
        ({"metrics": "adn_nothing"}, "Unknown metric"),
    ]
    with httpx.Client(base_url=f"{server.url}/api", headers={"Authorization": sandbox.api_key}) as client:
        for change, message in refused:
            response = client.post("/v2.0/create_async_report", data={**good, **change})
            assert response.status_code == 400, change
            body = response.json()
            assert body["status"] != 0 and message in body["value"]["error"], (change, body)
        assert client.post("/v2.0/create_async_report", data=good).json()["status"] == 0
        periods = client.get("/cohort_metrics").json()["value"]["periods"]
        assert set(DEFAULT_COHORT_PERIODS) <= set(periods)
    assert sandbox.created == 1


def test_the_emulator_sends_what_real_clients_meet(emulator: Any) -> None:
    """Numbers as strings or "", "N/A", metrics missing from rows, unknown fields, cohort values by period."""
    _, sandbox = start(emulator, rows_per_day=60)
    report = sandbox.create(TODAY - timedelta(days=40), TODAY, DEFAULT_DIMENSIONS, [*FLAT, "ctr"],
                            ["revenue"], DEFAULT_COHORT_PERIODS)
    rows = sandbox.rows(report)
    flat = [row.get(m, emu.MISSING) for row in rows for m in [*FLAT, "ctr"]]
    assert "" in flat and "N/A" in flat and emu.MISSING in flat
    assert any(isinstance(v, str) and v not in ("", "N/A") for v in flat)
    assert any(isinstance(v, float) and v.is_integer() for v in flat)
    assert any(row.get("country_field") == "N/A" for row in rows)
    assert all("data_connector_id" in row for row in rows)
    cohorts = [row["revenue"] for row in rows if "revenue" in row]
    assert len(cohorts) < len(rows) and all(isinstance(c, dict) for c in cohorts)
    assert any(set(c) == set(DEFAULT_COHORT_PERIODS) for c in cohorts)
    assert any("30d" not in c and "actual" in c for c in cohorts)  # young cohorts lack the long periods
    assert any(isinstance(v, str) for c in cohorts for v in c.values())


def test_numbers_sent_as_strings_empty_and_na_are_handled(emulator: Any, api_project: Any) -> None:
    server, _ = start(emulator, rows_per_day=60)
    project = api_project(ads=source(server, metrics=[*DEFAULT_METRICS, "ctr", "ecpi"], lookback_days=3))
    assert all(r.ok for r in project.run())
    types = column_types(project)
    assert types["adn_impressions"] == "BIGINT" and types["adn_cost"] == "DECIMAL(18,6)" and types["ctr"] == "DOUBLE"
    assert types["adn_clicks"] == "BIGINT" and types["revenue_actual"] == "DECIMAL(18,6)" and types["ecpi"] == "DOUBLE"
    assert "data_connector_id" not in types  # fields not asked for are not columns
    assert project.query("SELECT count(*) FROM ads.campaign_stats WHERE country_field = 'N/A'")[0][0] > 0
    nulls = project.query("SELECT count(*) FILTER (WHERE adn_clicks IS NULL), count(*) FILTER (WHERE ctr IS NULL), "
                          "count(*) FILTER (WHERE revenue_actual IS NULL) FROM ads.campaign_stats")[0]
    assert all(n > 0 for n in nulls)


def test_the_older_value_results_download_loads_the_same_rows(emulator: Any, api_project: Any) -> None:
    loaded = []
    for envelope in ("results", "value"):
        server, _ = start(emulator, envelope=envelope)
        project = api_project(ads=source(server, lookback_days=2))
        assert all(r.ok for r in project.run())
        loaded.append(set(project.query(f"SELECT {COLUMNS} FROM ads.campaign_stats")))
    assert len(loaded[0]) == 3 * ROWS and loaded[0] == loaded[1]


@pytest.mark.parametrize(("envelope", "got"), [("data", "an object with keys data"), ("list", "an array")])
def test_a_download_of_another_shape_is_an_error_naming_the_report(emulator: Any, api_project: Any,
                                                                   envelope: str, got: str) -> None:
    server, sandbox = start(emulator, envelope=envelope)
    project = api_project(ads=source(server, lookback_days=2))
    results = project.run()
    assert not results[0].ok
    error = results[0].error or ""
    assert any(f"ads: report {report_id} for " in error for report_id in sandbox.reports), error
    assert 'is not {"results": [row, ...]}' in error and got in error
    assert project.query("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'ads'") == [(0,)]


def test_reports_are_polled_no_faster_and_queued_no_more_than_configured(emulator: Any, api_project: Any) -> None:
    server, sandbox = start(emulator, polls_to_done=2)
    project = api_project(ads=source(server, lookback_days=7, poll_interval=0.2, max_queued_reports=3))
    assert all(r.ok for r in project.run())
    assert sandbox.created == 8 and sandbox.max_seen_running == 3
    assert all(len(report.polls) == 3 for report in sandbox.reports.values())
    gap = sandbox.min_poll_gap()
    assert gap is not None and gap >= 0.2


def test_reports_beyond_singulars_concurrency_limit_are_retried(emulator: Any, api_project: Any) -> None:
    server, sandbox = start(emulator, max_running=2)
    project = api_project(ads=source(server, lookback_days=5, max_queued_reports=4))
    assert all(r.ok for r in project.run())
    assert sandbox.refused_busy > 0 and sandbox.max_seen_running == 2
    assert project.query("SELECT count(*) FROM ads.campaign_stats") == [(6 * ROWS,)]


# The run_report example output in singular_api_client's README (the older `value.results` shape).
PUBLISHED = {"status": 0, "substatus": 0, "value": {"results": [
    {"adn_campaign_name": "Simba_Android", "end_date": "2018-03-18", "adn_installs": 97.0, "country_field": "DEU",
     "adn_clicks": 743.0, "start_date": "2018-03-15"},
    {"adn_campaign_name": "Simba_Search", "end_date": "2018-03-18", "adn_installs": 95.0, "country_field": "GBR",
     "adn_clicks": 907.0, "start_date": "2018-03-15"},
], "report_id": "3eb7be4925b1489b9c92207e3c9c1ca1"}}


def report_stream(**settings: Any) -> Any:
    config = parse_config({"sources": {"ads": {"type": "singular", "api_key": "k" * 10, **settings}}}).sources["ads"]
    return SingularSource("ads", config).streams()[0]


def test_the_published_example_report_loads_with_its_types() -> None:
    stream = report_stream(dimensions=["adn_campaign_name", "country_field"], metrics=[], cohort_metrics=[])
    batch = stream.to_batch(date(2018, 3, 18), report_rows(PUBLISHED, "report"), "report")
    assert batch.schema.field("adn_clicks").type == metric_type("adn_clicks") == batch.column("adn_clicks").type
    assert batch.to_pydict() | {"when_retrieved": None} == {
        "channel_name": ["ads", "ads"], "when_retrieved": None, "reporting_date": [date(2018, 3, 15)] * 2,
        "adn_campaign_name": ["Simba_Android", "Simba_Search"], "country_field": ["DEU", "GBR"],
        "adn_clicks": [743, 907], "adn_installs": [97, 95]}


def test_cohort_values_nested_flat_or_missing() -> None:
    rows = [{"start_date": "2026-01-01", "app": "A", "revenue": {"actual": "88.5", "7d": 40.1, "30d": ""}},
            {"start_date": "2026-01-01", "app": "B", "revenue": {"actual": 12}},
            {"start_date": "2026-01-01", "app": "C"}]
    stream = report_stream(dimensions=["app"], metrics=["adn_cost"], discrepancy_metrics=[],
                           cohort_periods=["7d", "30d", "actual"])
    columns = stream.to_batch(date(2026, 1, 1), rows).to_pydict()
    assert columns["revenue_actual"] == [Decimal("88.5"), Decimal(12), None]
    assert columns["revenue_7d"] == [Decimal("40.1"), None, None]
    assert columns["revenue_30d"] == [None, None, None] and columns["adn_cost"] == [None, None, None]
    flat = [{"start_date": "2026-01-01", "app": "A", "revenue": "7.5"}]
    with pytest.raises(SourceError, match=r"report 42: revenue came as one value \('7.5'\), not keyed by period"):
        stream.to_batch(date(2026, 1, 1), flat, "report 42")
    one_period = report_stream(dimensions=["app"], cohort_periods=["actual"])
    assert one_period.to_batch(date(2026, 1, 1), flat).column("revenue_actual").to_pylist() == [Decimal("7.5")]


def test_failed_reports_are_created_again(emulator: Any, api_project: Any) -> None:
    server, sandbox = start(emulator, fail_rate=0.4)
    project = api_project(ads=source(server, report_retries=8, lookback_days=9))
    assert all(r.ok for r in project.run())
    assert sandbox.created > 10  # some reports failed and were created again
    assert project.query("SELECT count(*) FROM ads.campaign_stats") == [(10 * ROWS,)]


def test_a_report_that_keeps_failing_appends_nothing(emulator: Any, api_project: Any) -> None:
    server, _ = start(emulator, fail_rate=1.0)
    project = api_project(ads=source(server, report_retries=1))
    results = project.run()
    assert not results[0].ok
    assert "ads: report" in results[0].error and "FAILED: Report generation failed" in results[0].error
    assert project.query("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'ads'") == [(0,)]


def test_wrong_api_key_names_the_source_and_singulars_message(emulator: Any, api_project: Any) -> None:
    server, _ = start(emulator)
    project = api_project(ads=source(server, api_key="not-the-right-key"))
    result = project.cli("run")
    assert result.exit_code != 0
    output = result.stderr + result.stdout
    assert "ads: HTTP 401: Invalid API key" in output and "not-the-right-key" not in output


def test_latest_view_works_on_postgresql(emulator: Any, tmp_path: Any, postgres_db: Any) -> None:
    server, _ = start(emulator, rows_per_day=5)
    config = parse_config({"sources": {"ads": source(server, lookback_days=9)},
                           "destinations": {"pg": postgres_db.config()}, "stage": str(tmp_path / "stage")})
    for _ in range(2):
        assert all(r.ok for r in runner.run(config))
    with psycopg.connect(postgres_db.dsn) as conn:
        total = conn.execute("SELECT count(*), count(DISTINCT when_retrieved) FROM ads.campaign_stats").fetchone()
        latest = conn.execute("SELECT count(*), count(DISTINCT when_retrieved), max(when_retrieved), "
                              "count(revenue_7d), sum(revenue_actual) FROM ads.campaign_stats_latest").fetchone()
        newest = conn.execute("SELECT max(when_retrieved) FROM ads.campaign_stats").fetchone()
    assert total == (2 * 10 * 5, 2)
    assert latest is not None and latest[:3] == (10 * 5, 1, newest[0]) and latest[3] > 0 and latest[4] > 0


def test_reports_cover_the_lookback_days_and_the_end_day() -> None:
    stream = report_stream(lookback_days=3, end_date="2026-02-02")
    assert stream.days() == [date(2026, 1, 30), date(2026, 1, 31), date(2026, 2, 1), date(2026, 2, 2)]
    assert stream.views[0][0] == "campaign_stats_latest"
