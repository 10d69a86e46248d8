"""The package's import graph: no cycle, and imports only go down the layers.

Every import counts (function-level ones too), except those under `if TYPE_CHECKING:`, which never
run. The layers, top to bottom (docs/contributing.md explains them):

    cli > commands > apps > engine > config > sources | destinations | sandbox > infra > core

A module imports its own package's modules and lower layers only. Within sources/ and destinations/
each plugin (a registered type, with its `<type>_*` helper modules or its package) is independent of
the others; the shared modules beside them (e.g. destinations/sql.py) are not plugins."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import floe
from floe.core.plugins import destination_registry, source_registry

PACKAGE = Path(floe.__file__).parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("floe", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The floe modules that `name` imports (`from floe.x import y` counts as floe.x.y if that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                targets = [f"{base}.{a.name}" for a in child.names]
            found.update(t for t in map(resolve, (t for t in targets if t.split(".")[0] == "floe")) if t)
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def test_the_package_has_no_import_cycle():
    known = module_names()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError("import cycle: " + " -> ".join(exc.args[1])) from None


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import floe.cli\n"
                      "def f():\n    from floe.config import load_config\n")
    known = {"floe.m": module, "floe.cli": module, "floe.config": module}
    assert imports_of("floe.m", module, known) == {"floe.config"}


LAYERS = ("core", "infra", "plugins", "config", "engine", "apps", "commands", "cli")
PLUGIN_PACKAGES = {"sources": source_registry, "destinations": destination_registry}
# Redshift speaks PostgreSQL's protocol: its destination extends the PostgreSQL one.
ALLOWED_PLUGIN_EDGES = {("destinations", "redshift", "postgres")}


def layer_of(name: str) -> str | None:
    """The layer a module belongs to (None: the package root and floe.testing, which tests use)."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "testing":
        return None
    top = parts[1]
    if top in ("cli", "__main__"):
        return "cli"
    if top in ("config", "configref"):  # floe.yml's models, and the reference generated from them
        return "config"
    if top in ("sources", "destinations", "sandbox"):
        return "plugins"
    assert top in LAYERS, f"{name}: in no layer (add it to one in layer_of)"
    return top


def plugin_of(name: str) -> tuple[str, str] | None:
    """(package, plugin type) of a module of a plugin; None for shared modules and other layers."""
    parts = name.split(".")
    if len(parts) < 3 or parts[1] not in PLUGIN_PACKAGES:
        return None
    family = parts[2].split("_")[0]
    return (parts[1], family) if family in PLUGIN_PACKAGES[parts[1]].names() else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, targets in graph.items():
        here = layer_of(name)
        for target in sorted(targets):
            there = layer_of(target)
            if here is None or there is None:
                continue
            if LAYERS.index(there) > LAYERS.index(here):
                found.append(f"{name} -> {target} (up from {here} to {there})")
            elif here == there == "plugins" and name.split(".")[1] != target.split(".")[1]:
                found.append(f"{name} -> {target} (across plugin packages)")
            else:
                mine, theirs = plugin_of(name), plugin_of(target)
                if mine and theirs and mine != theirs and (*mine, theirs[1]) not in ALLOWED_PLUGIN_EDGES:
                    found.append(f"{name} -> {target} (one plugin imports another)")
    return found


def test_imports_only_go_down_the_layers():
    known = module_names()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert layer_violations(graph) == []


def test_the_layer_check_sees_upward_and_sideways_imports():
    graph = {
        "floe.core.stream": {"floe.config"},
        "floe.sources.twilio": {"floe.destinations.sql", "floe.sources.twilio_records", "floe.core.stream"},
        "floe.destinations.duckdb": {"floe.destinations.postgres", "floe.destinations.sql"},
        "floe.destinations.redshift": {"floe.destinations.postgres"},
        "floe.engine.pipeline": {"floe.infra.stage", "floe.engine.progress"},
    }
    assert layer_violations(graph) == [
        "floe.core.stream -> floe.config (up from core to config)",
        "floe.sources.twilio -> floe.destinations.sql (across plugin packages)",
        "floe.destinations.duckdb -> floe.destinations.postgres (one plugin imports another)",
    ]
