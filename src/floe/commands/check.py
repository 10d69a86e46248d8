"""`floe check`: validate floe.yml, then check every source, destination and the stage, creating nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from floe.commands._output import ConfigOption, fail, open_config
from floe.core.errors import FloeError
from floe.core.secrets import redact

if TYPE_CHECKING:  # (imported where used: `floe --help` loads neither pydantic nor pyarrow)
    from floe.config import FloeConfig
    from floe.core.stream import Context


def check_command(config: ConfigOption = None) -> None:
    """Validate the config, then check every source (paths, secrets, credentials), destination and
    the stage: one line each, ok or FAILED with the reason. Loads and creates nothing."""
    import asyncio

    from floe.engine.factory import context_for

    try:
        cfg = open_config(config)
    except FloeError as exc:
        fail(str(exc))
    typer.echo(f"config ok: {len(cfg.sources)} sources, {len(cfg.destinations)} destinations")
    context = context_for(cfg)
    outcomes = asyncio.run(check_sources(cfg, context))
    outcomes += [(f"destination {name}", *check_destination(cfg, name, context)) for name in cfg.destinations]
    outcomes.append(("stage", *check_stage(cfg)))
    for what, ok, detail in outcomes:
        if ok:
            typer.echo(f"  {what}: ok: {redact(detail)}")
        else:
            typer.echo(f"  {what}: FAILED: {redact(detail)}", err=True)
    failed = sum(1 for _, ok, _ in outcomes if not ok)
    if failed:
        fail(f"{failed} of {len(outcomes)} checks failed")


async def check_sources(cfg: FloeConfig, context: Context) -> list[tuple[str, bool, str]]:
    """Each source's own check (`Source.check`), all at once."""
    import asyncio

    from floe.engine.factory import make_source

    async def one(name: str) -> tuple[str, bool, str]:
        what = f"source {name}"
        try:
            source = make_source(cfg, name, context)
        except FloeError as exc:
            return what, False, str(exc)
        try:
            lines = await source.check()
        except FloeError as exc:
            return what, False, str(exc)
        except Exception as exc:  # noqa: BLE001 - a check reports every failure, whatever raised it
            return what, False, f"{type(exc).__name__}: {exc}"
        finally:
            await source.aclose()
        return what, True, "; ".join(lines) or "config valid (nothing to reach before a run)"

    return list(await asyncio.gather(*(one(name) for name in cfg.sources)))


def check_destination(cfg: FloeConfig, name: str, context: Context) -> tuple[bool, str]:
    from floe.engine.factory import make_destination

    try:
        destination = make_destination(cfg, name, context)
        try:
            return True, "; ".join(destination.check())
        finally:
            destination.close()
    except FloeError as exc:
        return False, str(exc)


def check_stage(cfg: FloeConfig) -> tuple[bool, str]:
    from floe.infra.localpaths import creatable

    try:
        return True, creatable(cfg.stage)
    except FloeError as exc:
        return False, f"stage: {exc}"
