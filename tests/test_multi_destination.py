"""Several destinations per run: each source loads into all destinations or those it names, each
destination keeps its own state, and a failing destination neither blocks nor corrupts the others."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from floe.config import SourceConfig, parse_config
from floe.destinations.duckdb import DuckDBConfig, DuckDBDestination
from floe.destinations.files import FilesConfig, FilesDestination
from floe.destinations.postgres import PostgresConfig, PostgresDestination
from floe.engine.runner import run
from floe.engine.stream import Batch, Source, State, Stream
from floe.sources import registry as source_registry


class CountingConfig(SourceConfig):
    type: str = "counting"
    rows: int = 30


class CountingStream(Stream):
    name = "numbers"
    schema = pa.schema([("n", pa.int64())])
    primary_key = ("n",)
    disposition = "append"

    def __init__(self, rows: int) -> None:
        self.rows = rows

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        start = (state or {}).get("next", 0)
        for low in range(start, self.rows, 10):
            high = min(low + 10, self.rows)
            yield Batch(pa.record_batch({"n": pa.array(range(low, high), pa.int64())}), checkpoint={"next": high})


class CountingSource(Source):
    Config = CountingConfig

    def streams(self) -> list[Stream]:
        return [CountingStream(self.config.rows)]


@pytest.fixture
def counting_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(source_registry._entries, "counting", f"{__name__}:CountingSource")


def config_for(tmp_path: Path, pg: Any, rows: int, pg_password: str) -> Any:
    return parse_config({
        "stage": str(tmp_path / "stage"),
        "sources": {
            "everywhere": {"type": "counting", "rows": rows},
            "lake_only": {"type": "counting", "rows": 5, "destinations": ["lake"]},
        },
        "destinations": {
            "lake": {"type": "duckdb", "path": str(tmp_path / "lake.duckdb")},
            "pg": pg.config(password=pg_password),
            "files": {"type": "files", "path": str(tmp_path / "files")},
        },
    }, tmp_path / "floe.yml")


def counts(tmp_path: Path, pg: Any) -> dict[str, Any]:
    lake = DuckDBDestination("lake", DuckDBConfig(path=str(tmp_path / "lake.duckdb")))
    pgd = PostgresDestination("pg", PostgresConfig.model_validate(pg.config()))
    files = FilesDestination("files", FilesConfig(path=str(tmp_path / "files")))
    try:
        def pg_count() -> Any:
            exists = pgd.query("SELECT to_regclass('everywhere.numbers') IS NOT NULL")[0][0]
            return pgd.query("SELECT COUNT(*), COUNT(DISTINCT n) FROM everywhere.numbers")[0] if exists else (0, 0)

        return {
            "lake": lake.query("SELECT COUNT(*), COUNT(DISTINCT n) FROM everywhere.numbers")[0],
            "lake_only": lake.query("SELECT COUNT(*) FROM lake_only.numbers")[0][0],
            "pg": pg_count(),
            "states": (lake.get_state("everywhere", "numbers"), pgd.get_state("everywhere", "numbers"),
                       files.get_state("everywhere", "numbers")),
            "pg_has_lake_only": pgd.query("SELECT to_regclass('lake_only.numbers') IS NOT NULL")[0][0],
        }
    finally:
        lake.close()
        pgd.close()


def test_a_failing_destination_neither_blocks_nor_corrupts_the_others(counting_type, postgres_db, tmp_path):
    results = run(config_for(tmp_path, postgres_db, rows=30, pg_password="wrong-password"))
    by_dest = {(r.source, r.destination): r for r in results}
    assert set(by_dest) == {("everywhere", "lake"), ("everywhere", "pg"), ("everywhere", "files"),
                            ("lake_only", "lake")}  # lake_only goes only where it says
    assert "authentication failed" in (by_dest["everywhere", "pg"].error or "")
    assert "wrong-password" not in (by_dest["everywhere", "pg"].error or "")
    assert by_dest["everywhere", "lake"].ok and by_dest["everywhere", "files"].ok
    first = counts(tmp_path, postgres_db)
    assert first["lake"] == (30, 30) and first["lake_only"] == 5 and first["pg"] == (0, 0)
    assert first["states"] == ({"next": 30}, None, {"next": 30})

    # The next run, with more data and the destination fixed: each one resumes from its own state.
    results = run(config_for(tmp_path, postgres_db, rows=45, pg_password=postgres_db.password))
    assert all(r.ok for r in results), [r.error for r in results]
    rows = {(r.source, r.destination): r.rows for r in results}
    assert rows[("everywhere", "lake")] == 15 and rows[("everywhere", "pg")] == 45
    second = counts(tmp_path, postgres_db)
    assert second["lake"] == (45, 45) and second["pg"] == (45, 45) and second["lake_only"] == 5
    assert second["states"] == ({"next": 45}, {"next": 45}, {"next": 45})
    assert second["pg_has_lake_only"] is False
