"""`floe check`: validate floe.yml and reach every destination."""

from __future__ import annotations

import typer

from floe.commands._output import ConfigOption, fail, open_config
from floe.errors import FloeError
from floe.secrets import redact


def check_command(config: ConfigOption = None) -> None:
    """Validate the config and reach every destination."""
    from floe.engine.runner import context_for, make_destination

    try:
        cfg = open_config(config)
    except FloeError as exc:
        fail(str(exc))
    typer.echo(f"config ok: {len(cfg.sources)} sources, {len(cfg.destinations)} destinations")
    problems = 0
    context = context_for(cfg)
    for name in cfg.destinations:
        try:
            destination = make_destination(cfg, name, context)
            try:
                for line in destination.check():
                    typer.echo(f"  {name}: {redact(line)}")
            finally:
                destination.close()
        except FloeError as exc:
            problems += 1
            typer.echo(f"  {name}: FAILED: {redact(str(exc))}", err=True)
    if problems:
        fail(f"{problems} destination(s) unreachable")
