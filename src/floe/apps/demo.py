"""`floe demo`: generate sample data, load it into `demo.duckdb` with the normal runner, answer questions.

The demo is a list of sections. A section writes its sample input under `.floe/apps/demo/<name>/`
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
from floe.engine.pipeline import StreamResult
from floe.engine.progress import Progress

console = Console()


@dataclass(frozen=True)
class Question:
    title: str
    sql: str  # portable SQL (no dialect-only forms), shown in the docs as well


@dataclass
class DemoSection:
    """One source family in the demo.

    `sources(folder)` is a context manager: it writes sample input under `folder` or starts an
    emulator, yields the section's `sources:` entries, and keeps what they need alive (an
    emulator) until the load is over."""

    name: str
    sources: Callable[[Path], contextlib.AbstractContextManager[dict[str, Any]]]
    questions: list[Question] = field(default_factory=list)


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


@contextlib.contextmanager
def sailthru_sources(folder: Path) -> Iterator[dict[str, Any]]:
    from floe.sandbox.sailthru import ExportSpec, generate

    # 14 daily exports of 8 blasts: 112 blasts, so some profiles pass the "more than 100" marks.
    generate(folder, ExportSpec(seed=2016, profiles=300, days=14, blasts_per_day=8, audience=0.88,
                                transactional_per_day=40, gzip=True, client_id="4484", heavy_clickers=3))
    yield {"sailthru": {"type": "sailthru", "path": str(folder), "pii": "hash", "salt": "floe-demo-salt",
                        "timezone": "America/New_York"}}


# --- Twilio and Singular, from the local emulators ---------------------------------------------------

TWILIO_QUESTIONS = [
    Question(
        "Calls by status",
        "SELECT status, COUNT(*) AS calls, SUM(duration) AS seconds FROM twilio.calls "
        "GROUP BY status ORDER BY calls DESC",
    ),
    Question(
        "Messages and spend per day (last 5 days)",
        "SELECT CAST(date_sent AS DATE) AS day, COUNT(*) AS messages, "
        "ROUND(-SUM(CAST(price AS DOUBLE)), 2) AS spend_usd FROM twilio.messages "
        "GROUP BY CAST(date_sent AS DATE) ORDER BY day DESC LIMIT 5",
    ),
]

SINGULAR_QUESTIONS = [
    Question(
        "Spend by source, latest retrieval of each day (singular.campaign_stats_latest)",
        "SELECT source, ROUND(SUM(adn_cost), 2) AS cost, SUM(adn_installs) AS installs "
        "FROM singular.campaign_stats_latest GROUP BY source ORDER BY cost DESC",
    ),
]


@contextlib.contextmanager
def emulator_sources(name: str, **options: Any) -> Iterator[dict[str, Any]]:
    """Start one floe.sandbox emulator for the duration of the load; yield its `sources:` entries."""
    from floe.sandbox.emulators import start

    running = start(name, **options)
    try:
        yield running.info["sources"]
    finally:
        running.server.stop()


SECTIONS: list[DemoSection] = [
    DemoSection("sailthru", sailthru_sources, SAILTHRU_QUESTIONS),
    DemoSection("twilio", lambda _: emulator_sources("twilio", seed=7, size=2000, days=14), TWILIO_QUESTIONS),
    DemoSection("singular", lambda _: emulator_sources("singular", seed=7, rows_per_day=30), SINGULAR_QUESTIONS),
]


# --- running --------------------------------------------------------------------------------------

def run_demo(directory: Path, sections: list[DemoSection] | None = None, *,
             print_results: Callable[[list[StreamResult]], None]) -> int:
    """Generate, load and report (the run's results through `print_results`); return the exit code
    (0: every stream loaded)."""
    sections = SECTIONS if sections is None else sections
    directory = directory.resolve()
    work = directory / ".floe" / "demo"
    database = directory / "demo.duckdb"
    for stale in (database, database.with_name(database.name + ".wal")):
        stale.unlink(missing_ok=True)  # a demo starts from scratch
    sources: dict[str, Any] = {}
    with contextlib.ExitStack() as running:
        for section in sections:
            folder = work / section.name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            console.print(f"[bold]{section.name}[/]: preparing sample data ({folder.relative_to(directory)}/)")
            sources.update(running.enter_context(section.sources(folder)))
        raw: dict[str, Any] = {"sources": sources,
                               "destinations": {"demo": {"type": "duckdb", "path": str(database)}},
                               "stage": str(directory / ".floe" / "stage")}
        config_path = work / "floe.yml"
        config_path.write_text(yaml.safe_dump(_without_secrets(raw), sort_keys=False))
        config = parse_config(raw, config_path)
        config.stage = Path(raw["stage"])
        results = runner.run(config, progress=Progress())
    print_results(results)
    console.print(f"loaded into {database.relative_to(directory)} (config: {config_path.relative_to(directory)})")
    with duckdb.connect(str(database), read_only=True) as conn:
        print_counts(conn, list(sources))
        for section in sections:
            for question in section.questions:
                print_answer(conn, question)
    failed = [r for r in results if not r.ok]
    return 1 if failed else 0


def _without_secrets(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as written for the reader: emulator credentials shown as `${ENV}` references."""
    secret_keys = ("auth_token", "api_key", "salt", "password", "integration_key")
    sources = {
        name: {k: (f"${{{name.upper()}_{k.upper()}}}" if k in secret_keys else v) for k, v in entry.items()}
        for name, entry in raw["sources"].items()
    }
    return {**raw, "sources": sources}


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
