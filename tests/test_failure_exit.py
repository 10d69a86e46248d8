"""A failed run ends: a fault injected at each stage of each source makes the real `floe run`, a
child process, exit within 30 s, non-zero, with the error on stderr.

Sources read from their emulators over real HTTP (Twilio, Singular, FullStory), from export files
(Sailthru) or from the suite's PostgreSQL server (SQL), and load into DuckDB. Stages:
- source: the first request or file fails for good (wrong credentials, a folder that is not there);
- mid-read: the input breaks after data was staged (the API refuses from the Nth request on, an
  export file is cut or holds a bad line, a table holds a value that cannot be read);
- stage: the stage folder cannot be written;
- load: the warehouse refuses the load (a view stands where the table should be);
- state: the saved state cannot be read (`_floe_state` has the wrong shape).
Plus a webhook that never answers, and a PostgreSQL destination that fails or goes away mid-COPY.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
import yaml

from floe.config import parse_config
from floe.core.errors import StageError
from floe.engine.factory import context_for, make_source
from floe.infra.stage import StageWriter
from floe.sandbox import singular as singular_emulator
from floe.sandbox import twilio as twilio_emulator
from floe.sandbox.fullstory import DEFAULT_API_KEY, Export, FullStoryEmulator, create_app
from floe.sandbox.sailthru import ExportSpec, generate
from floe.sandbox.server import RunningServer, serve_in_thread
from floe.testing.postgres import PostgresDatabase, PostgresServer

EXIT_WITHIN = 30.0
STAGES = ["source", "mid-read", "stage", "load", "state"]
SOURCES = ["twilio", "singular", "fullstory", "sailthru", "sql"]
WINDOWS = 3  # FullStory: hours of EVENTS_PER_HOUR events each
EVENTS_PER_HOUR = 10_000  # several parse chunks per window: the parse thread is busy when the load fails


@dataclass
class Exit:
    code: int
    stderr: str
    seconds: float


def floe_run(config: Path) -> Exit:
    """`floe run -c config` as a child process; fails the test if it is still running after EXIT_WITHIN."""
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "floe", "run", "-c", str(config)], cwd=config.parent,
                              capture_output=True, text=True, timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"floe run still running {EXIT_WITHIN:.0f}s after it started; stderr:\n{exc.stderr!r}")
    seconds = time.monotonic() - started
    print(f"exit {proc.returncode} after {seconds:.1f}s")  # shown with -s: the figures in the closing note
    return Exit(proc.returncode, proc.stderr, seconds)


# --- the sources, each healthy unless broken at `source` or `mid-read` ------------------------------

@dataclass
class Subject:
    """One source under test: its floe.yml entry, and how to break it at the source stages."""

    name: str
    settings: Callable[[Path], dict[str, Any]]
    broken: dict[str, Callable[[Path, dict[str, Any]], str]]  # stage -> edit settings, return the expected error
    reset: Callable[[], None] = lambda: None


@pytest.fixture(scope="module")
def twilio() -> Iterator[Subject]:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with serve_in_thread(twilio_emulator.create_app(size=400, days=4, end=end.isoformat())) as server:
        sandbox, faults = server.app.state.twilio, server.app.state.faults
        sid, token = sandbox.credentials()[0]
        start = datetime.fromtimestamp(sandbox.start, UTC).date().isoformat()

        def settings(root: Path) -> dict[str, Any]:
            return {"type": "twilio", "account_sid": sid, "auth_token": token, "start_date": start,
                    "base_url": server.url, "window_days": 1, "page_size": 50}

        def wrong_token(root: Path, s: dict[str, Any]) -> str:
            s["auth_token"] = "0" * 32
            return "401"

        def refused_mid_read(root: Path, s: dict[str, Any]) -> str:
            faults.update({"refuse_after": 12})
            return "403"

        yield Subject("tw", settings, {"source": wrong_token, "mid-read": refused_mid_read},
                      reset=lambda: faults.update({"refuse_after": -1}))


@pytest.fixture(scope="module")
def singular() -> Iterator[Subject]:
    today = datetime.now(UTC).date()
    with serve_in_thread(singular_emulator.create_app(rows_per_day=10, today=today.isoformat())) as server:
        faults = server.app.state.faults

        def settings(root: Path) -> dict[str, Any]:
            return {"type": "singular", "api_key": "sandbox-singular-api-key", "base_url": f"{server.url}/api",
                    "lookback_days": 6, "end_date": today.isoformat(), "poll_interval": 0.01}

        def wrong_key(root: Path, s: dict[str, Any]) -> str:
            s["api_key"] = "not-the-key"
            return "Invalid API key"

        def refused_mid_read(root: Path, s: dict[str, Any]) -> str:
            faults.update({"refuse_after": 10})  # some days' reports are in, then every call is refused
            return "403"

        yield Subject("sg", settings, {"source": wrong_key, "mid-read": refused_mid_read},
                      reset=lambda: faults.update({"refuse_after": -1}))


@pytest.fixture(scope="module")
def fullstory_emulator(fullstory_cache: Path) -> Iterator[RunningServer]:
    """The parse thread is still busy when a load or the download fails."""
    with serve_in_thread(create_app(events_per_hour=EVENTS_PER_HOUR, cache_dir=str(fullstory_cache))) as server:
        emu: FullStoryEmulator = server.app.state.fullstory
        for hour in range(WINDOWS):  # built (and cached) now, so that no timed run waits for the emulator
            start = datetime(2024, 1, 1, hour, tzinfo=UTC)
            emu.build(Export(f"warm-{hour}", start, start + timedelta(hours=1), "FORMAT_NDJSON", None, 0.0))
        yield server


@pytest.fixture(scope="module")
def fullstory(fullstory_emulator: RunningServer) -> Subject:
    emu: FullStoryEmulator = fullstory_emulator.app.state.fullstory

    def settings(root: Path) -> dict[str, Any]:
        return {"type": "fullstory", "api_key": DEFAULT_API_KEY, "base_url": fullstory_emulator.url,
                "start_time": "2024-01-01T00:00:00Z", "end_time": f"2024-01-01T{WINDOWS:02d}:00:00Z", "poll_interval": 0.02}

    def wrong_key(root: Path, s: dict[str, Any]) -> str:
        s["api_key"] = "not-the-key"
        return "401"

    def cut_export(root: Path, s: dict[str, Any]) -> str:
        emu.faults.truncate_downloads = 1  # the first window's gzip ends half way: the parse thread fails there
        return "truncated"

    def reset() -> None:
        emu.faults.truncate_downloads = emu.faults.fail_operations = 0

    return Subject("fs", settings, {"source": wrong_key, "mid-read": cut_export}, reset=reset)


@pytest.fixture(scope="module")
def sailthru(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    export = tmp_path_factory.mktemp("sailthru-export")
    generate(export, ExportSpec(days=2, profiles=200))

    def settings(root: Path) -> dict[str, Any]:
        copy = root / "export"
        if not copy.exists():
            shutil.copytree(export, copy)
        return {"type": "sailthru", "path": str(copy), "pii": "hash", "salt": "pepper-for-tests-7731",
                "block_bytes": 65536, "profile_lines": 20}  # several batches per file

    def missing_folder(root: Path, s: dict[str, Any]) -> str:
        s["path"] = str(root / "no-such-export")
        return "no-such-export"

    def bad_line(root: Path, s: dict[str, Any]) -> str:
        bad = Path(s["path"]) / "message_blast.20160402.json"
        lines = bad.read_text().splitlines()
        lines[-2] = '{ "profile_id" : "abc", "email" : '  # batches before it are staged, then it fails
        bad.write_text("\n".join(lines) + "\n")
        return f"{bad.name}:{len(lines) - 1}"

    return Subject("sailthru", settings, {"source": missing_folder, "mid-read": bad_line})


@pytest.fixture(scope="module")
def sql(postgres_server: PostgresServer) -> Iterator[Subject]:
    db = postgres_server.create_database()
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for table in ("events", "bad_events"):
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, at timestamptz NOT NULL, note text)")
            conn.execute(f"INSERT INTO {table} SELECT i, timestamptz '2024-01-01' + i * interval '1 minute', "
                         f"'row ' || i FROM generate_series(1, 3000) i")
        conn.execute("UPDATE bad_events SET at = 'infinity' WHERE id = 2500")  # no Python datetime holds it

    def settings(root: Path) -> dict[str, Any]:
        return {"type": "sql", "url": db.url, "tables": [{"name": "events", "replication_key": "id"}],
                "batch_rows": 200}

    def wrong_password(root: Path, s: dict[str, Any]) -> str:
        s["url"] = db.url.replace(f":{db.password}@", ":wrong-password@") if db.password else \
            db.url.replace(f"{db.user}@", f"{db.user}:wrong-password@")
        return "authentication failed"

    def bad_value(root: Path, s: dict[str, Any]) -> str:
        s["tables"] = [{"name": "bad_events", "replication_key": "id"}]
        return "bad_events"

    yield Subject("db", settings, {"source": wrong_password, "mid-read": bad_value})
    postgres_server.drop_database(db.database)


# --- the project: floe.yml, and faults at the stages floe owns ----------------------------------

def project(root: Path, subject: Subject, stage: str = "none", *, source: dict[str, Any] | None = None,
            destination: dict[str, Any] | None = None, **extra: Any) -> tuple[Path, str | None]:
    """Write floe.yml for `subject` (its settings updated by `source`) broken at `stage`, loading into
    DuckDB (or `destination`); returns its path and the text the error must hold."""
    settings = {**subject.settings(root), **(source or {})}
    expected = subject.broken[stage](root, settings) if stage in subject.broken else None
    db = root / "w.duckdb"
    config: dict[str, Any] = {
        "sources": {subject.name: settings},
        "destinations": {"w": destination or {"type": "duckdb", "path": str(db), "commit_rows": 0}},
        "stage": str(root / "stage"), **extra,
    }
    if stage == "stage":  # a folder under a file: creating it fails (whoever runs the tests, root too)
        (root / "not-a-folder").write_text("")
        config["stage"] = str(root / "not-a-folder" / "stage")
        expected = "stage: cannot write"
    elif stage == "load":  # a view where each table should be: every load is refused
        streams = [s.name for s in make_source(parse_config(config, root / "floe.yml"), subject.name,
                                               context_for(parse_config(config, root / "floe.yml"))).streams()]
        with duckdb.connect(str(db)) as conn:
            conn.execute(f'CREATE SCHEMA "{subject.name}"')
            for name in streams:
                conn.execute(f'CREATE VIEW "{subject.name}"."{name}" AS SELECT 1 AS x')
        expected = "failed, nothing committed"
    elif stage == "state":
        with duckdb.connect(str(db)) as conn:
            conn.execute("CREATE TABLE _floe_state (source VARCHAR)")
        expected = "w: cannot read the state of"
    path = root / "floe.yml"
    path.write_text(yaml.safe_dump(config))
    return path, expected


@pytest.fixture
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    chosen: Subject = request.getfixturevalue(request.param)
    yield chosen
    chosen.reset()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("subject", SOURCES, indirect=True)
def test_a_failure_at_any_stage_ends_floe_run_promptly_with_the_error(
    subject: Subject, stage: str, tmp_path: Path
) -> None:
    config, expected = project(tmp_path, subject, stage)
    result = floe_run(config)
    assert result.code != 0, result.stderr
    assert "error:" in result.stderr and expected is not None and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- beyond the sources: notifications and a PostgreSQL destination -----------------------------

@pytest.fixture
def silent_webhook() -> Iterator[str]:
    """A webhook URL whose server accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_webhook_that_never_answers_delays_the_failed_exit_by_one_timeout(
    fullstory: Subject, fullstory_emulator: RunningServer, silent_webhook: str, tmp_path: Path
) -> None:
    fullstory_emulator.app.state.fullstory.faults.fail_operations = 1000
    try:
        config, _ = project(tmp_path, fullstory, source={"export_attempts": 1}, notify={"webhook": silent_webhook})
        result = floe_run(config)
    finally:
        fullstory.reset()
    assert result.code != 0 and "export FAILED" in result.stderr, result.stderr
    assert "notify_failed channel=webhook" in result.stderr


