"""Reverse ETL: warehouse rows -> SaaS metadata (Pendo visitors and accounts).

`SyncConfig` validates one entry of floe.yml's `syncs:`; `run_syncs` runs them; `run_syncs_cli`
is what `floe run` calls after its loads (prints the summary, exits non-zero on failure).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from floe.syncs.config import SyncConfig

if TYPE_CHECKING:
    from floe.config import FloeConfig

__all__ = ["SyncConfig", "run_syncs_cli"]


def run_syncs_cli(config: FloeConfig, names: list[str] | None = None, *, dry_run: bool = False,
                  full: bool = False) -> None:
    from floe.commands.sync import run_and_report

    run_and_report(config, names, dry_run=dry_run, full=full)
