"""`pii: {column: hash | drop | keep}` on every source: applied by column before anything is staged,
hashes that join across sources, a clear error without a salt, and a salt that never leaks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from floe.infra.pii import ColumnPolicy, Pii, normalize
from floe.testing.postgres import PostgresDatabase
from tests.test_twilio import source_config, start_twilio

SALT = "pii-salt-for-tests-5521"


def sha(text: str, salt: str = SALT) -> str:
    """The hash as the docs define it, computed here without floe's code."""
    return hashlib.sha256((salt + text).encode()).hexdigest()


def everything(project: Any) -> str:
    """Every value of every table (floe's own tables included) and every stage file, as one text."""
    tables = project.query("SELECT table_schema, table_name FROM information_schema.tables")
    parts = [repr(project.query(f'SELECT * FROM "{schema}"."{table}"')) for schema, table in tables]
    parts += [p.read_bytes().decode("latin-1") for p in Path(project.root).rglob("*") if p.is_file()
              and p.suffix != ".duckdb" and p.name != "floe.yml"]
    return "\n".join(parts)


@pytest.mark.parametrize(("value", "normal"), [
    ("+14155550100", "+14155550100"),
    (" +1 (415) 555-0100 ", "+14155550100"),  # written with its country code: E.164
    ("(415) 555-0100", "(415) 555-0100"),  # a national form: no country to make E.164 from, kept as written
    ("<Reader@Example.COM> ", "reader@example.com"),
    ("reader%40example.com", "reader@example.com"),
    ("client:alice", "client:alice"),
])
def test_values_are_normalised_before_hashing(value: str, normal: str) -> None:
    assert normalize(value) == normal


def test_an_address_hashes_alike_in_every_source() -> None:
    import pyarrow as pa

    policy = ColumnPolicy({"UserEmail": "hash"}, SALT)
    batch = policy.apply(pa.record_batch({"UserEmail": ["Reader@Example.com", None, "Reader@Example.com"]}))
    sailthru = Pii("hash", SALT).email("reader@example.com")
    assert batch.column(0).to_pylist() == [sailthru, None, sailthru] == [sha("reader@example.com"), None,
                                                                           sha("reader@example.com")]


