"""`floe sandbox` starts the emulators, prints URLs and credentials, and writes a config that runs."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from floe.cli import app
from floe.config import parse_config
from floe.engine import runner
from floe.sandbox.emulators import sandbox_config, stop_all


def test_sandbox_prints_urls_and_credentials_and_writes_a_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sandbox", "--random-ports", "--duration", "0.2", "--size", "50",
                                      "--write-config", "sandbox.yml"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "twilio" in result.stdout and "http://127.0.0.1:" in result.stdout
    assert "account_sid: AC" in result.stdout and "api_key: sandbox-singular-api-key" in result.stdout
    config = yaml.safe_load((tmp_path / "sandbox.yml").read_text())
    assert config["sources"]["twilio"]["type"] == "twilio" and config["sources"]["singular"]["type"] == "singular"


def test_sandbox_config_starts_emulators_and_returns_a_runnable_config(tmp_path: Path) -> None:
    config, running = sandbox_config(["twilio", "singular"], str(tmp_path / "demo.duckdb"),
                                     options={"twilio": {"size": 100}})
    try:
        config["stage"] = str(tmp_path / "stage")
        results = runner.run(parse_config(config))
    finally:
        stop_all(running)
    assert results and all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert {r.source for r in results} == {"twilio", "singular"}


def test_sandbox_refuses_a_port_already_in_use(tmp_path: Path, monkeypatch) -> None:
    import socket

    from floe.sandbox import emulators

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setitem(emulators.EMULATORS, "twilio", ("floe.sandbox.twilio", port))
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, ["sandbox", "--only", "twilio", "--duration", "0.1"])
    assert result.exit_code == 1
    assert f"twilio emulator: port {port} on 127.0.0.1 is in use" in result.stderr
