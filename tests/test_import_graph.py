"""The package's import graph has no cycle: every import counts (function-level ones too), except
those under `if TYPE_CHECKING:`, which never run."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import floe

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
