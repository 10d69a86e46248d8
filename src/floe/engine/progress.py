"""Progress for long runs: a live line on a terminal; off a terminal, log lines.

Off a terminal, every `interval` seconds one `event=progress` line per stream still running (rows
staged so far, files, commits, and the rate over the time since the stream started), and when a
stream ends one `event=stream_done` line with its committed rows, commits, seconds and rate.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("floe.progress")
Key = tuple[str, str, str]  # (source, stream, destination)


@dataclass
class Counter:
    rows: int = 0
    files: int = 0
    commits: int = 0
    started: float = field(default_factory=time.monotonic)

    def rate(self, now: float) -> float:
        """Rows per second since the stream started."""
        elapsed = now - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0


class Progress:
    """Counts rows, staged files and commits per (source, stream, destination) and reports them."""

    def __init__(self, interval: float = 30.0, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = interval
        self.running: dict[Key, Counter] = {}
        self._lock = threading.Lock()
        self._drawn = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self, key: Key) -> None:
        """A stream starts loading into a destination."""
        with self._lock:
            self.running.setdefault(key, Counter())
            if self._ticker is None and not self.tty:
                self._ticker = threading.Thread(target=self._tick, name="floe-progress", daemon=True)
                self._ticker.start()

    def add(self, key: Key, rows: int = 0, files: int = 0, commits: int = 0) -> None:
        with self._lock:
            counter = self.running.get(key)
            if counter is None:
                return
            counter.rows += rows
            counter.files += files
            counter.commits += commits
        if self.tty and time.monotonic() - self._drawn >= 0.25:
            self._drawn = time.monotonic()
            self.draw()

    def finish(self, key: Key, rows: int, commits: int, seconds: float, error: str | None = None) -> None:
        """The stream is done: one summary line (committed rows, commits, seconds, rate); no more progress."""
        source, stream, destination = key
        rate = rows / seconds if seconds > 0 else 0.0
        if self.tty:
            self.clear()
        with self._lock:  # no progress line of the stream after this one
            counter = self.running.pop(key, None)
            log.log(logging.INFO if error is None else logging.ERROR,
                    "event=stream_done source=%s stream=%s destination=%s status=%s rows=%d commits=%d files=%d "
                    "seconds=%.2f rate=%.0f" + (" error=%s" if error else ""),
                    source, stream, destination, "ok" if error is None else "failed", rows, commits,
                    counter.files if counter else 0, seconds, rate, *((error,) if error else ()))

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        """One progress line per running stream."""
        now = time.monotonic()
        with self._lock:
            for (source, stream, destination), c in self.running.items():
                log.info("event=progress source=%s stream=%s destination=%s rows=%d files=%d commits=%d "
                         "seconds=%.1f rate=%.0f", source, stream, destination, c.rows, c.files, c.commits,
                         now - c.started, c.rate(now))

    def draw(self) -> None:
        now = time.monotonic()
        with self._lock:
            parts = [f"{s}.{t} -> {d}: {c.rows:,} rows {c.rate(now):,.0f}/s"
                     for (s, t, d), c in self.running.items() if c.rows]
        sys.stderr.write("\r\033[K" + " | ".join(parts)[-200:])
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        self._stop.set()
        if self.tty:
            self.clear()
