"""`floe target DESTINATION`: load any Singer message stream from stdin into a floe destination."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from floe.core.errors import FloeError
from floe.core.secrets import redact

READ_BUFFER = 1 << 20  # bytes of input read at a time


def target_command(
    destination: Annotated[str, typer.Argument(help="Destination name in floe.yml, or destination type with --config.")],
    floe_config: Annotated[
        Path | None, typer.Option("-c", "--floe-config", help="floe.yml holding DESTINATION (default: ./floe.yml).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Singer settings JSON: DESTINATION is then a type and this holds its keys "
                                      "(plus `schema` and `batch_rows` for the target itself)."),
    ] = None,
    schema: Annotated[str | None, typer.Option(help="Schema the tables go into (default: singer).")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="Read messages from this file, not stdin.")] = None,
    batch_rows: Annotated[int | None, typer.Option(
        help="Commit once this many records are pending at a STATE (default 200,000).")] = None,
) -> None:
    """Run as a Singer target: SCHEMA/RECORD/STATE/ACTIVATE_VERSION/BATCH on stdin, STATE out once committed."""
    from floe.apps.singer.setup import make_destination_for, target_policy
    from floe.apps.singer.target import BATCH_ROWS, SingerTarget
    from floe.infra import logs

    logs.setup()
    logging.getLogger("floe").setLevel(logging.WARNING)
    dest = None
    try:
        dest, own, cfg = make_destination_for(destination, floe_config, config)
        target_schema = schema or own.get("schema") or own.get("default_target_schema") or "singer"
        stage = cfg.stage if cfg is not None else Path(".floe/stage")
        rows = int(batch_rows or own.get("batch_rows") or BATCH_ROWS)
        target = SingerTarget(dest, stage, sys.stdout.buffer, schema=str(target_schema), batch_rows=rows,
                              policy=target_policy(own, str(config)))
        # Read in 1 MB blocks (sys.stdin.buffer reads 8 KB at a time): a read returns what a pipe holds.
        if input_file is not None:
            with input_file.open("rb", buffering=READ_BUFFER) as handle:
                committed = target.run(handle)
        else:
            with open(sys.stdin.fileno(), "rb", buffering=READ_BUFFER, closefd=False) as handle:
                committed = target.run(handle)
    except FloeError as exc:
        typer.echo(f"CRITICAL {redact(str(exc))}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"CRITICAL {redact(str(exc))}", err=True)
        raise typer.Exit(1) from None
    finally:
        if dest is not None:
            dest.close()
    typer.echo(f"INFO target committed {committed} rows into {destination}", err=True)
