"""Logging set-up: `key=value` lines (or JSON) on stderr, with secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from floe.core.secrets import redact


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        if record.exc_info:
            message += " " + redact(self.formatException(record.exc_info)).replace("\n", " | ")
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if self.as_json:
            return json.dumps({"ts": ts, "level": record.levelname.lower(), "logger": record.name, "msg": message})
        return f"ts={ts} level={record.levelname.lower()} logger={record.name} {message}"


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger once; `fmt` is auto (text), text or json."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
