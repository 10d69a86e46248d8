"""The registry of HTTP emulators that `floe sandbox` (and `floe demo`) start: one line per emulator.

An entry maps a name to `(module, default port)`. The module provides:
- `create_app(**options)`: a module-level ASGI app factory (so benchmarks can serve it in a process);
- optionally `describe(app, url) -> dict` with `"credentials"` (printed by `floe sandbox`) and
  `"sources"` (floe.yml source entries that read from this emulator, used by demos and examples).
"""

from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass, field
from typing import Any

from floe.core.errors import FloeError
from floe.sandbox.server import RunningServer, serve_in_thread

EMULATORS: dict[str, tuple[str, int]] = {
    "twilio": ("floe.sandbox.twilio", 8710),
    "singular": ("floe.sandbox.singular", 8711),
    "pendo": ("floe.sandbox.pendo", 8713),
    "fullstory": ("floe.sandbox.fullstory", 8712),
}


@dataclass
class Running:
    name: str
    server: RunningServer
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def app(self) -> Any:
        return self.server.app


def start(name: str, port: int | None = None, **options: Any) -> Running:
    """Start one emulator in a thread (port None: a free port)."""
    module_name, _ = EMULATORS[name]
    if port is not None:
        _check_free(name, port)
    module = importlib.import_module(module_name)
    app = module.create_app(**options)
    server = serve_in_thread(app, port)
    describe = getattr(module, "describe", None)
    return Running(name, server, describe(app, server.url) if describe else {})


def _check_free(name: str, port: int) -> None:
    """Fail clearly instead of silently talking to whatever already listens on `port`."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise FloeError(f"{name} emulator: port {port} on 127.0.0.1 is in use (use --random-ports)") from None


def start_all(names: list[str] | None = None, fixed_ports: bool = False,
              options: dict[str, dict[str, Any]] | None = None) -> dict[str, Running]:
    """Start the named emulators (default: all); stop the ones already started if one fails."""
    running: dict[str, Running] = {}
    try:
        for name in names or list(EMULATORS):
            port = EMULATORS[name][1] if fixed_ports else None
            running[name] = start(name, port, **(options or {}).get(name, {}))
    except BaseException:
        stop_all(running)
        raise
    return running


def stop_all(running: dict[str, Running]) -> None:
    for emulator in running.values():
        emulator.server.stop()


def sandbox_sources(running: dict[str, Running]) -> dict[str, Any]:
    """floe.yml `sources:` entries reading from the running emulators (for demos and examples)."""
    sources: dict[str, Any] = {}
    for emulator in running.values():
        sources.update(emulator.info.get("sources", {}))
    return sources


def sandbox_config(names: list[str] | None = None, duckdb_path: str = "sandbox.duckdb",
                   options: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Running]]:
    """Start emulators on free ports and return (a floe config dict loading them into DuckDB, the running
    emulators). The caller stops them with `stop_all(running)`. For `floe demo` and quick experiments."""
    running = start_all(names, options=options)
    config = {"sources": sandbox_sources(running),
              "destinations": {"warehouse": {"type": "duckdb", "path": duckdb_path}}}
    return config, running
