"""Errors a user can act on. Anything raised as a FloeError is printed as one line, without a traceback."""

from __future__ import annotations


class FloeError(Exception):
    """A user-facing error: the message says what is wrong and where (file:line, config key, HTTP status)."""


class ConfigError(FloeError):
    """floe.yml (or a settings file) is invalid. The message starts with the key path."""


class SourceError(FloeError):
    """A source could not read its input (bad file, API error). Nothing of the failing unit is committed."""


class DestinationError(FloeError):
    """A destination refused a load or could not be reached."""


class StageError(FloeError):
    """A stage file could not be written (full disk, no permission). The message names the file and `stage:`."""
