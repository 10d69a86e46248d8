"""`floe serve`: run sources on their schedules until SIGTERM/SIGINT (see floe.apps.serve)."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from floe.commands._output import ConfigOption, fail, open_config
from floe.core.errors import FloeError
from floe.infra.signals import sigterm_held


def serve_command(
    config: ConfigOption = None,
    source: Annotated[list[str] | None, typer.Option("--source", "-s", help="Only this source (repeatable).")] = None,
    backoff: Annotated[float, typer.Option(help="Seconds before retrying a failed source (doubles each time).")] = 30.0,
    backoff_max: Annotated[float, typer.Option(help="Longest wait between retries, in seconds.")] = 3600.0,
) -> None:
    """Keep sources loaded: catch up, sleep until the next piece of work is due, repeat.

    SIGTERM (or Ctrl-C) lets the load in progress commit, then exits with status 0."""
    import asyncio

    from floe.apps.serve import Server

    try:
        cfg = open_config(config)
        for name in source or []:
            cfg.source(name)
        server = Server(cfg, source, backoff_base=backoff, backoff_max=backoff_max)
    except FloeError as exc:
        fail(str(exc))

    endpoint = None
    if cfg.serve.health_port is not None:
        from floe.apps.serve_status import StatusEndpoint

        try:
            endpoint = StatusEndpoint(server.status, cfg.serve.health_host, cfg.serve.health_port)
        except OSError as exc:
            fail(f"serve.health_port: cannot listen on {cfg.serve.health_host}:{cfg.serve.health_port}: {exc}")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        if sigterm_held():  # it came while floe was starting up
            server.stop()
        await server.run()

    try:
        asyncio.run(main())
    finally:
        if endpoint is not None:
            endpoint.close()
    typer.echo("floe serve: stopped", err=True)
