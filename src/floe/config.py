"""floe.yml: loading, `${ENV_VAR}` interpolation and validation with readable errors.

The top level is validated here; each source, destination and sync entry is validated by the
config model its plugin declares (see the registry tables in `floe.core.plugins`;
a sync entry by `SYNC_CONFIG_MODEL`), all named as strings and imported only when used,
so adding a plugin never touches this module. Every error names the key path, e.g.
`sources.sailthru.pii: must be one of hash, drop, keep`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError

from floe.core import secrets
from floe.core.errors import ConfigError
from floe.core.plugins import load_object
from floe.core.settings import DestinationConfig, Model, SourceConfig

# libyaml's loader when PyYAML has it: a tenth of the pure-Python one's time.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DEFAULT_CONFIG = Path("floe.yml")
# The model of one `syncs:` entry, named (as plugins are) so that reverse ETL is imported only when used.
SYNC_CONFIG_MODEL = "floe.apps.reverse.config:SyncConfig"
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class NotifyConfig(Model):
    webhook: str | None = Field(default=None, description=(
        "URL POSTed a JSON message when a run fails and when the next run succeeds again."))
    sns_topic_arn: str | None = Field(default=None, description="AWS SNS topic published the same messages.")
    region: str | None = Field(default=None, description="AWS region of the SNS topic (default: the AWS environment's).")


class ServeConfig(Model):
    schedule: str | None = Field(default=None, description=(
        "When `floe serve` runs a source that has no `schedule:` of its own: an interval like `15m`/`6h` or a "
        "cron expression (default: every hour)."))
    health_port: int | None = Field(default=None, ge=0, le=65535, description=(
        "Port of `floe serve`'s HTTP endpoints `/healthz` and `/metrics` (Prometheus); none: no endpoints; "
        "0: any free port (logged)."))
    health_host: str = Field(default="0.0.0.0", description="Address the HTTP endpoints listen on.")


class FloeConfig(Model):
    """The validated floe.yml. `sources`/`destinations` hold each plugin's own validated model."""

    sources: dict[str, Any] = Field(default_factory=dict, description=(
        "Where data comes from: name -> settings (`type:` and its keys). The name is the warehouse schema "
        "and the state key."))
    destinations: dict[str, Any] = Field(default_factory=dict, description=(
        "Where data goes: name -> settings. Every source loads into every destination unless it lists some."))
    syncs: dict[str, Any] = Field(default_factory=dict, description=(
        "Reverse ETL: name -> a query on a destination and the Pendo fields it updates; run after `floe run`."))
    stage: Path = Field(default=Path(".floe/stage"), description=(
        "Folder where extracted files wait until their destination committed them (relative to floe.yml)."))
    notify: NotifyConfig | None = Field(default=None, description="Who is told when a run fails and recovers.")
    log_format: Literal["auto", "text", "json"] = Field(default="auto", description=(
        "Log lines on stderr: text (logfmt), json (one JSON object per line, typed fields), auto (text)."))
    serve: ServeConfig = Field(default_factory=ServeConfig, description="How `floe serve` schedules and reports.")
    progress_interval: float = Field(default=30.0, gt=0, description=(
        "Off a terminal: seconds between progress log lines of the streams still running."))
    path: Path | None = Field(default=None, exclude=True, description="Where this config was read from.")

    def source(self, name: str) -> SourceConfig:
        if name not in self.sources:
            known = ", ".join(self.sources) or "none"
            raise ConfigError(f"sources.{name}: no such source (configured: {known})")
        return self.sources[name]

    def destination(self, name: str) -> DestinationConfig:
        if name not in self.destinations:
            known = ", ".join(self.destinations) or "none"
            raise ConfigError(f"destinations.{name}: no such destination (configured: {known})")
        return self.destinations[name]

    def destinations_for(self, source_name: str) -> list[str]:
        """The destinations a source loads into: its `destinations:` list, or all of them."""
        wanted = self.source(source_name).destinations
        if wanted is None:
            return list(self.destinations)
        return wanted


def interpolate(value: Any) -> Any:
    """Replace `${VAR}` in every string of a parsed YAML tree. Unset variables are one error naming
    every one of them and where it is used."""
    missing: list[str] = []
    result = _interpolate(value, "", missing)
    if missing:
        raise ConfigError("; ".join(missing))
    return result


