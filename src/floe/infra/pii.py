"""Personal data in source data: hash (salted SHA-256), drop or keep it.

`ColumnPolicy` is every source's `pii: {column: hash | drop | keep}`: the engine applies it to each
Arrow batch a stream yields, by column name, before anything is staged (`apply`), and to the
stream's declared columns (`schema`). A hashed value is the hex SHA-256 of the salt and the value's
`normalize`d form, so one address or number hashes alike in every source.

`Pii` is Sailthru's e-mail handling: `Pii.email(value)` treats a field that *is* an address;
`Pii.scrub_batch` finds addresses embedded anywhere in the text columns of an Arrow batch (a var
value, a click URL with `?email=a%40b.com`) and replaces each with its hash (`hash`) or with
`[email]` (`drop`). The scan is vectorised: only values containing `@` or `%40` are looked at in Python.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote

from floe.core import secrets
from floe.core.destination import arrow_type_key, nested_as_json
from floe.core.errors import ConfigError
from floe.core.settings import PiiMode, SourceConfig

if TYPE_CHECKING:
    import pyarrow as pa

SALT_ENV = "FLOE_PII_SALT"
PHONE_RE = re.compile(r"\+[0-9][0-9 ().\-]{5,}")  # a number written with its country code
EMAIL_RE = re.compile(r"[A-Za-z0-9._+\-]+(?:@|%40)[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}", re.IGNORECASE)
DROPPED = "[email]"


def normalize_email(value: str) -> str:
    """The canonical form that is hashed: unquoted, without `<>`, trimmed, lower case."""
    return unquote(value).strip().strip("<>").strip().lower()


def normalize(value: str) -> str:
    """The form of a value that is hashed: an e-mail address as `normalize_email` says; a phone
    number written with its country code as E.164 (`+` and the digits: `+1 (415) 555-0100` is
    `+14155550100`); any other value trimmed."""
    text = value.strip()
    if "@" in text or "%40" in text.lower():
        return normalize_email(text)
    if PHONE_RE.fullmatch(text):
        return "+" + re.sub(r"[^0-9]", "", text)
    return text


def salted_hash(salt: bytes, value: str) -> str:
    return hashlib.sha256(salt + normalize(value).encode()).hexdigest()


def resolve_salt(configured: str | None) -> str | None:
    """The salt (the configured one, else FLOE_PII_SALT), registered as a secret."""
    salt = configured or os.environ.get(SALT_ENV) or None
    secrets.register(salt)
    return salt


def source_salt(name: str, config: SourceConfig) -> str | None:
    """The salt of a source's `pii:` columns; a ConfigError naming the key when one is hashed without."""
    salt = resolve_salt(config.salt.get_secret_value() if config.salt else None)
    if "hash" in config.pii_columns().values() and not salt:
        raise ConfigError(f"sources.{name}.salt: is required when pii hashes a column (or set {SALT_ENV})")
    return salt


class ColumnPolicy:
    """One stream's `pii:` modes by column name; `apply` enforces them on a batch."""

    def __init__(self, modes: Mapping[str, PiiMode], salt: str | None) -> None:
        self.modes = {column: mode for column, mode in modes.items() if mode != "keep"}
        self._salt = (salt or "").encode()

    def __bool__(self) -> bool:
        return bool(self.modes)

    def schema(self, schema: pa.Schema) -> pa.Schema:
        """The declared columns as they land: dropped ones gone, hashed ones text."""
        import pyarrow as pa

        fields = []
        for f in schema:
            mode = self.modes.get(f.name)
            if mode != "drop":
                fields.append(pa.field(f.name, pa.string()) if mode == "hash" else f)
        return pa.schema(fields, metadata=schema.metadata)

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """`batch` with the policy's columns hashed or removed (other columns untouched)."""
        import pyarrow as pa

        if not any(name in self.modes for name in batch.schema.names):
            return batch
        arrays, fields = [], []
        for f, column in zip(batch.schema, batch.columns, strict=True):
            mode = self.modes.get(f.name)
            if mode == "drop":
                continue
            if mode == "hash":
                column, f = self.hash_column(column), pa.field(f.name, pa.string())
            arrays.append(column)
            fields.append(f)
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))

    def hash_column(self, column: pa.Array) -> pa.Array:
        """Each value's salted hash (NULL stays NULL); each distinct value is hashed once."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if arrow_type_key(column.type) == "nested":
            column = nested_as_json(column)
        elif not pa.types.is_string(column.type):
            column = column.cast(pa.string())
        encoded = pc.dictionary_encode(column)
        hashed = pa.array([salted_hash(self._salt, v) for v in encoded.dictionary.to_pylist()], pa.string())
        return pc.take(hashed, encoded.indices)


def stream_policy(modes: Mapping[str, PiiMode], salt: str | None, stream: str, protected: set[str],
                  where: str) -> ColumnPolicy:
    """The policy of one stream from a source's `pii:` (keys `column`, or `stream.column` for one
    stream only). `protected`: the stream's key and cursor columns, which cannot be dropped."""
    own: dict[str, PiiMode] = {}
    for key, mode in modes.items():
        table, dot, column = key.rpartition(".")
        if not dot:
            own.setdefault(key, mode)
        elif table == stream:
            own[column] = mode
    for column, mode in own.items():
        if mode == "drop" and column in protected:
            raise ConfigError(f"{where}.pii.{column}: cannot drop a key or cursor column of stream {stream} "
                              "(hash it instead)")
    return ColumnPolicy(own, salt)


