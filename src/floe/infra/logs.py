"""Logging set-up: logfmt lines (or one JSON object per line) on stderr, with secrets redacted.

floe's log calls are written as logfmt templates, `log.info("event=loaded source=%s rows=%d", name, n)`.
The formatter reads each `key=%x` pair of the template with its argument, so the fields keep their
types: JSON lines carry `"rows": 1200` (not text inside a message), and logfmt lines quote a value
that holds a space, a quote, `=` or nothing (`stream="a -> b"`), as logfmt libraries do. Text of a
template that is not a `key=value` pair, and the lines of other libraries, go into `msg`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from floe.core.secrets import redact

_PLACEHOLDER = re.compile(r"%(?:%|[#0\- +]*\d*(?:\.(?P<digits>\d+))?(?P<kind>[a-zA-Z]))")
_PAIR = re.compile(r"(?P<key>[A-Za-z_][\w.]*)=(?P<value>\S*)")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _typed(spec: re.Match[str], arg: Any) -> Any:
    """A template argument as a JSON value of the type its conversion says."""
    kind, digits = spec["kind"], spec["digits"]
    try:
        if kind in "di":
            return int(arg)
        if kind in "feg":
            if digits == "0":
                return round(float(arg))
            return round(float(arg), int(digits)) if digits is not None else float(arg)
    except (TypeError, ValueError):
        pass
    if arg is None or isinstance(arg, bool | int | float):
        return arg
    if isinstance(arg, Mapping | list | tuple):
        return json.loads(redact(json.dumps(arg, default=str)))
    return redact(str(arg))


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `key=value` fields, typed, plus `msg` for any other text (all redacted)."""
    template, args = record.msg, record.args
    if not isinstance(template, str) or "=" not in template or "%(" in template:
        return {"msg": redact(record.getMessage())}
    values = (args,) if isinstance(args, Mapping) else tuple(args or ())  # logging unwraps a lone mapping
    specs = [m for m in _PLACEHOLDER.finditer(template) if m.group() != "%%"]
    if len(specs) != len(values):
        return {"msg": redact(record.getMessage())}
    found: dict[str, Any] = {}
    rest: list[str] = []

    def render(start: int, end: int) -> str:
        inside = [(n, s) for n, s in enumerate(specs) if start <= s.start() < end]
        text = template[start:end]
        return redact(text % tuple(values[n] for n, _ in inside)) if inside else text.replace("%%", "%")

    position = 0
    for pair in _PAIR.finditer(template):
        if gap := render(position, pair.start()).strip():
            rest.append(gap)
        position = pair.end()
        whole = next((s for s in specs if (s.start(), s.end()) == pair.span("value")), None)
        found[pair["key"]] = (_typed(whole, values[specs.index(whole)]) if whole is not None
                              else render(*pair.span("value")))
    if tail := render(position, len(template)).strip():
        rest.append(tail)
    if rest:
        found["msg"] = " ".join(rest)
    return found


def logfmt_value(value: Any) -> str:
    """A value as logfmt writes it: bare when it can be, else double-quoted with `\\` and `"` escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping | list):
        value = json.dumps(value, separators=(",", ":"), default=str)
    text = str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name, **fields(record)}
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        if self.as_json:
            return json.dumps(line, default=str)
        return " ".join(f"{key}={logfmt_value(value)}" for key, value in line.items())


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger once; `fmt` is auto (text), text (logfmt) or json."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