def _interpolate(value: Any, path: str, missing: list[str]) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            var = match.group(1)
            if var not in os.environ:
                missing.append(f"{path + ': ' if path else ''}environment variable {var} is not set")
                return ""
            return os.environ[var]

        return _ENV_PATTERN.sub(replace, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", missing) for i, v in enumerate(value)]
    return value


def read_dotenv(path: Path) -> None:
    """Set the variables of a `.env` file that the environment does not already set (the
    environment wins). An empty value (`NAME=`, as `floe init` writes them) leaves NAME unset.
    Values of credential-like names are registered as secrets."""
    from dotenv import dotenv_values

    for name, value in dotenv_values(path).items():
        if not value or name in os.environ:
            continue
        os.environ[name] = value
        if looks_secret(name):
            secrets.register(value)


def looks_secret(name: str) -> bool:
    return any(word in name.lower() for word in ("password", "secret", "token", "api_key", "key_id", "salt"))


def did_you_mean(word: str, options: list[str]) -> str:
    """`" (did you mean X?)"` when one of `options` is close to `word`, else `""`."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model nested at `loc` (field names, through nested models) accepts."""
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        inner = fields[part].annotation if part in fields else None
        nested = [a for a in (inner, *getattr(inner, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return [f.alias or n for n, f in model.model_fields.items() if not f.exclude]


def _describe(error: Mapping[str, Any], model: type[BaseModel] | None = None) -> str:
    """One readable phrase for one pydantic error, never echoing the input value (it may be a secret)."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return "must be one of " + ", ".join(options)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        keys = _keys_at(model, tuple(error["loc"][:-1])) if model else []
        return "unknown key" + did_you_mean(str(error["loc"][-1]), keys)
    msg = str(error["msg"])
    return msg[0].lower() + msg[1:] if msg else kind


def format_validation_error(exc: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> str:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
        lines.append(f"{loc}: {_describe(error, model)}")
    return "; ".join(lines)


def validate_model(model: type[Model], data: Any, prefix: str) -> Any:
    """Validate `data` against `model`; raise ConfigError naming the key path on failure."""
    try:
        result = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, model)) from None
    register_secrets(result)
    return result


def register_secrets(model: BaseModel) -> None:
    """Register every SecretStr (and every key named like a credential) of a validated model."""
    for name, value in model:
        if isinstance(value, SecretStr):
            secrets.register(value.get_secret_value())
        elif isinstance(value, BaseModel):
            register_secrets(value)
        elif isinstance(value, str) and looks_secret(name):
            secrets.register(value)


def _validate_plugins(raw: Any, section: str, registry: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: must be a mapping of names to settings")
    validated: dict[str, Any] = {}
    for name, entry in raw.items():
        where = f"{section}.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping of settings")
        kind = entry.get("type")
        if kind is None:
            raise ConfigError(f"{where}.type: is required (one of {', '.join(registry.names())})")
        if not registry.has(str(kind)):
            raise ConfigError(f"{where}.type: must be one of {', '.join(registry.names())}"
                              + did_you_mean(str(kind), registry.names()))
        validated[str(name)] = validate_model(registry.config_model(kind), entry, where)
    return validated


def parse_config(data: Any, path: Path | None = None) -> FloeConfig:
    """Validate an already parsed (and interpolated) config tree."""
    from floe.core.plugins import destination_registry as destination_registry
    from floe.core.plugins import source_registry as source_registry

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping with keys like sources:, destinations:")
    top = {k: v for k, v in data.items() if k not in ("sources", "destinations", "syncs")}
    config = validate_model(FloeConfig, top, "")
    config.sources = _validate_plugins(data.get("sources"), "sources", source_registry)
    config.destinations = _validate_plugins(data.get("destinations"), "destinations", destination_registry)
    config.syncs = _validate_syncs(data.get("syncs"))
    config.path = path
    for name, source in config.sources.items():
        for dest in source.destinations or []:
            if dest not in config.destinations:
                raise ConfigError(f"sources.{name}.destinations: no destination named {dest!r}")
    _refuse_shared_places(config, path.parent.resolve() if path else Path.cwd())
    return config


def _refuse_shared_places(config: FloeConfig, base: Path) -> None:
    """One source may not load into two destinations that keep its tables or its state in one place
    (see `DestinationConfig.places`): each would take the other's state for its own."""
    for source in config.sources:
        owners: dict[str, str] = {}
        for dest in config.destinations_for(source):
            for place in config.destinations[dest].places(base):
                if (first := owners.setdefault(place, dest)) != dest:
                    raise ConfigError(
                        f"destinations.{dest}: keeps data in {place}, as destinations.{first} does, and source "
                        f"{source!r} loads into both: their states would mix (point one elsewhere, or list one "
                        f"in sources.{source}.destinations)")


def _validate_syncs(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        sync_model = load_object(SYNC_CONFIG_MODEL)
    except ImportError:
        raise ConfigError("syncs: reverse ETL is not available in this build") from None
    if not isinstance(raw, dict):
        raise ConfigError("syncs: must be a mapping of names to settings")
    return {str(n): validate_model(sync_model, e, f"syncs.{n}") for n, e in raw.items()}


def load_config(path: Path | None = None) -> FloeConfig:
    """Read, interpolate and validate a config file (floe.yml by default). A `.env` file next to
    it provides the variables the environment does not set."""
    path = path or DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (use -c PATH to name another, or `floe init`)")
    if (path.parent / ".env").is_file():
        read_dotenv(path.parent / ".env")
    try:
        data = yaml.load(path.read_text(), Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    config = parse_config(interpolate(data), path)
    # Relative paths in a config are relative to the config file, not to the working directory.
    if not config.stage.is_absolute() and "://" not in str(config.stage):
        config.stage = path.parent / config.stage
    return config
