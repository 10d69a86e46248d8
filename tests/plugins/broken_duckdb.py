"""A deliberately broken DuckDB destination: it commits a load's state, then its rows, in two
transactions (two load commits). A run killed in between (`floe chaos --kill-at after-commit:1` kills
right after the first, a state-only one) has advanced its state past rows that never landed: the
rows are lost. `floe chaos` must catch it."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from floe.core.destination import LoadJob
from floe.destinations.duckdb import DuckDBConfig, DuckDBDestination


class BrokenDuckDBConfig(DuckDBConfig):
    type: str = "broken_duckdb"


class BrokenDuckDB(DuckDBDestination):
    Config = BrokenDuckDBConfig

    def __init__(self, name: str, config: Any, context: Any = None) -> None:
        super().__init__(name, config, context)
        self.phase = threading.local()  # streams load in threads of their own

    def load_group(self, jobs: list[LoadJob]) -> None:
        super().load_group([dataclasses.replace(job, files=[]) for job in jobs])  # the state, no rows
        self.phase.rows_only = True
        try:
            super().load_group(jobs)  # the rows, no state
        finally:
            self.phase.rows_only = False

    def write_state(self, cur: Any, job: LoadJob) -> None:
        if not getattr(self.phase, "rows_only", False):
            super().write_state(cur, job)

    def write_load_row(self, cur: Any, job: LoadJob, *args: Any) -> None:
        if not getattr(self.phase, "rows_only", False):
            super().write_load_row(cur, job, *args)
