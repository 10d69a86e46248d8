"""A scratch copy of the user's config for `floe chaos`: sources read floe's emulators, destinations are scratch.

Each configured source keeps its own settings (streams, lookback, dimensions, ...) and gets its own
emulator, started fresh for every run of the experiment with the same seed and the same clock, so
every run reads the same generated data. What is rewritten, by source type:

- twilio: credentials, `base_url`, `pricing_url`, `start_date` (the emulator's first day) and
  `checkpoint_rows` (its least, so that a run commits several times and kills land in between);
- singular: `api_key`, `base_url`, `end_date` (the emulator's today) and a short `poll_interval`;
  the emulator's numbers are settled (late changes would make two runs differ by design);
- sailthru: `path` (generated export files) and `salt`;
- fullstory: `api_key`, `base_url`, `start_time`..`end_time` (the half day before the emulator's
  yesterday ends, so every window is ready), `export_delay` (its least) and a short `poll_interval`;
- sql (with `--postgres-url` only): `url` (that server) and `schema` (scratch tables, see sqltables),
  `batch_rows` (at most SQL_BATCH_ROWS).

Other sources (plugins, a SQL source without a server) are left out, and the report says so.
Each destination becomes a scratch one of its type: DuckDB (and DuckDB-based plugins) a file in the
experiment's folder, PostgreSQL a pair of fresh schemas on the server given with `--postgres-url`.
Other types, and PostgreSQL without a server, are stood in for by a scratch DuckDB file.
"""

from __future__ import annotations

import logging
import secrets as _random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from floe.config import FloeConfig
from floe.destinations.duckdb import DuckDBConfig
from floe.destinations.postgres import PostgresConfig
from floe.sandbox.emulators import Running, start

EMULATED_SOURCES = ("twilio", "singular", "sailthru", "fullstory", "sql")
API_SOURCES = {"twilio": "twilio", "singular": "singular", "fullstory": "fullstory"}  # type -> its emulator
TWILIO_SIZE = 1500  # calls and messages per emulated account
TWILIO_CHECKPOINT_ROWS = 1000  # Twilio streams commit this often (its least), so kills land between commits
FULLSTORY_EVENTS_PER_HOUR = 120
FULLSTORY_HOURS = 12  # of events read, ending at the emulator's yesterday's end
FULLSTORY_EVERY = (7, 11)  # every Nth FullStory API call answers 429, every Mth 503 (with those faults)
FULLSTORY_TRUNCATED = 1  # downloads cut short (well-formed responses, short gzip) with the truncate fault