@pytest.mark.parametrize("fault", ["bad value", "server goes away"])
def test_a_postgres_load_failing_mid_copy_ends_the_run(
    fault: str, fullstory: Subject, postgres_db: PostgresDatabase, tmp_path: Path
) -> None:
    config, _ = project(tmp_path, fullstory, destination=postgres_db.config())
    stop = threading.Event()
    killed: list[int] = []
    if fault == "bad value":
        with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:  # ids are strings nowhere: COPY fails
            conn.execute('CREATE SCHEMA fs; CREATE TABLE fs.events ("EventType" integer)')
    else:
        def kill_copy() -> None:  # terminate floe's connection while it streams a COPY
            with psycopg.connect(postgres_db.dsn, autocommit=True) as admin:
                while not stop.is_set() and not killed:
                    killed.extend(r[0] for r in admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND query LIKE 'COPY%'").fetchall())
                    time.sleep(0.005)

        threading.Thread(target=kill_copy, daemon=True).start()
    try:
        result = floe_run(config)
    finally:
        stop.set()
    assert result.code != 0, result.stderr
    assert "error:" in result.stderr and "fs.events" in result.stderr, result.stderr
    if fault == "server goes away":
        assert killed, "no COPY was seen to terminate"
        assert "terminat" in result.stderr or "connection" in result.stderr, result.stderr


# --- a full stage folder ----------------------------------------------------------------------

def small_tmpfs(mount_point: Path, size: str) -> list[str]:
    """A command prefix: run the command in its own user and mount namespace, with `mount_point` a
    tmpfs of `size` (no root needed where unprivileged user namespaces are allowed). It prints how
    many files are left on that tmpfs once the command is done, and exits with its status."""
    script = 'mount -t tmpfs -o size="$1" floe-stage "$2" && shift 2 && "$@"; code=$?; ' \
             'echo "left=$(find "$0" -type f | wc -l)"; exit $code'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mount_point), size,
            str(mount_point)]


