"""What singer-check-tap checks, for floe's tap tests: message shape, SCHEMA before RECORD, and every
RECORD valid against its stream's latest SCHEMA with format checks (RFC 3339 via rfc3339-validator)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import orjson


@dataclass
class TapOutput:
    messages: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: list[Any] = field(default_factory=list)
    activations: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    @property
    def last_state(self) -> Any:
        return self.states[-1] if self.states else None


REQUIRED = {"RECORD": ("stream", "record"), "SCHEMA": ("stream", "schema", "key_properties"),
            "STATE": ("value",), "ACTIVATE_VERSION": ("stream", "version")}


def check_tap_output(stdout: bytes) -> TapOutput:
    """Parse and validate a tap's stdout; raise AssertionError naming the line that is wrong."""
    out = TapOutput()
    validators: dict[str, Any] = {}
    checker = jsonschema.FormatChecker()
    assert "date-time" in checker.checkers, "rfc3339-validator must be installed for date-time checks"
    for n, line in enumerate(stdout.splitlines(), 1):
        message = orjson.loads(line)
        kind = message["type"]
        for key in REQUIRED.get(kind, ()):
            assert key in message, f"line {n}: {kind} without {key}"
        out.messages.append(message)
        if kind == "SCHEMA":
            jsonschema.Draft7Validator.check_schema(message["schema"])
            validators[message["stream"]] = jsonschema.Draft7Validator(message["schema"], format_checker=checker)
            out.schemas[message["stream"]] = message
            for key in message["key_properties"] + message.get("bookmark_properties", []):
                assert key in message["schema"]["properties"], f"line {n}: {key} not in the schema"
        elif kind == "RECORD":
            stream = message["stream"]
            assert stream in validators, f"line {n}: RECORD of {stream} before its SCHEMA"
            errors = list(validators[stream].iter_errors(message["record"]))
            assert not errors, f"line {n}: {errors[0].message}"
            if "time_extracted" in message:
                assert checker.conforms(message["time_extracted"], "date-time"), f"line {n}: time_extracted"
            out.records[stream].append(message)
        elif kind == "STATE":
            out.states.append(message["value"])
        elif kind == "ACTIVATE_VERSION":
            out.activations[message["stream"]].append(message["version"])
    return out
