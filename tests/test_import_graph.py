"""The project's modules import each other one way only: no import cycle in any package, nor across them.

Read from the source with `ast` (nothing is imported, no engine starts). Every import of a project module
counts, wherever it is written: at module level, under `if TYPE_CHECKING:`, or inside a function, since a
cycle hidden in a function is still a cycle of dependencies. `from pkg import name` is an edge to the
submodule `pkg.name` when there is one, else to `pkg`; the implicit import of a module's parent package is
not an edge (a package's `__init__` importing its own modules is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {  # package name -> its folder
    "unlock": REPO / "unlock",
    "unlock_vllm": REPO / "patches" / "unlock_vllm",
    "unlock_server": REPO / "server" / "unlock_server",
    "unlock_client": REPO / "clients" / "unlock_client",
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of every package."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement asks for (not yet narrowed to project modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = _imported(node, module, is_package)
            if isinstance(node, ast.ImportFrom):
                base, members = names[0], names[1:]
                submodules = [m for m in members if m in files]
                # `from pkg import module` is an edge to the module; `from pkg import name` one to pkg
                targets = submodules + ([base] if len(submodules) < len(members) else [])
            else:
                targets = names
            edges.update(t for t in targets if t in files and t != module)
        graph[module] = edges
    return graph


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (strongly connected components of more
    than one module, Tarjan's algorithm), each sorted; [] when every arrow points one way."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(graph: dict[str, set[str]], groups: list[list[str]]) -> str:
    """Each tangle with the imports inside it, for the failure message."""
    lines = []
    for group in groups:
        edges = [f"{a} -> {b}" for a in group for b in sorted(graph[a]) if b in group]
        lines.append("import cycle among " + ", ".join(group) + ": " + "; ".join(edges))
    return "\n".join(lines)


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "unlock.ops" in graph["unlock.pipeline"]  # module level, `from unlock.ops import ...`
    assert "unlock_server.locks" in graph["unlock_server.coordination"]  # relative
    assert "unlock_vllm.seams" in graph["unlock_vllm.discovery"]  # inside a function, `from pkg import mod`
    assert "unlock_vllm.plugin" in graph["unlock_vllm.worker"]  # inside a method


def test_tangles_finds_every_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}
    assert tangles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert tangles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_in_package(package):
    graph = {
        module: {t for t in edges if t.split(".")[0] == package}
        for module, edges in import_graph().items()
        if module.split(".")[0] == package
    }
    groups = tangles(graph)
    assert not groups, describe(graph, groups)


def test_no_import_cycle_across_packages():
    graph = import_graph()
    groups = tangles(graph)
    assert not groups, describe(graph, groups)
