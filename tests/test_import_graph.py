"""The package's modules import each other without cycles: every import (module level and inside functions)
of every module under ``fiddler_jax/`` is an edge, and the graph must have no strongly connected component
larger than one module. A cycle is named module by module, so the failure says which imports to untangle."""
from __future__ import annotations

import ast
import os

import fiddler_jax

PACKAGE = "fiddler_jax"
ROOT = os.path.dirname(os.path.abspath(fiddler_jax.__file__))


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every ``.py`` under the package (a package's ``__init__`` is the package)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(folder, os.path.dirname(ROOT))
        prefix = rel.replace(os.sep, ".")
        for f in sorted(files):
            if f.endswith(".py"):
                name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                out[name] = os.path.join(folder, f)
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: str, known: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file: ``import a.b.c`` depends on ``a.b.c``;
    ``from a.b import c`` on ``a.b.c`` when that is a module, else on ``a.b``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: imports(m, path, known) for m, path in found.items()}


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # iterative would be longer; the package is far below the recursion limit
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            visit(v)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle through each strongly connected component (first module repeated at the end)."""
    return [_cycle_through(graph, set(c)) for c in components(graph)]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One closed path inside a strongly connected component: from its first module, breadth-first back to it."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"not strongly connected: {sorted(component)}")


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "fiddler_jax" in graph and "fiddler_jax.kernels" in graph  # packages are modules
    assert "fiddler_jax.kernels._lib" in graph["fiddler_jax.kernels"]  # from a package's __init__
    assert "fiddler_jax.experiments.common" in graph["fiddler_jax.experiments.bench"]  # module level
    assert "fiddler_jax.runtime.gpu_memory" in graph["fiddler_jax.experiments.bench"]  # inside a function
    assert "fiddler_jax.experiments.schemas" in graph["fiddler_jax.experiments.bench"]  # `from pkg import module`


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    found = components(graph)
    assert not found, "import cycles:\n" + "\n".join(
        f"  {' -> '.join(_cycle_through(graph, set(c)))}   (modules in this knot: {', '.join(c)})" for c in found)
