"""Building a source or destination for the Singer commands.

Either NAME is a plugin name in floe.yml (`-c floe.yml`), or a plugin *type* whose settings are a
Singer-style JSON file (`--config settings.json`), validated by that plugin's own config model.
Relative paths in a settings file resolve against the working directory (where Meltano runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from floe.config import FloeConfig, load_config, validate_model
from floe.core.destination import Destination
from floe.core.errors import ConfigError
from floe.core.plugins import destination_registry as destination_registry
from floe.core.settings import SourceConfig
from floe.core.stream import Context, Source
from floe.engine.factory import context_for, make_destination, make_source


def read_json_file(path: Path, what: str) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        line = data[: exc.pos].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the {what} file is not valid JSON ({exc.msg})") from None


def read_settings(path: Path) -> dict[str, Any]:
    data = read_json_file(path, "settings")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the settings file must hold a JSON object")
    return data


def make_source_for(name: str, floe_config: Path | None, settings: Path | None) -> Source:
    """A source from floe.yml (`-c`, or ./floe.yml when no settings file is given) or from a settings file."""
    from floe.core.plugins import source_registry as registry

    if settings is None:
        config = load_config(floe_config)
        return make_source(config, name, context_for(config))
    data = read_settings(settings)
    if name not in registry.names():
        raise ConfigError(f"{name}: not a source type (one of {', '.join(registry.names())})")
    data.setdefault("type", name)
    validated = validate_model(registry.config_model(name), data, str(settings))
    return registry.load(name)(name, validated, Context())


TARGET_KEYS = ("schema", "default_target_schema", "batch_rows", "schema_changes", "widen_to_text")  # the target's own
POLICY_KEYS = ("schema_changes", "widen_to_text")


def target_policy(own: dict[str, Any], where: str) -> SourceConfig:
    """The target's `schema_changes` and `widen_to_text` settings (see SourceConfig), validated."""
    return validate_model(SourceConfig, {"type": "singer", **{k: own[k] for k in POLICY_KEYS if k in own}}, where)


def make_destination_for(
    name: str, floe_config: Path | None, settings: Path | None
) -> tuple[Destination, dict[str, Any], FloeConfig | None]:
    """A destination plus the target's own settings (`schema`, `batch_rows`) from the settings file."""
    if settings is None:
        config = load_config(floe_config)
        return make_destination(config, name, context_for(config)), {}, config
    data = read_settings(settings)
    if name not in destination_registry.names():
        raise ConfigError(f"{name}: not a destination type (one of {', '.join(destination_registry.names())})")
    own = {k: data.pop(k) for k in TARGET_KEYS if k in data}
    data.setdefault("type", name)
    validated = validate_model(destination_registry.config_model(name), data, str(settings))
    return destination_registry.load(name)(name, validated, Context()), own, None