def test_twilio_numbers_are_hashed_and_formatted_forms_dropped(emulator: Any, api_project: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    server, sandbox = start_twilio(emulator, size=60)
    pii = {"to": "hash", "from": "hash", "to_formatted": "drop", "from_formatted": "drop", "messages.body": "drop"}
    project = api_project(tw=source_config(server, sandbox, streams=["calls", "messages"], pii=pii, salt=SALT,
                                           include_message_body=True))
    with caplog.at_level("DEBUG"):
        result = project.cli("run")
    assert result.exit_code == 0, result.output
    sid = sandbox.credentials()[0][0]
    served = {r["sid"]: r for r in sandbox.list(sid, "calls").records()}
    loaded = dict((s, (t, f)) for s, t, f in project.query('SELECT sid, "to", "from" FROM tw.calls'))
    assert loaded and loaded == {s: (sha(r["to"]) if r.get("to") else None, sha(r["from"]) if r.get("from") else None)
                                 for s, r in served.items()}
    for table in ("calls", "messages"):
        columns = {c for (c,) in project.query(
            f"SELECT column_name FROM information_schema.columns WHERE table_schema = 'tw' AND table_name = '{table}'")}
        assert {"to", "from"} <= columns and not columns & {"to_formatted", "from_formatted", "body"}
    numbers = {r["to"] for r in served.values() if r.get("to")} | {r["from"] for r in served.values() if r.get("from")}
    text = everything(project) + result.output + result.stderr + caplog.text
    assert not [n for n in numbers if n in text]  # no number in clear anywhere
    assert SALT not in text  # nor the salt: not in logs, state, load log or stage files


def test_without_a_salt_hashing_is_a_config_error_naming_the_key(emulator: Any, api_project: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOE_PII_SALT", raising=False)
    server, sandbox = start_twilio(emulator, size=10)
    project = api_project(tw=source_config(server, sandbox, streams=["calls"], pii={"to": "hash"}))
    result = project.cli("run")
    assert result.exit_code != 0
    assert "sources.tw.salt: is required when pii hashes a column (or set FLOE_PII_SALT)" in result.output + result.stderr
    assert not project.db.exists() or not project.query(
        "SELECT * FROM information_schema.tables WHERE table_schema = 'tw'")

    monkeypatch.setenv("FLOE_PII_SALT", SALT)  # the environment's salt does as well, and stays secret
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    assert SALT not in everything(project) + result.output + result.stderr


def test_a_key_column_cannot_be_dropped(emulator: Any, api_project: Any) -> None:
    server, sandbox = start_twilio(emulator, size=10)
    project = api_project(tw=source_config(server, sandbox, streams=["calls"], pii={"sid": "drop"}))
    result = project.cli("run")
    assert result.exit_code != 0
    assert "sources.tw.pii.sid: cannot drop a key or cursor column of stream calls" in result.output + result.stderr


@pytest.mark.parametrize(("pii", "error"), [
    ({"to_fromatted": "drop"}, "sources.tw.pii.to_fromatted: no stream declares a column to_fromatted "
                               "(did you mean to_formatted?)"),
    ({"cals.to": "hash"}, "sources.tw.pii.cals.to: the source has no stream cals (did you mean calls?)"),
    ({"calls.answerd_by": "drop"}, "sources.tw.pii.calls.answerd_by: no stream declares a column answerd_by "
                                   "(did you mean answered_by?)"),
])
def test_a_misspelt_key_is_a_config_error_not_data_left_unprotected(emulator: Any, api_project: Any,
                                                                    pii: dict[str, str], error: str) -> None:
    server, sandbox = start_twilio(emulator, size=10)
    project = api_project(tw=source_config(server, sandbox, streams=["calls"], pii=pii, salt=SALT))
    result = project.cli("run")
    assert result.exit_code == 1 and error in result.output + result.stderr
    assert project.query("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'tw'") == [(0,)]


def test_a_key_no_stream_declares_is_named_in_a_warning_and_the_run_goes_on(emulator: Any,
                                                                            api_project: Any) -> None:
    server, sandbox = start_twilio(emulator, size=10)
    project = api_project(tw=source_config(server, sandbox, streams=["calls"], salt=SALT,
                                           pii={"caller_email": "hash", "messages.body": "drop", "to": "hash"}))
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    logs = result.output + result.stderr
    assert "event=pii_column_not_declared source=tw key=caller_email" in logs
    assert "key=messages.body" in logs and "key=to " not in logs


def test_any_sql_column_and_one_stream_only(postgres_db: PostgresDatabase, api_project: Any) -> None:
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.people (id int PRIMARY KEY, email text, phone text, "
                     "age int); CREATE TABLE app.leads (id int PRIMARY KEY, email text);"
                     "INSERT INTO app.people VALUES (1, 'A@x.org', '+44 20 7946 0958', 40), (2, NULL, NULL, 41);"
                     "INSERT INTO app.leads VALUES (1, 'A@x.org')")
    project = api_project(crm={"type": "sql", "url": postgres_db.url, "schema": "app", "tables": ["people", "leads"],
                               "pii": {"email": "hash", "phone": "hash", "people.age": "drop"}, "salt": SALT})
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    assert project.query("SELECT id, email, phone FROM crm.people ORDER BY id") == [
        (1, sha("a@x.org"), sha("+442079460958")), (2, None, None)]
    assert project.query("SELECT email FROM crm.leads") == [(sha("a@x.org"),)]  # joins people.email
    columns = {c for (c,) in project.query("SELECT column_name FROM information_schema.columns "
                                           "WHERE table_schema = 'crm' AND table_name = 'people'")}
    assert "age" not in columns
    state = json.dumps(project.query("SELECT state FROM _floe_state"))
    assert SALT not in state and "A@x.org" not in everything(project)


def test_check_reports_a_missing_salt_too(emulator: Any, api_project: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOE_PII_SALT", raising=False)
    server, sandbox = start_twilio(emulator, size=10)
    project = api_project(tw=source_config(server, sandbox, pii={"to": "hash"}))
    result = project.cli("check")
    assert result.exit_code != 0 and "sources.tw.salt: is required" in result.output + result.stderr


def test_sailthru_takes_the_mapping_too(sailthru_project: Any) -> None:
    project = sailthru_project(days=1, profiles=20)
    project.write_config(pii="{email: hash, profile_vars.value: drop, device: hash}")
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    columns = {(t, c) for t, c in project.query("SELECT table_name, column_name FROM information_schema.columns "
                                                "WHERE table_schema = 'sailthru'")}
    assert ("profile", "email_hash") in columns and ("profile", "email") not in columns
    assert ("profile_vars", "value") not in columns and ("profile_vars", "var") in columns
    devices = {d for (d,) in project.query("SELECT DISTINCT device FROM sailthru.message_blast WHERE device IS NOT NULL")}
    assert devices and all(len(d) == 64 for d in devices)
