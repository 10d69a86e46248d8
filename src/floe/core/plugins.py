"""A registry maps a config `type:` to the module that implements it, imported only when used.

Adding a source or destination is one line in its table below plus its module; nothing else changes.
A package installed beside floe adds its own through an entry point in the group `floe.sources` or
`floe.destinations` (`name = "module:Class"`); floe's own types win over a plugin of the same name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any


def load_object(path: str) -> Any:
    """The object a `"module:attribute"` string names, importing its module now."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class Registry:
    def __init__(self, kind: str, entries: dict[str, str]) -> None:
        self.kind = kind
        self._entries = entries  # type name -> "module:ClassName"
        self._installed: dict[str, str] | None = None  # entry points of installed packages, read when needed

    @property
    def group(self) -> str:
        """The entry-point group of this registry's plugins from other packages."""
        return f"floe.{self.kind}s"

    def installed(self) -> dict[str, str]:
        """The plugins other installed packages declare (read once; floe's own types win)."""
        if self._installed is None:
            self._installed = {ep.name: ep.value for ep in entry_points(group=self.group)
                               if ep.name not in self._entries}
        return self._installed

    def has(self, name: str) -> bool:
        return name in self._entries or name in self.installed()

    def names(self) -> list[str]:
        return sorted({**self._entries, **self.installed()})

    def load(self, name: str) -> Any:
        """The plugin class for `name` (it has a `Config` attribute: its pydantic config model)."""
        return load_object(self._entries.get(name) or self.installed()[name])

    def config_model(self, name: str) -> Any:
        return self.load(name).Config


# One line per plugin: `type:` -> "module:Class".
source_registry = Registry(
    "source",
    {
        "sailthru": "floe.sources.sailthru:SailthruSource",
        "twilio": "floe.sources.twilio:TwilioSource",
        "singular": "floe.sources.singular:SingularSource",
        "sql": "floe.sources.sql:SqlSource",
        "fullstory": "floe.sources.fullstory:FullStorySource",
    },
)

destination_registry = Registry(
    "destination",
    {
        "bigquery": "floe.destinations.bigquery:BigQueryDestination",
        "duckdb": "floe.destinations.duckdb:DuckDBDestination",
        "files": "floe.destinations.files:FilesDestination",
        "postgres": "floe.destinations.postgres:PostgresDestination",
        "redshift": "floe.destinations.redshift:RedshiftDestination",
    },
)
