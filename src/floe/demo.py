"""`floe demo`: generate sample data, load it into `demo.duckdb` with the normal runner, answer questions.

The demo is a list of sections. A section writes its sample input under `.floe/demo/<name>/`
(or starts an emulator) and returns its `sources:` entries; after one `floe run` of all of them
into `demo.duckdb`, each section prints the answers to its questions. Adding a source to the
demo is one more `DemoSection` in `SECTIONS`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import yaml
from rich.console import Console
from rich.table import Table

from floe.config import parse_config
from floe.engine import runner
from floe.engine.progress import Progress

console = Console()


@dataclass(frozen=True)
class Question:
    title: str
    sql: str  # portable SQL (no dialect-only forms), shown in the docs as well


@dataclass
class DemoSection:
    name: str
    prepare: Callable[[Path], dict[str, Any]]  # folder for its data -> `sources:` entries
    questions: list[Question] = field(default_factory=list)
    # Optional: a context manager running what the sources need (an emulator) during the load.
    serve: Callable[[Path], contextlib.AbstractContextManager[None]] | None = None


# --- Sailthru ---------------------------------------------------------------------------------

SAILTHRU_QUESTIONS = [
    Question("Total blasts", "SELECT COUNT(*) AS total_blasts FROM sailthru.blast"),
    Question(
        "Opens and clicks per blast",
        "SELECT b.id AS blast_id, b.name, "
        "SUM(CASE WHEN m.action_name = 'open' THEN 1 ELSE 0 END) AS opens, "
        "SUM(CASE WHEN m.action_name = 'click' THEN 1 ELSE 0 END) AS clicks "
        "FROM sailthru.blast b LEFT JOIN sailthru.message_blast m ON m.blast_id = b.id "
        "GROUP BY b.id, b.name ORDER BY b.id DESC LIMIT 5",
    ),
    Question(
        "Average opens and clicks per blast",
        "SELECT ROUND(SUM(CASE WHEN action_name = 'open' THEN 1 ELSE 0 END) * 1.0 / COUNT(DISTINCT blast_id), 1) "
        "AS opens_per_blast, "
        "ROUND(SUM(CASE WHEN action_name = 'click' THEN 1 ELSE 0 END) * 1.0 / COUNT(DISTINCT blast_id), 1) "
        "AS clicks_per_blast FROM sailthru.message_blast",
    ),
    Question(
        "Profiles that received more than 100 blasts",
        "SELECT COUNT(*) AS profiles FROM (SELECT profile_id FROM sailthru.message_blast "
        "GROUP BY profile_id HAVING COUNT(DISTINCT blast_id) > 100) AS p",
    ),
    Question(
        "Profiles with more than 100 clicks",
        "SELECT profile_id, COUNT(*) AS clicks FROM sailthru.message_blast WHERE action_name = 'click' "
        "GROUP BY profile_id HAVING COUNT(*) > 100 ORDER BY clicks DESC, profile_id",
    ),
    Question(
        "E-mails sent, opened and clicked (once per profile and blast)",
        "SELECT (SELECT COUNT(*) FROM (SELECT DISTINCT profile_id, blast_id FROM sailthru.message_blast) AS s) "
        "AS emails_sent, "
        "(SELECT COUNT(*) FROM (SELECT DISTINCT profile_id, blast_id FROM sailthru.message_blast "
        "WHERE action_name = 'open') AS o) AS emails_opened, "
        "(SELECT COUNT(*) FROM (SELECT DISTINCT profile_id, blast_id FROM sailthru.message_blast "
        "WHERE action_name = 'click') AS c) AS emails_clicked",
    ),
    Question(
        "Data freshness",
        "SELECT MAX(export_date) AS latest_export, COUNT(*) AS files, MAX(ingested_at) AS last_ingested "
        "FROM sailthru.exports",
    ),
]


def prepare_sailthru(folder: Path) -> dict[str, Any]:
    from floe.sandbox.sailthru import ExportSpec, generate

    # 14 daily exports of 8 blasts: 112 blasts, so some profiles pass the "more than 100" marks.
    generate(folder, ExportSpec(seed=2016, profiles=300, days=14, blasts_per_day=8, audience=0.88,
                                transactional_per_day=40, gzip=True, client_id="4484", heavy_clickers=3))
    return {"sailthru": {"type": "sailthru", "path": str(folder), "pii": "hash", "salt": "floe-demo-salt",
                         "timezone": "America/New_York"}}


SECTIONS: list[DemoSection] = [DemoSection("sailthru", prepare_sailthru, SAILTHRU_QUESTIONS)]


# --- running --------------------------------------------------------------------------------------

def run_demo(directory: Path, sections: list[DemoSection] | None = None) -> int:
    """Generate, load and report; return the exit code (0: every stream loaded)."""
    sections = SECTIONS if sections is None else sections
    directory = directory.resolve()
    work = directory / ".floe" / "demo"
    database = directory / "demo.duckdb"
    for stale in (database, database.with_name(database.name + ".wal")):
        stale.unlink(missing_ok=True)  # a demo starts from scratch
    sources: dict[str, Any] = {}
    for section in sections:
        folder = work / section.name
        shutil.rmtree(folder, ignore_errors=True)
        console.print(f"[bold]{section.name}[/]: writing sample data to {folder.relative_to(directory)}/")
        sources.update(section.prepare(folder))
    raw: dict[str, Any] = {"sources": sources, "destinations": {"demo": {"type": "duckdb", "path": str(database)}},
           "stage": str(directory / ".floe" / "stage")}
    config_path = work / "floe.yml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = parse_config(raw, config_path)
    config.stage = Path(raw["stage"])

    with _serving(sections, work):
        results = runner.run(config, progress=Progress())
    from floe.cli import print_summary

    print_summary(results)
    console.print(f"loaded into {database.relative_to(directory)} (config: {config_path.relative_to(directory)})")
    with duckdb.connect(str(database), read_only=True) as conn:
        print_counts(conn, list(sources))
        for section in sections:
            for question in section.questions:
                print_answer(conn, question)
    failed = [r for r in results if not r.ok]
    return 1 if failed else 0


@contextlib.contextmanager
def _serving(sections: list[DemoSection], work: Path) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for section in sections:
            if section.serve:
                stack.enter_context(section.serve(work / section.name))
        yield


def print_counts(conn: duckdb.DuckDBPyConnection, schemas: list[str]) -> None:
    table = Table(title="rows per table", title_justify="left")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for schema in schemas:
        names = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY table_name", [schema]
        ).fetchall()
        for (name,) in names:
            count = conn.execute(f'SELECT COUNT(*) FROM "{schema}"."{name}"').fetchall()[0][0]
            table.add_row(f"{schema}.{name}", f"{count:,}")
    console.print(table)


def print_answer(conn: duckdb.DuckDBPyConnection, question: Question) -> None:
    cursor = conn.execute(question.sql)
    columns = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    console.print(f"\n[bold]{question.title}[/]")
    table = Table()
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else f"{v:,}" if isinstance(v, int) else str(v) for v in row))
    if not rows:
        table.add_row(*(["(none)"] + [""] * (len(columns) - 1)))
    console.print(table)
