"""No two modules of datagen/, model/ or train/ import each other, directly or through others.

The graph is read from the source (every import statement, inside functions too), so a circle
hidden behind an import inside a function is still found.
"""
from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("datagen", "model", "train")


def module_name(path: Path) -> str:
    """datagen/cli/__init__.py -> datagen.cli; datagen/sink.py -> datagen.sink."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement of this module names (relative imports resolved)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            # `from datagen.cli import batch` imports the module datagen.cli.batch too.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a submodule import also runs its packages' __init__)."""
    sources = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                prefix = ".".join(parts[:end])
                if prefix in sources and prefix != module and not module.startswith(prefix + "."):
                    targets.add(prefix)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_module_of_the_project_imports_itself_in_a_circle():
    graph = import_graph()
    assert "datagen.cli" in graph and "datagen.task" in graph  # the walk sees the packages
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_inside_functions_count():
    tree = ast.parse("def f():\n    from datagen.sink import OutputSink\n")
    assert "datagen.sink" in imported_names(tree, "datagen.task", False)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 7), st.sets(st.integers(0, 7), max_size=3), max_size=8))
def test_find_cycle_agrees_with_reachability(edges):
    graph = {str(k): {str(v) for v in vs} for k, vs in edges.items()}
    nodes = set(graph) | {v for vs in graph.values() for v in vs}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    has_cycle = any(n in reachable(n) for n in nodes)
    cycle = find_cycle(graph)
    assert (cycle is not None) == has_cycle
    if cycle:
        assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
