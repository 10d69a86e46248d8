"""Singular source end to end: async reports over real HTTP against the emulator, into DuckDB (and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from floe.config import parse_config
from floe.engine import runner
from floe.sandbox import singular as emu
from floe.sources.singular import DEFAULT_DIMENSIONS, DEFAULT_METRICS, metric_type, number

TODAY = datetime.now(UTC).date()
LOOKBACK = 9
ROWS = 15


def start(emulator: Any, **options: Any) -> tuple[Any, emu.SingularSandbox]:
    options.setdefault("rows_per_day", ROWS)
    options.setdefault("today", TODAY.isoformat())
    server = emulator(emu.create_app, **options)
    return server, server.app.state.singular


def source(server: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "singular", "api_key": "sandbox-singular-api-key", "base_url": f"{server.url}/api",
            "lookback_days": LOOKBACK, "end_date": TODAY.isoformat(), "poll_interval": 0.01, **extra}


def expected(sandbox: emu.SingularSandbox, version: int) -> set[tuple[Any, ...]]:
    """Rows as the source should store them: (day, dims..., metrics...) with Singular's quirks resolved."""
    rows = set()
    for k in range(LOOKBACK + 1):
        day = TODAY - timedelta(days=k)
        for combo in sandbox.combinations(DEFAULT_DIMENSIONS):
            values = []
            for m in DEFAULT_METRICS:
                v = number(sandbox.value(m, day, combo, version))
                values.append(None if v is None else round(v) if metric_type(m).equals(metric_type("x_installs"))
                              else v)
            rows.add((day, *combo, *values))
    return rows


COLUMNS = ", ".join(["reporting_date", *DEFAULT_DIMENSIONS, *DEFAULT_METRICS])


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


def test_numbers_sent_as_strings_empty_and_na_are_handled(emulator: Any, api_project: Any) -> None:
    server, sandbox = start(emulator, rows_per_day=60)
    sent = [sandbox.value(m, TODAY - timedelta(days=k), combo, 1) for k in range(LOOKBACK + 1)
            for combo in sandbox.combinations(DEFAULT_DIMENSIONS) for m in DEFAULT_METRICS]
    assert "" in sent and any(isinstance(v, str) and v not in ("", "N/A") for v in sent)
    project = api_project(ads=source(server, metrics=[*DEFAULT_METRICS, "ctr", "ecpi"]))
    assert all(r.ok for r in project.run())
    types = dict(project.query("SELECT column_name, data_type FROM information_schema.columns "
                               "WHERE table_schema = 'ads' AND table_name = 'campaign_stats'"))
    assert types["adn_impressions"] == "BIGINT" and types["adn_cost"] == "DOUBLE" and types["ctr"] == "DOUBLE"
    assert project.query("SELECT count(*) FROM ads.campaign_stats WHERE country_field = 'N/A'")[0][0] > 0
    nulls = project.query("SELECT count(*) FILTER (WHERE adn_clicks IS NULL), count(*) FILTER (WHERE ctr IS NULL) "
                          "FROM ads.campaign_stats")[0]
    assert nulls[0] > 0 and nulls[1] > 0


def test_failed_reports_are_created_again(emulator: Any, api_project: Any) -> None:
    server, sandbox = start(emulator, fail_rate=0.4)
    project = api_project(ads=source(server, report_retries=8))
    assert all(r.ok for r in project.run())
    assert sandbox.created > LOOKBACK + 1  # some reports failed and were created again
    assert project.query("SELECT count(*) FROM ads.campaign_stats") == [((LOOKBACK + 1) * ROWS,)]


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
    server, sandbox = start(emulator, rows_per_day=5)
    config = parse_config({"sources": {"ads": source(server)}, "destinations": {"pg": postgres_db.config()},
                           "stage": str(tmp_path / "stage")})
    for _ in range(2):
        assert all(r.ok for r in runner.run(config))
    with psycopg.connect(postgres_db.dsn) as conn:
        total = conn.execute("SELECT count(*), count(DISTINCT when_retrieved) FROM ads.campaign_stats").fetchone()
        latest = conn.execute("SELECT count(*), count(DISTINCT when_retrieved), max(when_retrieved) "
                              "FROM ads.campaign_stats_latest").fetchone()
        newest = conn.execute("SELECT max(when_retrieved) FROM ads.campaign_stats").fetchone()
    assert total == (2 * (LOOKBACK + 1) * 5, 2)
    assert latest == ((LOOKBACK + 1) * 5, 1, newest[0])


def test_reports_cover_the_lookback_days_and_the_end_day() -> None:
    from floe.sources.singular import SingularSource

    config = parse_config({"sources": {"ads": {"type": "singular", "api_key": "k" * 10, "lookback_days": 3,
                                               "end_date": "2026-02-02"}}}).sources["ads"]
    stream = SingularSource("ads", config).streams()[0]
    assert stream.days() == [date(2026, 1, 30), date(2026, 1, 31), date(2026, 2, 1), date(2026, 2, 2)]
    assert stream.views[0][0] == "campaign_stats_latest"
