"""The package's import structure: no circle between its modules (deferred imports count) and no
private name taken from another module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "drdo_lightning"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module it imports, name taken or None, line)`` for every package import in a module, at any depth."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], None, node.lineno) for a in node.names
                      if a.name.startswith("drdo_lightning.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "drdo_lightning":
            for alias in node.names:
                if node.module == "drdo_lightning":  # `from drdo_lightning import losses` or a name of __init__
                    module = alias.name if alias.name in MODULES else "__init__"
                    found.append((module, None if module == alias.name else alias.name, node.lineno))
                else:
                    found.append((node.module.split(".")[1], alias.name, node.lineno))
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


def test_no_import_circle_between_modules():
    assert find_circle(graph()) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_from_other_modules(name):
    private = [(target, taken, line) for target, taken, line in imports(name)
               if taken and taken.startswith("_") and not taken.startswith("__")]
    assert not private, f"{name}.py imports private names: {private}"
    bound = {alias.asname or alias.name for node in ast.walk(ast.parse(MODULES[name].read_text()))
             if isinstance(node, ast.ImportFrom) and node.module == "drdo_lightning" for alias in node.names
             if alias.name in MODULES}
    reached = [(node.value.id, node.attr, node.lineno) for node in ast.walk(ast.parse(MODULES[name].read_text()))
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
               and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not reached, f"{name}.py reaches private names of other modules: {reached}"
