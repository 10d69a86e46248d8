"""`floe init`: write a commented floe.yml for the chosen sources and destination, and a .env template."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from floe.commands._output import fail

if TYPE_CHECKING:  # (imported where used: `floe --help` loads no pydantic)
    from pydantic import BaseModel

    from floe.configref import Key

HEADER = """\
# floe.yml, written by `floe init`. Every key: docs/config.md. Check it with `floe check`.
# ${VAR} is read from the environment, or from .env next to this file (the environment wins).
"""


def init_command(
    source: Annotated[list[str] | None, typer.Option(
        "--source", "-s", metavar="TYPE", help="A source type to configure (repeatable; default: sailthru).")] = None,
    destination: Annotated[str, typer.Option(
        "--destination", "-d", metavar="TYPE", help="The destination type.")] = "duckdb",
    directory: Annotated[Path, typer.Option("--dir", metavar="DIR", help="Where to write them.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing floe.yml and .env.")] = False,
) -> None:
    """Write a commented floe.yml for the chosen sources and destination (secrets as ${ENV}) and a .env template."""
    from floe.configref import COMMON
    from floe.core.plugins import destination_registry as destinations
    from floe.core.plugins import source_registry as sources

    chosen = source or ["sailthru"]
    for kind, registry in [*((s, sources) for s in chosen), (destination, destinations)]:
        if kind not in registry.names():
            fail(f"--{registry.kind} {kind}: must be one of {', '.join(registry.names())}")
    config, env = directory / "floe.yml", directory / ".env"
    if not force and (existing := [p for p in (config, env) if p.exists()]):
        fail(f"{', '.join(map(str, existing))}: already there (use --force to overwrite)")
    lines = [HEADER, "sources:"]
    variables: list[tuple[str, str]] = []
    for kind in dict.fromkeys(chosen):
        lines += entry(kind, kind, sources.config_model(kind), COMMON["sources"], variables)
    lines += ["", "destinations:"]
    lines += entry("warehouse", destination, destinations.config_model(destination), COMMON["destinations"], variables)
    lines += ["", "# stage: .floe/stage   # where extracted files wait until they are committed"]
    directory.mkdir(parents=True, exist_ok=True)
    config.write_text("\n".join(lines) + "\n")
    env.write_text("# Values for the ${VAR}s of floe.yml. Keep this file out of version control.\n"
                   + "".join(f"\n# {text}\n{name}=\n" if text else f"\n{name}=\n" for name, text in variables))
    typer.echo(f"wrote {config} and {env}: fill in {env}, then run `floe check -c {config}` and `floe run -c {config}`")


def entry(name: str, kind: str, model: type[BaseModel], common: type[BaseModel],
          variables: list[tuple[str, str]]) -> list[str]:
    """The commented lines of one source or destination: required keys set (secrets and unknowns
    as ${NAME_KEY}), the others commented out with their defaults."""
    from floe.configref import COMMON, keys
    from floe.infra.pgconn import URL_KEYS

    own = keys(model, (common,))
    by_url = any(k.name == "url" for k in own)  # one url: instead of host, port, user, password...
    what = "its warehouse schema and state key" if common is COMMON["sources"] else "for --destination"
    lines = [f"  {name}:  # the name: {what}", f"    type: {kind}"]
    for key in own:
        replaced = by_url and key.name in URL_KEYS
        required = key.default is None or (by_url and key.name == "url")
        variable = f"{name}_{key.name}".upper()
        if required and not replaced:
            value = placeholder(key) or f"${{{variable}}}"
            if value.startswith("${"):
                variables.append((variable, key.text))
            lines.append(f"    {key.name}: {value}" + (f"  # {key.text}" if key.text else ""))
        elif key.secret and not replaced:
            variables.append((variable, f"optional: {key.text}" if key.text else "optional"))
            lines.append(f"    # {key.name}: ${{{variable}}}" + (f"  # {key.text}" if key.text else ""))
        else:
            shown = "" if key.default in (None, "(none)", "(empty)") else f" {key.default}"
            lines.append(f"    # {key.name}:{shown}" + (f"  # {key.text}" if key.text else ""))
    return lines


def placeholder(key: Key) -> str | None:
    """A value that validates for a required date: 30 days ago (a first run's backfill)."""
    start = datetime.now(UTC).date() - timedelta(days=30)
    return {"date": start.isoformat(), "date-time": f"{start.isoformat()}T00:00:00Z"}.get(key.kind)
