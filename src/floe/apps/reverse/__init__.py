"""Reverse ETL: warehouse rows -> SaaS metadata (Pendo visitors and accounts).

`floe.apps.reverse.config.SyncConfig` validates one entry of floe.yml's `syncs:`; `floe.apps.reverse.engine.run_syncs`
runs them; `floe sync` (floe.commands.sync) prints the summary and exits non-zero on failure.
"""
