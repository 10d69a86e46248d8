"""Progress for long runs: a live line on a terminal, structured log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("floe.progress")


@dataclass
class Counter:
    rows: int = 0
    files: int = 0
    commits: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0


class Progress:
    """Counts rows, staged files and commits per `source.stream -> destination` and reports them.

    On a terminal a single status line is redrawn at most 4 times a second; otherwise one
    `event=progress` log line per stream every `interval` seconds.
    """

    def __init__(self, interval: float = 5.0, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = interval if not self.tty else 0.25
        self.counters: dict[str, Counter] = {}
        self._last = 0.0

    def add(self, key: str, rows: int = 0, files: int = 0, commits: int = 0) -> None:
        counter = self.counters.setdefault(key, Counter())
        counter.rows += rows
        counter.files += files
        counter.commits += commits
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.report()

    def report(self) -> None:
        if self.tty:
            parts = [f"{k}: {c.rows:,} rows {c.rate:,.0f}/s" for k, c in self.counters.items() if c.rows]
            sys.stderr.write("\r\033[K" + " | ".join(parts)[-200:])
            sys.stderr.flush()
        else:
            for key, c in self.counters.items():
                log.info(
                    "event=progress stream=%s rows=%d files=%d commits=%d rate=%.0f",
                    key, c.rows, c.files, c.commits, c.rate,
                )

    def close(self) -> None:
        if self.tty and self.counters:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
