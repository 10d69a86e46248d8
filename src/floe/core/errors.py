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


class LeaseHeldError(DestinationError):
    """Another run holds the lease of a (source, stream) in a destination, past the configured wait."""


class LeaseLostError(DestinationError):
    """A run's lease expired or was taken over while it ran: it stops before committing anything more."""


class StateConflictError(DestinationError):
    """A commit started from a state version that is no longer the latest: another run committed first.
    Nothing of the commit is kept."""
