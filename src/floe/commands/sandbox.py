"""`floe sandbox`: start the local API emulators, print their URLs and test credentials, run until Ctrl-C."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from floe.core.errors import FloeError


def sandbox_command(
    only: Annotated[list[str] | None, typer.Option("--only", help="Start only this emulator (repeatable).")] = None,
    random_ports: Annotated[bool, typer.Option("--random-ports", help="Use free ports instead of the fixed defaults.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the generated data.")] = 1,
    size: Annotated[int, typer.Option(help="Twilio: calls and messages per account.")] = 1000,
    rate_429: Annotated[float, typer.Option(help="Share of API requests answered 429 + Retry-After.")] = 0.0,
    rate_5xx: Annotated[float, typer.Option(help="Share of API requests answered 5xx.")] = 0.0,
    write_config: Annotated[Path | None, typer.Option(help="Write a floe.yml loading the sandbox into DuckDB.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where sample export files (Sailthru) are written.")] = Path(
        "sandbox-data"),
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
) -> None:
    """Start the emulators (Twilio, Singular, ...) on 127.0.0.1 and keep them running."""
    from floe.sandbox.emulators import EMULATORS, sandbox_sources, start_all, stop_all

    names = only or list(EMULATORS)
    unknown = [n for n in names if n not in EMULATORS]
    if unknown:
        typer.echo(f"error: --only {', '.join(unknown)}: known emulators are {', '.join(EMULATORS)}", err=True)
        raise typer.Exit(2)
    options: dict[str, dict[str, Any]] = {n: {"seed": seed, "rate_429": rate_429, "rate_5xx": rate_5xx}
                                          for n in names}
    if "twilio" in options:
        options["twilio"]["size"] = size
    try:
        running = start_all(names, fixed_ports=not random_ports, options=options)
    except FloeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        for name, emulator in running.items():
            typer.echo(f"{name:<10} {emulator.url}")
            for key, value in emulator.info.get("credentials", {}).items():
                typer.echo(f"  {key}: {value}")
        exports = write_exports(data_dir)
        if exports:
            typer.echo(f"sailthru   export files in {exports}")
        if write_config:
            sources = sandbox_sources(running)
            if exports:
                sources["sailthru"] = {"type": "sailthru", "path": str(exports), "pii": "hash",
                                       "salt": "sandbox-salt"}  # a fixed sandbox salt, not a secret
            config = {"sources": sources,
                      "destinations": {"warehouse": {"type": "duckdb", "path": "sandbox.duckdb"}}}
            import yaml

            write_config.write_text(yaml.safe_dump(config, sort_keys=False))
            typer.echo(f"wrote {write_config}: floe run -c {write_config}")
        typer.echo("sandbox running; press Ctrl-C to stop", err=True)
        deadline = time.monotonic() + duration if duration is not None else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        typer.echo("stopping", err=True)
    finally:
        stop_all(running)


def write_exports(data_dir: Path) -> Path | None:
    """Generate the Sailthru sample export files (if that generator is part of this build)."""
    try:
        from floe.sandbox.sailthru import generate
    except ImportError:
        return None
    target = data_dir / "sailthru"
    generate(target)
    return target