def user_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not user_namespaces(), reason="needs `unshare` with user namespaces to mount a small tmpfs")
@pytest.mark.parametrize("destination", ["duckdb", "postgres"])
def test_a_full_stage_folder_fails_naming_the_file_and_key_and_commits_nothing_more(
    destination: str, fullstory: Subject, postgres_db: PostgresDatabase, tmp_path: Path
) -> None:
    warehouse = postgres_db if destination == "postgres" else tmp_path / "w.duckdb"
    load_into = postgres_db.config() if destination == "postgres" else None
    config, _ = project(tmp_path, fullstory, source={"end_time": "2024-01-01T01:00:00Z"}, destination=load_into)
    assert floe_run(config).code == 0  # the first window, staged on a disk with room
    before = committed(warehouse)

    config, _ = project(tmp_path, fullstory, destination=load_into)  # and the next windows
    stage = tmp_path / "stage"
    started = time.monotonic()
    proc = subprocess.run([*small_tmpfs(stage, "64k"), sys.executable, "-m", "floe", "run", "-c", str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_WITHIN)
    print(f"exit {proc.returncode} after {time.monotonic() - started:.1f}s (stage full)")
    assert proc.returncode != 0, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"stage: cannot write {stage}/fs/events/" in line and "No space left on device" in line, line
    assert "`stage:`" in line
    assert "left=0" in proc.stdout  # the partial stage file was removed
    assert committed(warehouse) == before  # data and state as the first run left them


def committed(warehouse: PostgresDatabase | Path) -> tuple[int, Any]:
    """(rows in fs.events, the latest state) of a PostgreSQL database or a DuckDB file."""
    queries = ("SELECT count(*) FROM fs.events", "SELECT state FROM _floe_state ORDER BY version DESC LIMIT 1")
    if isinstance(warehouse, Path):
        with duckdb.connect(str(warehouse), read_only=True) as conn:
            rows, state = (conn.execute(q).fetchone()[0] for q in queries)  # type: ignore[index]
    else:
        with psycopg.connect(warehouse.dsn) as conn:
            rows, state = (conn.execute(q).fetchone()[0] for q in queries)  # type: ignore[index]
    assert rows and state
    return rows, state


def test_a_stage_file_that_cannot_be_written_is_one_line_naming_it_and_the_key(tmp_path: Path) -> None:
    """ENOSPC without filling a disk: the next stage file is /dev/full."""
    writer = StageWriter(tmp_path / "src" / "items" / "run", "L1", format="arrow")
    target = writer.folder / "L1-00001.arrow"
    target.parent.mkdir(parents=True)
    target.symlink_to("/dev/full")
    with pytest.raises(StageError) as failure:
        writer.write(pa.record_batch({"id": list(range(100_000))}))
    assert str(failure.value) == (f"stage: cannot write {target}: No space left on device; "
                                  "free some space there or point `stage:` at a folder with room")
    writer.abort()
    assert not target.is_symlink()  # removed
