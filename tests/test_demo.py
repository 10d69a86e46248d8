"""`floe demo`: sample data through the normal runner into demo.duckdb, then the analytics answers."""

from __future__ import annotations

from pathlib import Path

import duckdb
from typer.testing import CliRunner

from floe.apps.demo import SAILTHRU_QUESTIONS, SINGULAR_QUESTIONS, TWILIO_QUESTIONS
from floe.cli import app


def test_demo_loads_and_answers_leaving_only_its_own_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--directory", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".floe", "demo.duckdb"]
    for question in SAILTHRU_QUESTIONS + TWILIO_QUESTIONS + SINGULAR_QUESTIONS:
        assert question.title in result.stdout
    with duckdb.connect(str(tmp_path / "demo.duckdb"), read_only=True) as conn:
        blasts = conn.execute("SELECT COUNT(*) FROM sailthru.blast").fetchall()[0][0]
        heavy = conn.execute(SAILTHRU_QUESTIONS[4].sql).fetchall()
        calls = conn.execute("SELECT COUNT(*) FROM twilio.calls").fetchall()[0][0]
        latest, retrieved = conn.execute(
            "SELECT (SELECT COUNT(*) FROM singular.campaign_stats_latest), "
            "(SELECT COUNT(*) FROM singular.campaign_stats)").fetchall()[0]
        failed = conn.execute("SELECT COUNT(*) FROM _floe_loads WHERE status <> 'committed'").fetchall()[0][0]
    assert blasts == 112 and failed == 0
    assert calls > 0 and 0 < latest <= retrieved  # the emulators' data, through the same runner
    assert len(heavy) == 3 and all(clicks > 100 for _, clicks in heavy)  # the generator's heavy clickers
    assert "sailthru.message_blast" in result.stdout and "2016-04-14" in result.stdout

    again = CliRunner().invoke(app, ["demo", "--directory", str(tmp_path)], catch_exceptions=False)
    assert again.exit_code == 0, again.output  # a second demo starts from scratch
    written = (tmp_path / ".floe" / "demo" / "floe.yml").read_text()
    assert "floe-demo-salt" not in written and "${TWILIO_AUTH_TOKEN}" in written  # no secrets in files
