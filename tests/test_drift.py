"""Late-data drift: every lookback re-read records its changes by age in `_floe_drift`, in the load's
transaction, on DuckDB, PostgreSQL, Redshift (replayed on PostgreSQL, tests/fixtures/redshift.py) and
BigQuery (its SQL run on DuckDB, tests/bigquery_emulator.py);
`floe drift` turns them into the lookback that would catch them."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.config import parse_config
from floe.core.plugins import destination_registry
from floe.engine import runner
from floe.sandbox import singular as emu

ROWS = 20
# Which share of each age's rows Singular still changes: most within a day, a few as late as 5 days.
LATE = {0: 1.0, 1: 0.8, 2: 0.3, 5: 0.05}


def destination(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "duckdb":
        return {"type": "duckdb", "path": str(tmp_path / "w.duckdb")}
    if kind == "redshift":  # `type: redshift` is replayed on PostgreSQL, its COPY from the S3 stage too
        from tests.fixtures.redshift import redshift_settings

        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setitem(destination_registry._entries, "redshift", "tests.fixtures.redshift:RedshiftOnPostgres")
        return redshift_settings(request.getfixturevalue("postgres_db"), request.getfixturevalue("s3_server"),
                                 request.getfixturevalue("s3_bucket"))
    if kind == "bigquery":  # tests/bigquery_emulator.py: BigQuery's SQL run on DuckDB, over the GCS emulator
        from tests.fixtures.destinations import place_of

        return place_of(kind, request, tmp_path).settings
    return dict(request.getfixturevalue("postgres_db").config())


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "redshift", "bigquery"])
def test_each_re_read_records_changes_by_age_and_drift_suggests_a_lookback(
        kind: str, emulator: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    today = datetime.now(UTC).date()  # the loads' day (ages count from it), not the module import's
    server = emulator(emu.create_app, rows_per_day=ROWS, today=today.isoformat(), late_changes=LATE)
    settings = {"sources": {"ads": {
        "type": "singular", "api_key": "sandbox-singular-api-key", "base_url": f"{server.url}/api",
        "lookback_days": 7, "end_date": today.isoformat(), "poll_interval": 0.01, "metrics": ["adn_cost"],
        "discrepancy_metrics": ["adn_clicks"], "cohort_metrics": []}},
        "destinations": {"w": destination(kind, tmp_path, request)}, "stage": str(tmp_path / "stage")}
    config = parse_config(settings)
    for _ in range(3):
        assert all(r.ok for r in runner.run(config))
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump(settings))

    result = CliRunner().invoke(app, ["drift", "ads.campaign_stats", "-c", str(path), "--share", "0.995"])
    assert result.exit_code == 0, result.output
    ages = {int(cells[0]): cells[1:] for line in result.output.splitlines()
            if len(cells := [c.strip().replace(",", "") for c in line.split("│") if c.strip()]) == 6
            and cells[0].isdigit()}
    assert sorted(ages) == list(range(8))  # every age of the window, re-read twice
    reread, changed = {a: int(c[0]) for a, c in ages.items()}, {a: int(c[1]) for a, c in ages.items()}
    assert set(reread.values()) == {2 * ROWS}
    assert changed[0] == 2 * ROWS and 0 < changed[2] < changed[1] < 2 * ROWS
    assert changed[3] == changed[4] == changed[6] == changed[7] == 0 and changed[5] > 0
    assert "99.5% of changes land within 5 days" in result.output
    assert "configured lookback_days:   7  ~24 API calls, ~160 rows re-read per run" in result.output
    assert "suggested  lookback_days:   5  ~18 API calls, ~120 rows re-read per run" in result.output

    loose = CliRunner().invoke(app, ["drift", "ads.campaign_stats", "-c", str(path), "--share", "0.9"])
    assert "90.0% of changes land within 2 days" in loose.output, loose.output


def test_drift_commits_with_the_load_or_not_at_all(emulator: Any, tmp_path: Path) -> None:
    """A load that fails at its last statement (its `_floe_loads` row) keeps neither its rows nor its drift."""
    import duckdb

    today = datetime.now(UTC).date()
    server = emulator(emu.create_app, rows_per_day=ROWS, today=today.isoformat(), late_changes=LATE)
    ads = {"type": "singular", "api_key": "sandbox-singular-api-key", "base_url": f"{server.url}/api",
           "lookback_days": 3, "end_date": today.isoformat(), "poll_interval": 0.01, "cohort_metrics": []}
    database = tmp_path / "w.duckdb"
    config = parse_config({"sources": {"ads": ads}, "destinations": {"w": {"type": "duckdb", "path": str(database)}},
                           "stage": str(tmp_path / "stage")})
    assert all(r.ok for r in runner.run(config))
    with duckdb.connect(str(database)) as con:  # the next load's _floe_loads row cannot be written
        con.execute("ALTER TABLE _floe_loads RENAME TO loads_kept")
        con.execute("CREATE VIEW _floe_loads AS SELECT * FROM loads_kept")
    assert not any(r.ok for r in runner.run(config))
    with duckdb.connect(str(database)) as con:
        assert con.execute("SELECT count(*) FROM _floe_drift").fetchone() == (0,)
        assert con.execute("SELECT count(DISTINCT when_retrieved) FROM ads.campaign_stats").fetchone() == (1,)
        con.execute("DROP VIEW _floe_loads")
        con.execute("ALTER TABLE loads_kept RENAME TO _floe_loads")
    assert all(r.ok for r in runner.run(config))
    with duckdb.connect(str(database)) as con:
        assert con.execute("SELECT count(DISTINCT load_id), sum(rows_reread) FROM _floe_drift").fetchone() == (1, 4 * ROWS)


def twilio_drift_project(emulator: Any, kind: str, tmp_path: Path, request: pytest.FixtureRequest
                         ) -> tuple[datetime, Any, Any, dict[str, Any]]:
    """A Twilio emulator with 10 days of calls up to this hour, and settings loading its calls into `kind`
    with a 3-day lookback: (now, server, sandbox, settings)."""
    from floe.sandbox import twilio as twilio_emu

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    server = emulator(twilio_emu.create_app, size=400, days=10, end=now.isoformat())
    sandbox = server.app.state.twilio
    sid, token = sandbox.credentials()[0]
    settings = {"sources": {"tw": {"type": "twilio", "account_sid": sid, "auth_token": token,
                                   "start_date": (now.date().fromordinal(now.date().toordinal() - 10)).isoformat(),
                                   "base_url": server.url, "streams": ["calls"], "lookback_days": 3}},
                "destinations": {"w": destination(kind, tmp_path, request)}, "stage": str(tmp_path / "stage")}
    return now, server, sandbox, settings


def drift_report(settings: dict[str, Any], tmp_path: Path) -> Any:
    """`floe drift tw.calls` on these settings (written to floe.yml); asserts it exits 0."""
    path = tmp_path / "floe.yml"
    path.write_text(yaml.safe_dump(settings))
    result = CliRunner().invoke(app, ["drift", "tw.calls", "-c", str(path)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "bigquery"])
def test_a_twilio_re_read_of_unchanged_calls_records_no_change(kind: str, emulator: Any, tmp_path: Path,
                                                                request: pytest.FixtureRequest) -> None:
    """A merge stream's re-read is compared before the merge; equal rows (nulls included) are not changes."""
    now, server, sandbox, settings = twilio_drift_project(emulator, kind, tmp_path, request)
    config = parse_config(settings)
    assert all(r.ok for r in runner.run(config))
    loaded_on = datetime.now(UTC).date()  # the day of the re-read: ages count from it
    assert all(r.ok for r in runner.run(config))
    result = drift_report(settings, tmp_path)
    ages = {int(cells[0]): (int(cells[1]), int(cells[2])) for line in result.output.splitlines()
            if len(cells := [c.strip().replace(",", "") for c in line.split("│") if c.strip()]) == 6
            and cells[0].isdigit()}
    # The newest call is re-read too: age 0, or 1 in a day's first hour (the calls end at midnight then).
    newest = max(parsedate_to_datetime(c["date_created"]) for c in
                 sandbox.list(sandbox.credentials()[0][0], "calls").records())
    assert min(ages) == (loaded_on - newest.date()).days and sum(reread for reread, _ in ages.values()) > 0
    assert sum(changed for _, changed in ages.values()) == 0, result.output
    assert "no re-read row changed" in result.output and "lookback_days:   3" in result.output


