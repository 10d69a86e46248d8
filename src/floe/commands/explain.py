"""`floe explain SYNC ID [--json]`: a Pendo value's lineage, from Pendo back to the source (see
floe.apps.reverse.lineage and docs/pendo.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from floe.commands._output import ConfigOption, fail, open_config
from floe.core.errors import FloeError
from floe.core.secrets import redact

if TYPE_CHECKING:
    from floe.apps.reverse.lineage import Explanation

STATE_CHARS = 300  # a state longer than this is shortened in the text output


def _text(value: Any, limit: int = STATE_CHARS) -> str:
    text = redact(json.dumps(value, default=str, sort_keys=True))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ms(value: int | None) -> str:
    return "?" if value is None else datetime.fromtimestamp(value / 1000, UTC).isoformat(timespec="seconds")


def print_explanation(found: Explanation) -> None:
    from floe.apps.reverse.lineage import split_load_ids

    echo = typer.echo
    echo(f"{found.sync} {found.key} ({found.target})")
    echo("")
    if found.pendo is None:
        echo("Pendo: no such record")
    else:
        echo(f"Pendo holds (read now; record last updated {_ms(found.pendo.get('lastupdated'))}):")
    names = list(found.fields.values())
    for name in names + [n for n in found.sent or {} if n not in names]:
        held = "" if found.pendo is None else _text(found.pendo.get(name))
        sent = "(not sent)" if found.sent is None or name not in found.sent else _text(found.sent[name])
        mark = "" if found.pendo is None or found.sent is None else (
            "  = sent" if found.pendo.get(name) == found.sent.get(name) else "  DIFFERS from what floe sent")
        echo(f"  {name:<20} {held:<24} floe sent {sent}{mark}")
    echo("")
    if found.sync_run is None:
        echo("floe has not sent this id (or has cleared it).")
    else:
        run = found.sync_run
        echo(f"sent by sync run {run['load_id']} at {_ms(found.sent_at)}: {run.get('status', '?')}, "
             f"{run.get('rows', '?')} rows accepted in the run, finished {run.get('finished_at', '?')}")
    echo("")
    echo(f"warehouse rows now ({len(found.rows)}, syncs.{found.sync} where key = {found.key!r}):")
    for row in found.rows:
        echo("  " + ", ".join(f"{k}={_text(v, 80)}" for k, v in row.items() if k != "_floe_loaded_at"))
    if found.sent_load_ids:
        echo(f"  when floe sent them they came from load(s) {', '.join(found.sent_load_ids)}")
    echo("")
    if not found.loads:
        echo("loads: none recorded (the rows have no _floe_load_id column: select it in the sync's query)")
    now = {i for row in found.rows for i in split_load_ids(row.get("_floe_load_id"))}
    for link in found.loads:
        tags = [t for t, held in (("the rows floe sent", link.load_id in found.sent_load_ids),
                                  ("the rows now", link.load_id in now)) if held]
        load = link.load
        if load is None:
            echo(f"load {link.load_id} ({', '.join(tags)}): not in _floe_loads")
            continue
        echo(f"load {link.load_id} ({', '.join(tags)}): {load['source']}.{load['stream']} into "
             f"{load['destination']}, {load['rows']} rows, {load['status']}, finished {load['finished_at']}")
        if load.get("details"):
            echo(f"  details: {_text(load['details'])}")
        if link.version is not None:
            echo(f"  read from: {_text(link.read_from) if link.read_from is not None else '(the start)'}")
            echo(f"  read to:   {_text(link.read_to)}  (state version {link.version})")


def explain_command(
    sync: Annotated[str, typer.Argument(help="The sync's name (in syncs:).")],
    key: Annotated[str, typer.Argument(help="The Pendo id (accountId or visitorId).")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of text.")] = False,
) -> None:
    """Trace a Pendo value back: what Pendo holds, the sync run that sent it, the warehouse rows and
    the loads (and source window, file or page) they came from."""
    import asyncio

    from floe.apps.reverse.lineage import explain

    try:
        cfg = open_config(config)
        found = asyncio.run(explain(cfg, sync, key))
    except FloeError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(redact(json.dumps(found.as_json(), default=str, sort_keys=True)))
    else:
        print_explanation(found)