def undeclared_keys(modes: Mapping[str, PiiMode], columns: Mapping[str, Collection[str]], where: str) -> list[str]:
    """Check a source's `pii:` keys against its streams' declared columns (`columns`: stream -> names).

    A key that looks like a typo (of a declared column, or of a stream in `stream.column`) is a
    ConfigError: left as it is it would protect nothing. The keys returned name no declared column (or a
    stream not selected); they still apply to a column of that name that a batch brings."""
    every = sorted({c for names in columns.values() for c in names})
    unknown = []
    for key, mode in modes.items():
        stream, dot, column = key.rpartition(".")
        if dot and stream not in columns:
            if hint := close_to(stream, columns):
                raise ConfigError(f"{where}.pii.{key}: the source has no stream {stream}{hint}")
            unknown.append(key)
            continue
        declared = columns[stream] if dot else every
        if mode == "keep" or column in declared:
            continue
        if hint := close_to(column, declared):
            raise ConfigError(f"{where}.pii.{key}: no stream declares a column {column}{hint}")
        unknown.append(key)
    return unknown


def close_to(word: str, options: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


class Pii:
    def __init__(self, mode: PiiMode, salt: str | None) -> None:
        if mode == "hash" and not salt:
            raise ValueError("hashing e-mail addresses needs a salt")
        self.mode = mode
        self._salt = (salt or "").encode()

    def hash(self, email: str) -> str:
        return hashlib.sha256(self._salt + normalize_email(email).encode()).hexdigest()  # = salted_hash

    def email(self, value: str | None) -> str | None:
        """The value to store for an e-mail field (None when dropped)."""
        if value is None or self.mode == "drop":
            return None
        return value if self.mode == "keep" else self.hash(value)

    def scrub_text(self, text: str) -> str:
        if self.mode == "keep":
            return text
        if self.mode == "drop":
            return EMAIL_RE.sub(DROPPED, text)
        return EMAIL_RE.sub(lambda m: self.hash(m.group(0)), text)

    def scrub_array(self, column: pa.Array) -> pa.Array:
        import pyarrow as pa
        import pyarrow.compute as pc

        hits = pc.or_kleene(pc.match_substring(column, "@"), pc.match_substring(column, "%40"))
        if not pc.any(hits).as_py():
            return column
        values = column.to_pylist()
        for i in pc.indices_nonzero(hits).to_pylist():
            values[i] = self.scrub_text(values[i])
        return pa.array(values, column.type)

    def scrub_batch(self, batch: pa.RecordBatch, skip: frozenset[str] = frozenset()) -> pa.RecordBatch:
        """Replace addresses in every string column not in `skip` (columns already handled)."""
        import pyarrow as pa

        if self.mode == "keep":
            return batch
        columns = list(batch.columns)
        changed = False
        for i, f in enumerate(batch.schema):
            if f.name in skip or not pa.types.is_string(f.type):
                continue
            scrubbed = self.scrub_array(columns[i])
            if scrubbed is not columns[i]:
                columns[i], changed = scrubbed, True
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema) if changed else batch
