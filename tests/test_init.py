"""`floe init` writes a commented floe.yml and a .env template that check and run once filled in."""

from __future__ import annotations

from pathlib import Path

import duckdb
import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.sandbox.emulators import sandbox_config, stop_all
from floe.sandbox.sailthru import ExportSpec, generate


def floe(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"FLOE_PII_SALT": None}, catch_exceptions=False)  # type: ignore[dict-item]
    return result.exit_code, result.stdout, result.stderr


def test_init_writes_a_config_that_checks_and_runs_once_the_env_file_is_filled(tmp_path: Path) -> None:
    project = tmp_path / "project"
    code, stdout, stderr = floe("init", "--source", "twilio", "--source", "sailthru", "--destination", "duckdb",
                                "--dir", str(project))
    assert code == 0, stderr
    config, env = project / "floe.yml", project / ".env"
    text = config.read_text()
    assert "auth_token: ${TWILIO_AUTH_TOKEN}" in text and "path: ${SAILTHRU_PATH}" in text
    assert "# pii: hash  # What to do with e-mail addresses (`hash`, `drop`, `keep`)" in text  # optional keys: commented
    parsed = yaml.safe_load(text)
    assert set(parsed["sources"]) == {"twilio", "sailthru"} and parsed["destinations"]["warehouse"] == {"type": "duckdb"}
    assert {line.split("=")[0] for line in env.read_text().splitlines() if "=" in line and not line.startswith("#")} \
        >= {"TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "SAILTHRU_PATH"}

    code, _, stderr = floe("check", "-c", str(config))  # not filled in yet: every variable named at once
    assert code == 1 and "TWILIO_ACCOUNT_SID" in stderr and "TWILIO_AUTH_TOKEN" in stderr and "SAILTHRU_PATH" in stderr

    generate(tmp_path / "export", ExportSpec(days=1, profiles=3))
    emulators, running = sandbox_config(["twilio"], options={"twilio": {"size": 20}})
    try:
        twilio = emulators["sources"]["twilio"]
        config.write_text(text.replace("# base_url: https://api.twilio.com", f"base_url: {twilio['base_url']}"))
        env.write_text(f"TWILIO_ACCOUNT_SID={twilio['account_sid']}\nTWILIO_AUTH_TOKEN={twilio['auth_token']}\n"
                       f"SAILTHRU_PATH={tmp_path / 'export'}\nFLOE_PII_SALT=salt-from-dotenv\n")
        code, stdout, stderr = floe("check", "-c", str(config))
        assert code == 0, stderr
        code, stdout, stderr = floe("run", "--stream", "calls", "--stream", "blast", "-c", str(config))
        assert code == 0, stderr
    finally:
        stop_all(running)
    with duckdb.connect(str(project / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM twilio.calls").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM sailthru.blast").fetchone()[0] > 0

    code, _, stderr = floe("init", "--dir", str(project))
    assert code == 1 and "already there (use --force to overwrite)" in stderr
    code, _, stderr = floe("init", "--source", "twillio", "--dir", str(tmp_path / "other"))
    assert code == 1 and stderr.startswith("error: --source twillio: must be one of ")
