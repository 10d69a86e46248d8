"""docs/config.md is generated from the config models and up to date; it documents every key."""

from __future__ import annotations

from pathlib import Path

from floe.config import FloeConfig
from floe.configref import keys, plugin_models, render
from floe.core.plugins import destination_registry as destinations
from floe.core.plugins import source_registry as sources

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_the_config_reference_is_up_to_date() -> None:
    assert PAGE.read_text() == render(), "docs/config.md is stale: run .venv/bin/python scripts/config_reference.py"


def test_the_reference_has_every_type_and_top_level_key() -> None:
    text = PAGE.read_text()
    for registry in (sources, destinations):
        for name, model in plugin_models(registry).items():
            assert f"### `type: {name}`" in text
            assert all(f"| `{key.name}` |" in text for key in keys(model))
    for key in ("stage", "notify", "log_format", "syncs", "sources", "destinations"):
        assert f"| `{key}` |" in text and key in FloeConfig.model_fields
    assert all(key.text for key in keys(FloeConfig)), "every top-level key says what it is"
