"""Run leases: at most one run loads a (source, stream) into a destination at any time.

The lease lives in the destination, so it excludes runs on other machines too. Each destination
takes it its own way (`Destination.try_lease`): a PostgreSQL advisory lock, a row or an object
that expires unless renewed, DuckDB's file lock. What they share lives here:

- `Holder`: who holds a lease (host, pid, since), for the line a run that gave up waiting ends with;
- `Lease`: a held lease. One that expires is renewed by a heartbeat thread while it is held;
  `check()`, called right before each commit, raises `LeaseLostError` once the lease may be gone;
- `wait_for_lease`: the polling loop behind every `Destination.acquire_lease`;
- `take_object_lease`: the lease object of an object store (BigQuery's stage bucket, the files
  destination), taken, renewed and released by conditional writes;
- `take_process_lease`: a lease among the runs of this process (DuckDB, whose file lock only
  keeps other processes out).

A lease is what keeps overlapping runs from doing the same work twice; the state compare-and-set
at each commit (`LoadJob.base_version`) is what keeps a run that lost its lease from committing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from floe.core.errors import LeaseHeldError, LeaseLostError
from floe.core.secrets import redact

if TYPE_CHECKING:
    from floe.infra.objectstore import ObjectStore

log = logging.getLogger("floe.lease")
NON_EXPIRING_CHECK_SECONDS = 15.0  # how often a lease that lasts as long as its holder is looked at


def process_started(pid: int) -> datetime | None:
    """When process `pid` of this host started (from /proc; None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return datetime.fromtimestamp(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"), UTC)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _utc(value: datetime) -> str:
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease. `how` says what the lease is when it is not a floe lease row or object
    (e.g. DuckDB's lock on a file)."""

    host: str | None
    pid: int | None
    since: datetime | None
    expires: datetime | None = None
    how: str = ""

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), datetime.now(UTC))

    def describe(self) -> str:
        parts = [f"host {self.host}" if self.host else "", f"pid {self.pid}" if self.pid is not None else "",
                 self.how, f"since {_utc(self.since)}" if self.since else "",
                 f"expires {_utc(self.expires)} unless renewed" if self.expires else ""]
        return ", ".join(p for p in parts if p) or "holder unknown"


class Lease:
    """A held lease of one (source, stream) in one destination, named `what` in messages.

    `expiry`: seconds one renewal keeps the lease (None: it lasts as long as its holder, e.g. a
    database session). Subclasses implement `_renew` (raise `LeaseLostError` when the lease is gone)
    and `_release`."""

    def __init__(self, what: str, expiry: float | None) -> None:
        self.what = what
        self.expiry = expiry
        self._renewed = time.monotonic()  # when the last renewal was sent (it holds `expiry` from then)
        self._lost: str | None = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _renew(self) -> None:
        """Extend the lease (or verify that it is still held); raise LeaseLostError if it is gone."""

    def _release(self) -> None:
        """Give the lease up."""

    @property
    def renew_every(self) -> float | None:
        """Seconds between heartbeats (None: no heartbeat)."""
        return self.expiry / 4 if self.expiry is not None else NON_EXPIRING_CHECK_SECONDS

    def renew(self) -> None:
        with self._guard:
            if self._lost:
                raise LeaseLostError(self._lost)
            sent = time.monotonic()
            try:
                self._renew()
            except LeaseLostError as exc:
                self._lost = str(exc)
                raise
            self._renewed = sent

    def start(self) -> None:
        """Renew the lease in a background thread until `release`."""
        if self.renew_every is None:
            return
        self._heartbeat = threading.Thread(target=self._beat, name=f"floe-lease {self.what}", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        assert self.renew_every is not None
        while not self._stop.wait(self.renew_every):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("event=lease_lost lease=%r error=%s", self.what, redact(str(exc)))
                return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; check() judges the age
                log.warning("event=lease_renew_failed lease=%r error=%s", self.what, redact(str(exc)))

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is surely still held: called right before a commit.

        An expiring lease whose last renewal is older than half its expiry (the heartbeat stalled)
        is renewed now."""
        if self._lost:
            raise LeaseLostError(self._lost)
        if self.expiry is not None and time.monotonic() - self._renewed > self.expiry / 2:
            try:
                self.renew()
            except LeaseLostError:
                raise
            except Exception as exc:  # noqa: BLE001 - cannot tell whether it is still held: stop
                raise LeaseLostError(f"{self.what}: the lease could not be renewed ({redact(str(exc))}); "
                                     "stopping before the next commit") from None

    def release(self) -> None:
        """Stop renewing and give the lease up (best effort: an expiring lease also expires by itself)."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        with self._guard:
            if self._lost:
                return
            self._lost = f"{self.what}: the lease was released"
            try:
                self._release()
            except Exception as exc:  # noqa: BLE001 - the run is over; the lease expires or dies with us
                log.warning("event=lease_release_failed lease=%r error=%s", self.what, redact(str(exc)))


def wait_for_lease(take: Callable[[], Lease | Holder], what: str, wait: float, key: str) -> Lease:
    """Call `take` until it returns a Lease, for at most `wait` seconds (`key` is the config key of
    the wait); then raise LeaseHeldError naming the holder."""
    deadline = time.monotonic() + wait
    pause = 0.05
    waiting = False
    while True:
        got = take()
        if isinstance(got, Lease):
            if waiting:
                log.info("event=lease_taken lease=%r after_waiting=%.1fs", what, wait - (deadline - time.monotonic()))
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise LeaseHeldError(f"{what}: another run is loading this stream ({got.describe()}); "
                                 f"gave up after waiting {wait:g}s ({key})")
        if not waiting:
            log.info("event=lease_wait lease=%r holder=%r wait=%gs", what, got.describe(), wait)
            waiting = True
        time.sleep(min(pause, left))
        pause = min(pause * 2, 1.0)


# --- a lease object in an object store -------------------------------------------------------------
class ObjectLease(Lease):
    """A JSON object {host, pid, since, expires_at, token}, renewed and released by writes that
    succeed only if the object is still the version this holder wrote last."""

    def __init__(self, store: ObjectStore, key: str, record: dict[str, Any], version: str, what: str,
                 expiry: float) -> None:
        super().__init__(what, expiry)
        self.store, self.key, self.record, self.version = store, key, record, version

    def _write(self, **changes: Any) -> None:
        record = {**self.record, **changes}
        version = self.store.put_if_version(self.key, json.dumps(record).encode(), self.version)
        if version is None:
            current = self.store.get_versioned(self.key)
            found = json.loads(current[0]) if current else {}
            if current and found == record:  # a retried request of ours had already written it
                version = current[1]
            else:
                raise LeaseLostError(f"{self.what}: the lease was taken over"
                                     + (f" ({_holder(found).describe()})" if found else ""))
        self.record, self.version = record, version

    def _renew(self) -> None:
        assert self.expiry is not None
        self._write(expires_at=(datetime.now(UTC) + timedelta(seconds=self.expiry)).isoformat())

    def _release(self) -> None:
        self._write(released=True, expires_at=datetime.now(UTC).isoformat())


def _holder(record: dict[str, Any]) -> Holder:
    def when(key: str) -> datetime | None:
        try:
            return datetime.fromisoformat(record[key])
        except (KeyError, TypeError, ValueError):
            return None

    return Holder(record.get("host"), record.get("pid"), when("since"), when("expires_at"))


def take_object_lease(store: ObjectStore, key: str, what: str, expiry: float) -> ObjectLease | Holder:
    """Take the lease object at `key` if it is missing, released or expired; else say who holds it.

    Expiry is judged by the clocks of the machines involved (keep them in sync, e.g. with NTP); the
    state compare-and-set still refuses the commits of a run whose lease was taken over."""
    me = Holder.me()
    token = secrets.token_hex(8)
    record = {"host": me.host, "pid": me.pid, "since": me.since.isoformat() if me.since else None,
              "expires_at": (datetime.now(UTC) + timedelta(seconds=expiry)).isoformat(), "token": token}
    data = json.dumps(record).encode()
    for _ in range(5):
        version = store.put_if_absent(key, data)
        if version is not None:
            return ObjectLease(store, key, record, version, what, expiry)
        current = store.get_versioned(key)
        if current is None:
            continue  # removed in between: try to create it again
        try:
            found = json.loads(current[0])
        except ValueError:
            found = {}  # unreadable: treated as expired
        if found.get("token") == token:  # a retried request of ours had already written it
            return ObjectLease(store, key, record, current[1], what, expiry)
        holder = _holder(found)
        if not found.get("released") and holder.expires is not None and holder.expires > datetime.now(UTC):
            return holder
        version = store.put_if_version(key, data, current[1])
        if version is not None:
            if not found.get("released"):
                log.warning("event=lease_taken_over lease=%r expired_holder=%r", what, holder.describe())
            return ObjectLease(store, key, record, version, what, expiry)
    return Holder(None, None, None, how="the lease object keeps changing")


# --- a lease among the runs of this process ------------------------------------------------------
class ProcessLease(Lease):
    def __init__(self, key: str, what: str) -> None:
        super().__init__(what, None)
        self.key = key

    @property
    def renew_every(self) -> float | None:
        return None  # nothing can take it away while this process lives

    def _release(self) -> None:
        with _process_guard:
            _process_leases.pop(self.key, None)


_process_guard = threading.Lock()
_process_leases: dict[str, Holder] = {}


def take_process_lease(key: str, what: str) -> ProcessLease | Holder:
    """Take the lease `key` among this process's runs, or say since when another of them holds it."""
    with _process_guard:
        held = _process_leases.get(key)
        if held is not None:
            return Holder(held.host, held.pid, held.since, how="another run in this process")
        _process_leases[key] = Holder.me()
        return ProcessLease(key, what)
