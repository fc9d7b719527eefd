"""The import graph of the four packages, read with `ast` (every import that runs, also those inside
functions; not those under `if TYPE_CHECKING:`):
no cycle between modules, and dependencies point one way, analyses -> probe -> hooks -> kernels.
The shared leaves at the package root (errors, io) import nothing of attnprobe; every room may import them.

    python tests/test_imports.py      # prints the graph's cycles and wrong-way edges, exits 1 on any
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "attnprobe"
PACKAGES = ("kernels", "hooks", "probe", "analyses")  # lowest first
LEAVES = {"attnprobe.errors", "attnprobe.io"}  # importable from kernels: they import no attnprobe module


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["attnprobe", *parts])


def imports(path: Path, modules: set[str]) -> set[str]:
    """attnprobe modules `path` imports (a `from package import name` counts as the submodule when it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            if len(submodules) < len(node.names) or not name.startswith(f"{target}."):
                found.add(target)  # names from the module itself (a package's own submodules need not run it)
            found |= submodules
    return {m for m in found if m in modules and m != name}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def graph() -> dict[str, set[str]]:
    paths = [ROOT / f"{leaf.split('.')[-1]}.py" for leaf in sorted(LEAVES)]
    paths += [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in edges:
        if node not in index:
            visit(node)
    return found


def wrong_way(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    rank = lambda module: PACKAGES.index(module.split(".")[1])  # noqa: E731
    bad = []
    for source, targets in edges.items():
        for target in targets:
            if target in LEAVES:
                continue
            if source in LEAVES or rank(target) > rank(source):
                bad.append((source, target))
    return sorted(bad)


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_dependencies_point_one_way():
    assert wrong_way(graph()) == []


def test_leaves_import_no_attnprobe_module():
    edges = graph()
    assert {leaf: edges[leaf] for leaf in LEAVES if leaf in edges} == {leaf: set() for leaf in LEAVES if leaf in edges}


def test_the_checker_sees_a_cycle_and_a_wrong_way_edge():
    edges = {"attnprobe.kernels.a": {"attnprobe.hooks.swap", "attnprobe.errors"},
             "attnprobe.hooks.swap": {"attnprobe.kernels.a"}, "attnprobe.errors": set()}
    assert cycles(edges) == [["attnprobe.hooks.swap", "attnprobe.kernels.a"]]
    assert wrong_way(edges) == [("attnprobe.kernels.a", "attnprobe.hooks.swap")]


if __name__ == "__main__":
    edges = graph()
    problems = [f"cycle: {' <-> '.join(c)}" for c in cycles(edges)] + [f"wrong way: {a} -> {b}" for a, b in wrong_way(edges)]
    print("\n".join(problems) or f"{len(edges)} modules, {sum(map(len, edges.values()))} imports: acyclic, one way")
    sys.exit(1 if problems else 0)
