"""A throwaway PostgreSQL server for tests, benchmarks and demos.

`PostgresServer` runs `initdb` + `pg_ctl` from the machine's PostgreSQL binaries (on PATH or under
`/usr/lib/postgresql/<version>/bin`) in a fresh temporary directory, listening on 127.0.0.1 at a
free port with its unix socket inside that directory. PostgreSQL refuses to run as root, so
when the current user is root the server runs as the `postgres` account (via `runuser`).
TCP connections use password authentication (scram-sha-256) for the superuser `floe`, so wrong
credentials fail the way they do against a real server.

    with PostgresServer() as server:
        db = server.create_database()
        print(db.url)

Outside Python: `python -m floe.testing.postgres` starts one and prints its URL until interrupted.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER = "floe"
PASSWORD = "floe-test-password"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the server would not start."""


def find_bin_dir() -> Path:
    """The directory holding `initdb` and `pg_ctl`: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    if not candidates:
        raise PostgresUnavailable(
            "PostgreSQL server binaries not found (initdb); install them with `apt-get install postgresql` "
            "or run ./scripts/test-deps.sh"
        )
    return Path(candidates[-1]).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PostgresDatabase:
    """Connection facts of one database on a running server."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def dsn(self) -> str:
        return (
            f"host={self.host} port={self.port} user={self.user} password={self.password} "
            f"dbname={self.database}"
        )

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def config(self, **extra: Any) -> dict[str, Any]:
        """Settings for a `type: postgres` destination (or the SQL source) pointing at this database."""
        return {
            "type": "postgres", "host": self.host, "port": self.port, "user": self.user,
            "password": self.password, "database": self.database, "sslmode": "disable", **extra,
        }


class PostgresServer:
    """A private PostgreSQL cluster in a temp dir. `fsync=False` trades durability for test speed."""

    def __init__(self, fsync: bool = True, port: int | None = None) -> None:
        self.fsync = fsync
        self.host = "127.0.0.1"
        self.port = port or 0
        self.user = USER
        self.password = PASSWORD
        self.dir: Path | None = None
        self._run_as: str | None = None
        self._lock = threading.Lock()

    # --- facts -------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.dir is not None, "server not started"
        return self.dir / "data"

    def database(self, name: str = "postgres") -> PostgresDatabase:
        return PostgresDatabase(self.host, self.port, self.user, self.password, name)

    @property
    def dsn(self) -> str:
        return self.database().dsn

    @property
    def url(self) -> str:
        return self.database().url

    # --- lifecycle -----------------------------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self._run_as, "--", *args] if self._run_as else list(args)

    def _run(self, *args: str) -> None:
        proc = subprocess.run(
            self._cmd(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"}, cwd=str(self.dir), check=False,
        )
        if proc.returncode != 0:
            log = ""
            with contextlib.suppress(OSError):
                log = (self.dir / "server.log").read_text()[-2000:]  # type: ignore[operator]
            raise PostgresUnavailable(
                f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
                + (f"\nserver log:\n{log}" if log else "")
            )

    def start(self) -> PostgresServer:
        bin_dir = find_bin_dir()
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root needs a `postgres` account to run the server") from None
            self._run_as = "postgres"
        self.dir = Path(tempfile.mkdtemp(prefix="floe-pg-"))
        if self._run_as:
            entry = pwd.getpwnam(self._run_as)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.dir, 0o755)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            os.chown(pwfile, pwd.getpwnam(self._run_as).pw_uid, -1)
        self._run(
            str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
        )
        pwfile.unlink()
        options = [
            f"-c listen_addresses={self.host}", f"-c unix_socket_directories={self.dir}",
            "-c max_connections=100", "-c shared_buffers=128MB", "-c TimeZone=UTC",
        ]
        if not self.fsync:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        for attempt in range(5):
            self.port = self.port or free_port()
            try:
                self._run(
                    str(bin_dir / "pg_ctl"), "start", "-D", str(self.data_dir), "-w", "-t", "60",
                    "-l", str(self.dir / "server.log"), "-o", " ".join([f"-p {self.port}", *options]),
                )
                break
            except PostgresUnavailable:
                if attempt == 4:
                    self.stop()
                    raise
                self.port = 0  # the port was taken between probing and binding: try another
        return self

    def stop(self) -> None:
        """Stop the server (immediately) and delete its files. Safe to call twice."""
        with self._lock:
            if self.dir is None:
                return
            if (self.data_dir / "postmaster.pid").exists():
                bin_dir = find_bin_dir()
                with contextlib.suppress(PostgresUnavailable):
                    self._run(str(bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- databases -------------------------------------------------------------------------------
    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def create_database(self, name: str | None = None) -> PostgresDatabase:
        name = name or f"t_{secrets.token_hex(6)}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database(name)

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    """Start a server, print its URL, and keep it running until SIGINT/SIGTERM."""
    with PostgresServer() as server:
        db = server.create_database("floe")
        print(f"PostgreSQL running: {db.url}", flush=True)
        print(f"export FLOE_PG_URL={db.url}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
