"""What every config key is, read from the config models: for `docs/config.md` and `floe init`.

A key's text is its field's `description`, else the comment on (or just above) its line in the
model's source, so the reference says what the code says.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from floe.config import FloeConfig, NotifyConfig, ServeConfig, looks_secret
from floe.core.plugins import Registry
from floe.core.settings import DestinationConfig, SourceConfig

COMMON: dict[str, type[BaseModel]] = {"sources": SourceConfig, "destinations": DestinationConfig}


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # a readable type
    default: str | None  # None: required
    secret: bool
    text: str
    nested: type[BaseModel] | None = None  # a mapping of keys of its own


def keys(model: type[BaseModel], skip: tuple[type[BaseModel], ...] = ()) -> list[Key]:
    """The keys of `model` in declaration order, without those declared by the models in `skip` (a key
    `model` declares again, with a meaning of its own, stays)."""
    own = vars(model).get("__annotations__", {})
    skipped = {name for base in skip for name in base.model_fields if name not in own or name == "type"}
    return [_key(name, field, model) for name, field in model.model_fields.items()
            if name not in skipped and not field.exclude]


def plugin_models(registry: Registry) -> dict[str, type[BaseModel]]:
    return {name: registry.config_model(name) for name in registry.names()}


def _key(name: str, field: FieldInfo, model: type[BaseModel]) -> Key:
    annotation = field.annotation
    secret = _mentions(annotation, SecretStr) or looks_secret(name)
    nested = next((a for a in _parts(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    default: str | None = None  # required
    if field.default_factory is not None:
        default = _show(field.default_factory())  # type: ignore[call-arg]
    elif not field.is_required():
        default = _show(field.default)
    return Key(field.alias or name, type_name(annotation), default, secret,
               field.description or _comment(model, name), nested)


def type_name(annotation: Any) -> str:
    """A short readable type: `text`, `number`, `hash | drop | keep`, `list of text`..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin in (list, tuple):
        return "list of " + " or ".join(type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(str(m.value) for m in annotation)
    names = {str: "text", int: "integer", float: "number", bool: "true/false", SecretStr: "text (secret)",
             Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation)).replace("datetime", "date-time")


def _parts(annotation: Any) -> list[Any]:
    """`annotation` and every type inside it (`list[Table | str] | None` -> list, Table, str, None...)."""
    return [annotation, *(p for arg in typing.get_args(annotation) for p in _parts(arg))]


def _mentions(annotation: Any, kind: type) -> bool:
    return any(a is kind or _mentions(a, kind) for a in typing.get_args(annotation)) or annotation is kind


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict) and not value:
        return "(empty)"
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    if value == "":
        return '""'
    if isinstance(value, BaseModel):
        return "(see below)"
    return str(value)


@cache
def _source_lines(cls: type) -> list[str]:
    try:
        return inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return []


def _comment(model: type[BaseModel], name: str) -> str:
    """The comment on the field's line in the class that declares it, or the comment lines just above it."""
    for cls in model.__mro__:
        lines = _source_lines(cls)
        for i, line in enumerate(lines):
            if re.match(rf"\s+{re.escape(name)}\s*:", line):
                comment = line.split("#", 1)[1].strip() if "#" in line and not line.split("#", 1)[0].count('"') % 2 else ""
                if comment and not comment.startswith(("type:", "noqa")):
                    return comment
                above: list[str] = []
                for previous in reversed(lines[:i]):
                    if not previous.strip().startswith("#"):
                        break
                    above.insert(0, previous.strip().lstrip("#").strip())
                return " ".join(above)
    return ""


# --- docs/config.md ---------------------------------------------------------------------------
PAGES = {"sailthru": "sailthru.md", "twilio": "twilio.md", "singular": "singular.md", "fullstory": "fullstory.md"}
INTRO = """\
# floe.yml reference

Every key floe reads, generated from its config models by `scripts/config_reference.py` (a test
fails when this page is out of date). `floe init` writes a commented starting point.

- `floe.yml` is read from the working directory, or from `-c PATH`. Relative paths in it are
  relative to the file.
- `${VAR}` anywhere is replaced by the environment variable `VAR`; every unset variable is named in
  one error. A `.env` file next to the config (`VAR=value` lines) sets the variables the environment
  does not: the environment wins, and an empty value (`VAR=`) leaves the variable unset.
- An unknown key is an error (with the closest known key, when there is one); values of secrets
  never appear in errors, logs, state or staged files.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Key], title: str, out: list[str], expand: bool = True) -> None:
    out += ["| key | type | default | what |", "|---|---|---|---|"]
    nested: list[Key] = []
    for key in rows:
        default = "**required**" if key.default is None else f"`{_cell(key.default)}`"
        out.append(f"| `{key.name}` | {_cell(key.kind)} | {default} | {_cell(key.text)} |")
        if key.nested is not None and expand:
            nested.append(key)
    out.append("")
    for key in nested:
        assert key.nested is not None
        out += [f"`{title}.{key.name}` entries:", ""]
        _table(keys(key.nested), f"{title}.{key.name}", out)


def render() -> str:
    """The text of docs/config.md."""
    from floe.config import SYNC_CONFIG_MODEL
    from floe.core.plugins import destination_registry as destinations
    from floe.core.plugins import load_object
    from floe.core.plugins import source_registry as sources

    out = [INTRO, "## Top level", ""]
    _table(keys(FloeConfig), "", out, expand=False)
    out += ["### `notify`", "", "Told when a run fails and when it recovers.", ""]
    _table(keys(NotifyConfig), "notify", out)
    out += ["### `serve`", "", "How `floe serve` schedules sources and reports; more in [deploy.md](deploy.md).", ""]
    _table(keys(ServeConfig), "serve", out)
    for section, registry in (("sources", sources), ("destinations", destinations)):
        out += [f"## `{section}`", "", f"Keys every entry of `{section}:` takes, whatever its type:", ""]
        _table(keys(COMMON[section]), section, out)
        for name, model in plugin_models(registry).items():
            page = PAGES.get(name, "destinations.md" if section == "destinations" else "")
            out += [f"### `type: {name}`", ""] + ([f"More in [{page}]({page}).", ""] if page else [])
            _table(keys(model, (COMMON[section],)), f"{section}.<name>", out)
    out += ["## `syncs`", "", "Reverse ETL from a warehouse table to Pendo; more in [pendo.md](pendo.md).", ""]
    _table(keys(load_object(SYNC_CONFIG_MODEL)), "syncs.<name>", out)
    return "\n".join(out).rstrip() + "\n"
