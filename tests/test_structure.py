"""The package's import structure: three layers, no circle between its modules (deferred imports
count) and no private name taken from another module.

The layers, bottom up: the library (everything but the two folders below and the command line),
``embedded_default/`` (the shipped task and its build), ``experiments/`` (the sweeps); ``cli`` sits on
top of all three. A module imports only its own layer and the layers below it.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "drdo_lightning"
# "data.pairs" -> its file; a package is named by its __init__.py ("data").
MODULES = {
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts[:-1] if p.name == "__init__.py"
             else p.relative_to(PACKAGE).with_suffix("").parts) or "__init__": p
    for p in PACKAGE.rglob("*.py")
}
COMMAND_LINE = {"cli", "__main__"}
LAYERS = {"library": 0, "embedded_default": 1, "experiments": 2, "command line": 3}


def layer(module: str) -> str:
    if module in COMMAND_LINE:
        return "command line"
    top = module.split(".")[0]
    return top if top in ("embedded_default", "experiments") else "library"


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module it imports, name taken or None, line)`` for every package import in a module, at any depth."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".", 1)[1], None, node.lineno) for a in node.names
                      if a.name.startswith("drdo_lightning.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "drdo_lightning":
            source = node.module.partition(".")[2] or "__init__"
            for alias in node.names:
                submodule = f"{source}.{alias.name}" if source != "__init__" else alias.name
                if submodule in MODULES:  # `from drdo_lightning import losses`, `from drdo_lightning.data import pairs`
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((source, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name)} - {name} for name in MODULES}


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``edges`` as the path that closes it, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (circle := visit(nxt, path + [node])):
                return circle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (circle := visit(start, [])):
            return circle
    return None


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_module_list_sees_the_subpackages():
    assert {"data", "data.pairs", "evaluation.judges", "experiments.protocol", "embedded_default.task"} <= set(MODULES)
    assert layer("data.pairs") == "library" and layer("experiments.sweeps") == "experiments"


def test_no_import_circle_between_modules():
    # A package's __init__ re-exports its modules, so importing from it is importing from them.
    edges = graph()
    for package in [m for m in MODULES if MODULES[m].name == "__init__.py" and m != "__init__"]:
        edges = {src: targets - {package} if src.startswith(f"{package}.") else targets for src, targets in edges.items()}
    assert find_circle(edges) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name):
    upward = [(target, line) for target, _, line in imports(name) if LAYERS[layer(target)] > LAYERS[layer(name)]]
    assert not upward, f"{name} ({layer(name)}) imports from a layer above it: {upward}"


def test_the_library_never_names_the_embedded_default_folder():
    """Paths and hints about ``embedded_default/`` belong to the layers that ship it, not the library."""
    named = [name for name in MODULES if layer(name) == "library"
             and "embedded_default/" in MODULES[name].read_text()]
    assert not named, f"library modules that name embedded_default/: {named}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_from_other_modules(name):
    private = [(target, taken, line) for target, taken, line in imports(name)
               if taken and taken.startswith("_") and not taken.startswith("__")]
    assert not private, f"{name} imports private names: {private}"
    tree = ast.parse(MODULES[name].read_text())
    bound = {alias.asname or alias.name for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drdo_lightning")
             for alias in node.names
             if f"{node.module.partition('.')[2]}.{alias.name}".lstrip(".") in MODULES}
    reached = [(node.value.id, node.attr, node.lineno) for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
               and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not reached, f"{name} reaches private names of other modules: {reached}"


# Module paths from before the layers (now objectives, strategies.fsdp, reliability, cpu_cores,
# embedded_default.task, experiments.pipeline, experiments.comparison, evaluating): nothing aliases them.
OLD_MODULES = ("modules", "fsdp", "safety", "free_cores", "demo", "pipeline", "comparison", "evaluation.command")
OLD_PATH = re.compile(rf"drdo_lightning[./]({'|'.join(OLD_MODULES)})\b")  # a dotted path or a file path
PACKAGE_IMPORT = re.compile(r"from drdo_lightning import (\([^)]*\)|[^\n]*)")
SHIPPED = ("drdo_lightning", "configs", "docs", "notebooks", "launch", "benchmarks", "tests", "README.md",
           "pyproject.toml", "setup.py", "Makefile")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", ".sh", ".txt", ".json", ".cfg", ""}


def shipped_text_files() -> list[Path]:
    root = PACKAGE.parent
    files = []
    for name in SHIPPED:
        path = root / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in candidates if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def test_the_shipped_files_are_found():
    names = {p.relative_to(PACKAGE.parent).as_posix() for p in shipped_text_files()}
    assert {"README.md", "drdo_lightning/cli.py", "configs/drdo.yaml", "tests/test_structure.py"} <= names


def test_no_shipped_file_names_an_old_module_path():
    named = []
    for path in shipped_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        named += [f"{path.relative_to(PACKAGE.parent)}: {m.group(0)}" for m in OLD_PATH.finditer(text)]
        named += [f"{path.relative_to(PACKAGE.parent)}: from drdo_lightning import {m.group(1)}"
                  for m in PACKAGE_IMPORT.finditer(text) if set(re.findall(r"\w+", m.group(1))) & set(OLD_MODULES)]
    assert not named, f"old module paths: {named}"


@pytest.mark.parametrize("old", OLD_MODULES)
def test_an_old_module_path_does_not_import(old):
    with pytest.raises(ModuleNotFoundError, match=f"drdo_lightning.{old}"):
        importlib.import_module(f"drdo_lightning.{old}")
