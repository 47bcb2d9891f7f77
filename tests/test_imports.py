"""No import cycles inside ``aenode/``, counting imports inside functions.

The graph is read from the source with :mod:`ast`: every ``import`` and ``from ... import``
of an aenode module, at any depth (functions included), except those under
``if TYPE_CHECKING:``. Importing ``aenode.a.b`` also runs ``aenode/a/__init__.py``, so
from outside ``aenode.a`` it counts as importing the package ``aenode.a`` too. Nothing
imports the package root: the version lives in :mod:`aenode.version`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "aenode"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> list[tuple[str, int]]:
    """(imported aenode module, line) pairs, skipping TYPE_CHECKING blocks."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(name, line) for name, line in found if name.split(".")[0] == "aenode"]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target, _ in _imports(ast.parse(path.read_text()), package):
            parts = target.split(".")
            # aenode.a.b runs aenode/a/__init__.py first, unless the importer is inside
            # aenode.a (then that package is already initialising).
            for depth in range(2, len(parts) + 1):
                dep = ".".join(parts[:depth])
                inside = name.startswith(dep + ".") and depth < len(parts)
                if dep in MODULES and dep != name and not inside:
                    graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_graph_sees_function_level_imports() -> None:
    graph = _graph()
    # aenode.cli imports its command modules lazily by name; jobs imports results in run().
    assert "aenode.results" in graph["aenode.jobs"]
    assert "aenode.select.rules" in graph["aenode.config"]


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found() -> None:
    graph = _graph()
    graph["aenode.errors"].add("aenode.config")
    assert any("aenode.errors" in c and "aenode.config" in c for c in _cycles(graph))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_imports_the_package_root(name: str) -> None:
    if name == "aenode":
        return
    for target, line in _imports(ast.parse(MODULES[name].read_text()), name):
        assert target != "aenode", f"{MODULES[name]}:{line} imports the package root"