@dataclass(frozen=True)
class Clock:
    """The one 'now' every emulator of an experiment starts from (so runs read identical data)."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(minute=0, second=0, microsecond=0))

    @property
    def today(self) -> date:
        return self.now.date()


@dataclass
class Plan:
    """What the experiment runs: the sources and destinations kept, and why others are not."""

    sources: dict[str, Any]  # name -> the user's validated source config (emulated types only)
    destinations: dict[str, Any]  # name -> the user's validated destination config
    notes: list[str]  # what was left out or stood in for, for the report
    postgres_url: str | None = None
    token: str = field(default_factory=lambda: _random.token_hex(4))

    def scratch_kind(self, name: str) -> str:
        """How destination `name` is copied: "duckdb" or "postgres"."""
        config = self.destinations[name]
        return "postgres" if isinstance(config, PostgresConfig) and self.postgres_url else "duckdb"

    def postgres_schemas(self, trial: str) -> tuple[str, str]:
        """(schema prefix of the source schemas, schema of floe's own tables) of one run's scratch copy."""
        base = f"floe_chaos_{self.token}_{trial}"
        return f"{base}_", base


def plan(config: FloeConfig, postgres_url: str | None = None) -> Plan:
    notes: list[str] = []
    sources = {}
    for name, source in config.sources.items():
        if source.type == "sql" and not postgres_url:
            notes.append(f"source {name} (sql): not tested; pass --postgres-url to test it against scratch "
                         "tables floe chaos fills on that server")
        elif source.type in EMULATED_SOURCES:
            sources[name] = source
        else:
            notes.append(f"source {name} ({source.type}): not tested; floe has no emulator of it for chaos runs "
                         f"(it emulates {', '.join(EMULATED_SOURCES)})")
    destinations = dict(config.destinations)
    for name, destination in destinations.items():
        if isinstance(destination, PostgresConfig) and not postgres_url:
            notes.append(f"destination {name} (postgres): stood in for by a scratch DuckDB file "
                         "(pass --postgres-url to test a scratch schema on your server)")
        elif not isinstance(destination, DuckDBConfig | PostgresConfig):
            notes.append(f"destination {name} ({destination.type}): stood in for by a scratch DuckDB file "
                         "(floe chaos makes scratch copies of DuckDB and PostgreSQL only)")
    return Plan(sources, destinations, notes, postgres_url)


@dataclass
class Emulators:
    """The emulators of one run of the experiment, by source name; stop them with `stop()`."""

    running: dict[str, Running]

    def faults(self, source: str) -> int:
        """API faults injected so far into `source`'s requests."""
        emulator = self.running.get(source)
        if emulator is None:
            return 0
        if emulator.name == "fullstory":  # its own knobs: every Nth call faulted, the next N downloads cut
            emu = emulator.app.state.fullstory
            every = (emu.faults.rate_limit_every, emu.faults.error_every)
            return sum(emu.api_calls // n for n in every if n) + emulator.info["truncated"] - \
                emu.faults.truncate_downloads
        return sum(emulator.app.state.faults.injected.values())

    def stop(self) -> None:
        for emulator in self.running.values():
            emulator.server.stop()


def start_emulators(chosen: Plan, clock: Clock, seed: int, fault_rates: dict[str, float]) -> Emulators:
    """Fresh emulators for every API source of the plan, each seeded from `seed` and the source name."""
    running: dict[str, Running] = {}
    try:
        for name, source in chosen.sources.items():
            emulator = API_SOURCES.get(source.type)
            if emulator is None:
                continue
            options: dict[str, Any] = {"seed": seed + sum(map(ord, name)), "retry_after": 0.05, **fault_rates}
            if emulator == "twilio":
                options |= {"size": TWILIO_SIZE, "end": clock.now.isoformat()}
            elif emulator == "fullstory":  # a run makes few API calls: faults come every few calls instead
                truncated = FULLSTORY_TRUNCATED if fault_rates.get("truncate_rate") else 0
                options = {"seed": options["seed"], "retry_after": 0, "events_per_hour": FULLSTORY_EVENTS_PER_HOUR,
                           "truncate_downloads": truncated,
                           "rate_limit_every": FULLSTORY_EVERY[0] if fault_rates.get("rate_429") else 0,
                           "error_every": FULLSTORY_EVERY[1] if fault_rates.get("rate_5xx") else 0}
            else:
                options |= {"today": clock.today.isoformat(), "settle_days": 0, "polls_to_done": 1}
            running[name] = start(emulator, None, **options)
            if emulator == "fullstory":
                running[name].info["truncated"] = truncated
    except BaseException:
        Emulators(running).stop()
        raise
    # A truncated body is the injected fault, not news: uvicorn would print a traceback for each one.
    # (Each server start configures uvicorn's logging anew, so this comes after the starts.)
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    return Emulators(running)


def fill_sql_sources(chosen: Plan, clock: Clock, seed: int) -> None:
    """The scratch tables of every `sql` source of the plan (once per experiment; see sqltables)."""
    for name, config in chosen.sources.items():
        if config.type == "sql":
            from floe.apps.chaos.sqltables import fill, source_schema

            assert chosen.postgres_url is not None  # plan() keeps sql sources only with a server
            fill(chosen.postgres_url, source_schema(chosen.token, name), config, clock.now, seed)


def trial_config(chosen: Plan, emulators: Emulators, clock: Clock, folder: Path, trial: str,
                 seed: int) -> dict[str, Any]:
    """The floe.yml (as a dict) of one run: the user's settings pointed at the emulators and scratch copies."""
    sources = {name: _source_entry(chosen, name, config, emulators, clock, folder, seed)
               for name, config in chosen.sources.items()}
    destinations = {name: _destination_entry(chosen, name, folder, trial) for name in chosen.destinations}
    return {"sources": sources, "destinations": destinations, "stage": str(folder / "stage")}


def _user_keys(config: Any, *drop: str) -> dict[str, Any]:
    """The keys the user set (secrets and connection keys are replaced by the caller)."""
    keys = config.model_dump(mode="json", exclude_unset=True)
    return {k: v for k, v in keys.items() if k not in drop}


def _source_entry(chosen: Plan, name: str, config: Any, emulators: Emulators, clock: Clock, folder: Path,
                  seed: int) -> dict[str, Any]:
    if config.type == "sailthru":
        from floe.sandbox.sailthru import ExportSpec, generate

        files = folder / "sailthru" / name
        if not files.exists():
            generate(files, ExportSpec(seed=seed))
        return _user_keys(config, "path", "salt", "client_id") | {"path": str(files), "salt": "chaos-salt"}
    if config.type == "sql":
        from floe.apps.chaos.sqltables import SQL_BATCH_ROWS, source_schema

        return _user_keys(config, "url", "schema_", "schema") | {
            "url": chosen.postgres_url, "schema": source_schema(chosen.token, name),
            "batch_rows": min(config.batch_rows, SQL_BATCH_ROWS)}
    emulator = emulators.running[name]
    described = next(iter(emulator.info["sources"].values()))
    if config.type == "fullstory":
        end = datetime.combine(clock.today - timedelta(days=1), datetime.min.time(), UTC)
        return _user_keys(config) | {
            "api_key": described["api_key"], "base_url": described["base_url"],
            "start_time": (end - timedelta(hours=FULLSTORY_HOURS)).isoformat(), "end_time": end.isoformat(),
            "export_delay": "1h", "poll_interval": min(config.poll_interval, 0.05)}
    if config.type == "twilio":
        return _user_keys(config, "pricing_url") | {
            key: described[key] for key in ("account_sid", "auth_token", "start_date", "base_url")} | {
            "checkpoint_rows": TWILIO_CHECKPOINT_ROWS}
    return _user_keys(config) | {"api_key": described["api_key"], "base_url": described["base_url"],
                                 "end_date": clock.today.isoformat(),
                                 "poll_interval": min(config.poll_interval, 0.05)}


def _destination_entry(chosen: Plan, name: str, folder: Path, trial: str) -> dict[str, Any]:
    config = chosen.destinations[name]
    if chosen.scratch_kind(name) == "postgres":
        prefix, meta = chosen.postgres_schemas(trial)
        return {"type": config.type, "url": chosen.postgres_url, "schema_prefix": prefix, "state_schema": meta}
    path = str(folder / f"{name}.duckdb")
    if isinstance(config, DuckDBConfig):
        return _user_keys(config, "path") | {"type": config.type, "path": path}
    return {"type": "duckdb", "path": path}
