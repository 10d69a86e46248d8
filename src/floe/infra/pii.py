"""E-mail addresses in source data: hash (salted SHA-256), drop or keep them.

`Pii.email(value)` treats a field that *is* an address; `Pii.scrub_batch` finds addresses
embedded anywhere in the text columns of an Arrow batch (a var value, a click URL with
`?email=a%40b.com`) and replaces each with its hash (`hash`) or with `[email]` (`drop`).
The scan is vectorised: only values containing `@` or `%40` are looked at in Python.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc

PiiMode = Literal["hash", "drop", "keep"]
EMAIL_RE = re.compile(r"[A-Za-z0-9._+\-]+(?:@|%40)[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}", re.IGNORECASE)
DROPPED = "[email]"


def normalize_email(value: str) -> str:
    """The canonical form that is hashed: unquoted, without `<>`, trimmed, lower case."""
    return unquote(value).strip().strip("<>").strip().lower()


class Pii:
    def __init__(self, mode: PiiMode, salt: str | None) -> None:
        if mode == "hash" and not salt:
            raise ValueError("hashing e-mail addresses needs a salt")
        self.mode = mode
        self._salt = (salt or "").encode()

    def hash(self, email: str) -> str:
        return hashlib.sha256(self._salt + normalize_email(email).encode()).hexdigest()

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
        hits = pc.or_kleene(pc.match_substring(column, "@"), pc.match_substring(column, "%40"))
        if not pc.any(hits).as_py():
            return column
        values = column.to_pylist()
        for i in pc.indices_nonzero(hits).to_pylist():
            values[i] = self.scrub_text(values[i])
        return pa.array(values, column.type)

    def scrub_batch(self, batch: pa.RecordBatch, skip: frozenset[str] = frozenset()) -> pa.RecordBatch:
        """Replace addresses in every string column not in `skip` (columns already handled)."""
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
