"""`floe tap SOURCE` and `floe discover SOURCE`: any floe source with Singer's tap command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from floe.core.errors import FloeError
from floe.core.secrets import redact

FloeConfigOption = Annotated[
    Path | None, typer.Option("-c", "--floe-config", help="floe.yml holding SOURCE (default: ./floe.yml).")
]
SettingsOption = Annotated[
    Path | None,
    typer.Option("--config", help="Singer settings JSON: SOURCE is then a source type and this holds its keys."),
]


def _critical(message: str) -> None:
    # Singer best practice: log CRITICAL before a non-zero exit.
    typer.echo(f"CRITICAL {redact(message)}", err=True)
    raise typer.Exit(1)


def _catalog_of(source_name: str, floe_config: Path | None, settings: Path | None) -> dict[str, Any]:
    import asyncio

    from floe.apps.singer.catalog import build_catalog
    from floe.apps.singer.setup import make_source_for
    from floe.engine.runner import select_streams

    source = make_source_for(source_name, floe_config, settings)
    try:
        return build_catalog(select_streams(source, None))  # with the column names `naming:` gives
    finally:
        asyncio.run(source.aclose())


def discover_command(
    source: Annotated[str, typer.Argument(help="Source name in floe.yml, or source type with --config.")],
    floe_config: FloeConfigOption = None,
    config: SettingsOption = None,
) -> None:
    """Print SOURCE's Singer catalog (streams, JSON Schemas, metadata)."""
    try:
        catalog = _catalog_of(source, floe_config, config)
    except FloeError as exc:
        _critical(str(exc))
    sys.stdout.buffer.write(orjson.dumps(catalog, option=orjson.OPT_INDENT_2) + b"\n")


def tap_command(
    source: Annotated[str, typer.Argument(help="Source name in floe.yml, or source type with --config.")],
    floe_config: FloeConfigOption = None,
    config: SettingsOption = None,
    discover: Annotated[bool, typer.Option("--discover", "-d", help="Print the catalog and exit.")] = False,
    catalog: Annotated[
        Path | None, typer.Option("--catalog", "--properties", help="Catalog JSON: which streams and fields.")
    ] = None,
    state: Annotated[Path | None, typer.Option("--state", "-s", help="Singer state JSON to resume from.")] = None,
) -> None:
    """Run SOURCE as a Singer tap: SCHEMA, RECORD, STATE and ACTIVATE_VERSION messages on stdout."""
    if discover:
        discover_command(source, floe_config, config)
        return
    from floe.apps.singer.catalog import read_selection
    from floe.apps.singer.setup import make_source_for, read_json_file
    from floe.apps.singer.tap import SingerTap, read_state
    from floe.engine.runner import select_streams
    from floe.infra import logs

    logs.setup()
    logging.getLogger("floe").setLevel(logging.WARNING)

    async def main() -> None:
        plugin = make_source_for(source, floe_config, config)
        try:
            streams = select_streams(plugin, None)
            selection = read_selection(read_json_file(catalog, "catalog"), streams, str(catalog)) if catalog else None
            start = read_state(read_json_file(state, "state"), str(state)) if state else {}
            await SingerTap(plugin, sys.stdout.buffer).run(streams, start, selection)
        finally:
            await plugin.aclose()

    import asyncio

    try:
        asyncio.run(main())
    except FloeError as exc:
        sys.stdout.flush()
        _critical(str(exc))
    except BrokenPipeError:
        raise typer.Exit(1) from None
