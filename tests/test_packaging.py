"""The wheel: built from the sources, installed into a fresh virtualenv, `floe` works; every
third-party module floe imports is a declared dependency. Offline: the fresh virtualenv sees the
dependencies of the test environment, installed, through a .pth file (no package index needed)."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import duckdb
import pytest

from floe import __version__
from floe.sandbox.sailthru import ExportSpec, generate

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "floehouse"


def sh(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (the build leaves nothing in the repository)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
       "-w", out, tree)
    (built,) = out.glob("*.whl")
    return built


def requirements(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    return {re.split(r"[ ;<>=!~\[]", line.removeprefix("Requires-Dist: "))[0].lower().replace("_", "-")
            for line in lines if line.startswith("Requires-Dist: ") and "extra ==" not in line}


def test_the_wheel_installs_into_a_fresh_virtualenv_and_runs(wheel: Path, tmp_path: Path) -> None:
    assert wheel.name.startswith(f"{DISTRIBUTION}-{__version__}-")
    venv = tmp_path / "fresh"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    assert sh(venv / "bin" / "floe", "--version").strip() == f"floe {__version__}"
    where = sh(python, "-c", "import floe; print(floe.__file__)").strip()
    assert where.startswith(str(site)), where  # the installed wheel, not the sources

    generate(tmp_path / "export", ExportSpec(days=1, profiles=3))
    (tmp_path / "floe.yml").write_text(
        "sources:\n  sailthru:\n    type: sailthru\n    path: export\n    pii: drop\n"
        "destinations:\n  warehouse:\n    type: duckdb\n    path: w.duckdb\n")
    sh(venv / "bin" / "floe", "run", "--stream", "blast", cwd=tmp_path)
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM sailthru.blast").fetchone()[0] > 0


def imported_modules() -> set[str]:
    """Top-level modules floe's own code imports (the sandbox and test helpers included: they ship)."""
    found: set[str] = set()
    for path in (ROOT / "src" / "floe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"floe", "__future__"}



def test_every_imported_package_is_a_declared_dependency(wheel: Path) -> None:
    declared = requirements(wheel)
    by_module = metadata.packages_distributions()
    missing = {module: by_module.get(module, ["(not installed)"]) for module in imported_modules()
               if not {d.lower().replace("_", "-") for d in by_module.get(module, [])} & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