@pytest.mark.parametrize("kind", ["duckdb", "postgres", "redshift", "bigquery"])
def test_a_late_twilio_change_is_counted_with_its_price_change(kind: str, emulator: Any, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    """Twilio re-rates a 2-day-old call and corrects a 1-day-old call's status after they were loaded:
    the next run's lookback re-read counts both, by age, with the price's change as the amount."""
    now, server, sandbox, settings = twilio_drift_project(emulator, kind, tmp_path, request)
    sid = sandbox.credentials()[0][0]
    config = parse_config(settings)
    assert all(r.ok for r in runner.run(config))

    def priced_call(age: int) -> dict[str, Any]:
        day = now.date().fromordinal(now.date().toordinal() - age)
        return next(c for c in sandbox.list(sid, "calls").records() if c["price"] and c["status"] == "completed"
                    and parsedate_to_datetime(c["date_created"]).date() == day)

    rerated, corrected = priced_call(2), priced_call(1)
    new_price = f"{float(rerated['price']) - 0.25:.5f}"
    assert sandbox.amend("calls", rerated["sid"], {"price": new_price})["price"] == new_price
    response = httpx.post(f"{server.url}/_sandbox/twilio/amend",
                          json={"kind": "calls", "sid": corrected["sid"], "changes": {"status": "failed"}})
    assert response.status_code == 200 and response.json()["status"] == "failed"
    assert all(r.ok for r in runner.run(config))

    result = drift_report(settings, tmp_path)
    ages = {int(cells[0]): cells[1:] for line in result.output.splitlines()
            if len(cells := [c.strip().replace(",", "") for c in line.split("│") if c.strip()]) == 6
            and cells[0].isdigit()}
    changed = {age: int(cells[1]) for age, cells in ages.items() if int(cells[1])}
    assert changed == {1: 1, 2: 1}, result.output
    assert ages[2][4].startswith("0.2500 ("), result.output  # |Δprice| of the re-rated call
    assert ages[1][4].split()[0] == "0.00", result.output  # a status change moves no money
    assert "99.5% of changes land within 2 days" in result.output
    assert "lookback_days:   3" in result.output

    bad = httpx.post(f"{server.url}/_sandbox/twilio/amend", json={"kind": "calls", "sid": "CAnope", "changes": {}})
    assert bad.status_code == 400 and "no calls record CAnope" in bad.json()["error"]


def calls_job(disposition: str) -> Any:
    """A load of Twilio calls whose lookback re-read is measured (key sid, compared status and price)."""
    import pyarrow as pa

    from floe.core.destination import LoadJob, TableSpec
    from floe.core.stream import DriftSpec

    spec = TableSpec("tw", "calls", pa.schema([]), disposition=disposition, primary_key=("sid",),
                     drift=DriftSpec(("sid",), "date_created", ("status", "price"), ("price",)))
    return LoadJob(load_id="l1", source="tw", stream="calls", table=spec, files=[], checkpoint={},
                   started_at=datetime.now(UTC))


@pytest.mark.parametrize("warehouse", ["redshift", "bigquery"])
@pytest.mark.parametrize("disposition", ["append", "merge"])
def test_the_drift_statements_parse_in_the_warehouse_dialect(warehouse: str, disposition: str) -> None:
    """What the replays (Redshift on PostgreSQL, BigQuery on DuckDB) cannot show: that the warehouse
    itself would take the statements."""
    import sqlglot

    from floe.config import validate_model
    from floe.destinations import drift
    from floe.destinations.bigquery_sql import quote as bigquery_quote
    from floe.destinations.redshift import RedshiftConfig, RedshiftDestination

    job = calls_job(disposition)
    if warehouse == "redshift":
        config = validate_model(RedshiftConfig, {"type": "redshift", "host": "h", "database": "d", "user": "u",
                                                 "stage": "s3://b/p", "iam_role": "arn:aws:iam::1:role/r"}, "rs")
        dest = RedshiftDestination("rs", config)
        statement = dest.drift_statement(job, "_floe_staging_l1")
        ddl = next(sql for sql in dest.meta_ddl() if drift.DRIFT_TABLE in sql)
    else:
        table = bigquery_quote("p.raw._floe_drift")
        statement = drift.drift_statement(job, drift.BIGQUERY, target=bigquery_quote("p.raw.tw_calls"),
                                          staging=bigquery_quote("p.raw._floe_staging_l1"), quote=bigquery_quote,
                                          drift_table=table, values=("@source", "@stream", "@load_id"))
        ddl = drift.drift_ddl(table, drift.BIGQUERY)
    assert statement is not None and statement.before_rows == (disposition == "merge")
    for sql in (ddl, statement.sql.replace("%s", "'x'")):
        assert sqlglot.parse_one(sql, read=warehouse, error_level=sqlglot.ErrorLevel.RAISE) is not None, sql


@pytest.mark.parametrize("disposition", ["append", "merge"])
def test_the_drift_statement_joins_keys_by_equality_on_postgresql(disposition: str, postgres_db: Any) -> None:
    """A re-read of 20,000 calls against a table of 200,000: the key join must not be a nested loop
    (the null-safe `a = b OR (a IS NULL AND b IS NULL)` is one, and runs for hours on a large table)."""
    import psycopg

    from floe.config import validate_model
    from floe.destinations.postgres import PostgresConfig, PostgresDestination

    dest = PostgresDestination("pg", validate_model(PostgresConfig, dict(postgres_db.config()), "pg"))
    statement = dest.drift_statement(calls_job(disposition), "tw._floe_staging_l1")
    assert statement is not None
    rows = ("SELECT 'CA' || i AS sid, now() - (i % 30) * interval '1 day' AS date_created, (i % 7)::text AS status, "
            "(i % 100) / 10.0 AS price, CASE WHEN i <= 20000 THEN 'l1' ELSE 'l0' END AS _floe_load_id, "
            "now() AS _floe_loaded_at FROM generate_series(1, 200000) i")
    try:
        with psycopg.connect(postgres_db.dsn, autocommit=True) as con:
            con.execute("CREATE SCHEMA tw")
            con.execute(f"CREATE TABLE tw.calls AS {rows}")
            con.execute("CREATE TABLE tw._floe_staging_l1 AS SELECT * FROM tw.calls WHERE _floe_load_id = 'l1'")
            con.execute("ANALYZE tw.calls; ANALYZE tw._floe_staging_l1")
            sql = statement.sql.partition(" SELECT ")[2]  # the SELECT the INSERT runs
            plan = "\n".join(r[0] for r in con.execute("EXPLAIN SELECT " + sql, statement.params).fetchall())
    finally:
        dest.close()
    assert "Nested Loop" not in plan and ("Hash Join" in plan or "Merge Join" in plan), plan
