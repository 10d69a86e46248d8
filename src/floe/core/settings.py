"""The base config models: every plugin's settings model derives from `SourceConfig` or
`DestinationConfig` (or `Model` for nested settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class Model(BaseModel):
    """Base of every config model: unknown keys are errors (they are usually typos)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


SchemaChanges = Literal["evolve", "freeze"]
Naming = Literal["as_is", "snake_case"]  # a source's column names (engine/naming.py)
BadRows = Literal["fail", "quarantine"]
PiiMode = Literal["hash", "drop", "keep"]
T = TypeVar("T")


def per_stream(value: T | dict[str, T], stream: str, default: T) -> T:
    """A setting given for every stream, or per stream name (`*`: every other stream)."""
    if isinstance(value, dict):
        return value[stream] if stream in value else value.get("*", default)
    return value


class SourceConfig(Model):
    """Keys every source accepts, whatever its type."""

    type: str
    destinations: list[str] | None = Field(
        default=None, description="Load only into these destinations (default: all)."
    )
    schedule: str | None = Field(
        default=None, description="For `floe serve`: an interval like `15m`/`6h` or a cron expression."
    )
    schema_changes: SchemaChanges | dict[str, SchemaChanges] = Field(
        default="evolve", description="What a load does when a column's values change type: `evolve` (widen "
        "the column, or keep the values in a variant column `<column>__v_<type>`) or `freeze` (fail); one "
        "value, or a mapping of stream names (`*`: the others) to values.",
    )
    widen_to_text: bool | dict[str, bool] = Field(
        default=False, description="With `evolve`: a column may become text to hold values of another type "
        "(else they go to a variant column); one value, or a mapping of stream names (`*`: the others).",
    )
    naming: Naming = Field(
        default="as_is", description="Column names: `as_is` (as the service sends them, e.g. `EventStart`) or "
        "`snake_case` (`event_start`); see docs/types.md.",
    )

    bad_rows: BadRows | dict[str, BadRows] = Field(
        default="fail", description="A row holding a value the destination cannot store (text over Redshift's "
        "65,535 bytes, a JSON column that is not JSON): `fail` the load, or `quarantine` the row in "
        "`_floe_rejected` and load the others; one value, or a mapping of stream names (`*`: the others).",
    )
    bad_rows_max: int | None = Field(
        default=None, ge=0, description="With `quarantine`: a commit with more rejected rows than this fails "
        "whole (default: no limit).",
    )

    def row_policy(self, stream: str) -> BadRows:
        """The `bad_rows` of one stream."""
        return per_stream(self.bad_rows, stream, "fail")

    pii: dict[str, PiiMode] = Field(
        default_factory=dict, description="Personal data by column: `{column: hash | drop | keep}` (`stream.column` "
        "for one stream only). `hash`: hex SHA-256 of `salt` and the value (e-mail addresses lower-cased, phone "
        "numbers as E.164), the same in every source; `drop`: the column is not loaded. Default: keep.",
    )
    salt: SecretStr | None = Field(
        default=None, description="Salt of `pii: hash` (default: the environment variable FLOE_PII_SALT).",
    )

    def pii_columns(self) -> dict[str, PiiMode]:
        """The `pii:` modes the engine applies by column name (a source may handle some itself)."""
        return dict(self.pii)

    def schema_policy(self, stream: str) -> tuple[SchemaChanges, bool]:
        """The `schema_changes` and `widen_to_text` of one stream."""
        return per_stream(self.schema_changes, stream, "evolve"), per_stream(self.widen_to_text, stream, False)


class DestinationConfig(Model):
    """Keys every destination accepts, whatever its type."""

    type: str
    lease_wait_seconds: float = Field(
        default=15.0, ge=0,
        description="How long a run waits for another run of the same stream to finish before that stream fails.",
    )

    def places(self, base: Path) -> list[str]:
        """Where this destination keeps a source's tables and state, each as a text that two
        destinations keeping them in the same place share (relative paths are relative to `base`,
        the config's folder). One source loading into two destinations that share a place would
        mix their states (`floe.config.parse_config` refuses it). Empty: no place can be shared."""
        return []


def local_place(base: Path, path: str) -> str:
    """A local path of a config, absolute and normalized (`base`: the config's folder), for `places`."""
    return str((base / Path(path).expanduser()).resolve())


class StateHistoryConfig(Model):
    """For destinations that keep every state version until told otherwise (the SQL warehouses, BigQuery)."""

    state_history_days: int | None = Field(
        default=None, ge=1, description="Delete state versions committed more than this many days ago (the "
        "latest version of each stream is always kept); `floe state revert` can go back this far. Default: keep all.",
    )


class ExpiringLeaseConfig(Model):
    """For destinations whose leases expire unless renewed (Redshift, BigQuery, files)."""

    lease_expiry_seconds: float = Field(
        default=60.0, ge=1,
        description="A run renews its lease every quarter of this; a killed run's lease is free after it.",
    )
