"""The layout is the architecture: these checks keep it that way.

The pure core (model, ports, the flow and every operation) reaches the world only through ports, so it imports no
libvirt, SQL, XML, subprocess or adapter; no package-level import cycle exists; no module grows past the size
one person reads at once. Each check reads the source with ``ast``, so a violation names file and import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "freezeframe"
CORE = (
    "model", "ports", "flow", "window", "discovery", "signals", "validation", "errors", "serialize", "durable",
    "volume_members", "recovery", "incremental",
)  # fmt: skip
CORE_PACKAGES = ("ops", "ports")
FORBIDDEN_IN_CORE = (
    "libvirt", "libvirt_qemu", "sqlalchemy", "alembic", "lxml", "xmlschema", "subprocess",
    "freezeframe.adapters", "freezeframe.api", "freezeframe.wiring", "freezeframe.testbed",
)  # fmt: skip
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" not in path.parts:
            yield module_name(path), path


def imports(path: Path, *, top_level_only: bool) -> Iterator[str]:
    """Absolute names imported; with ``top_level_only``, only those run at import time (not in functions or
    ``if TYPE_CHECKING`` blocks), which is what can form a cycle."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(nodes: list[ast.stmt]) -> Iterator[str]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                yield base
                yield from (f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and top_level_only:
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    yield from visit(node.body + node.orelse)
            elif isinstance(node, ast.Try) and top_level_only:
                yield from visit(node.body + node.orelse + node.finalbody)
            elif not top_level_only:
                yield from visit([n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)])

    yield from visit(tree.body)


def is_core(name: str) -> bool:
    short = name.removeprefix("freezeframe.")
    return short in CORE or short.split(".")[0] in CORE_PACKAGES


def test_the_core_imports_no_outside_system_and_no_adapter() -> None:
    checked = [(name, path) for name, path in modules() if is_core(name)]
    assert len(checked) > 15, "the core was not found"
    violations = [
        f"{name} imports {imported}"
        for name, path in checked
        for imported in sorted(set(imports(path, top_level_only=False)))
        if any(imported == bad or imported.startswith(bad + ".") for bad in FORBIDDEN_IN_CORE)
    ]
    assert not violations, "\n".join(violations)


def import_graph() -> dict[str, set[str]]:
    known = dict(modules())
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported in imports(path, top_level_only=True):
            # ``from freezeframe.x import y`` names module x.y when that is a module, else module x
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    # A package's __init__ importing its own submodules is how packages re-export; not a cycle between ideas.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    assert sum(len(t) for t in graph.values()) > 50, "the import graph was not built"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("root", ["src", "tests", "bench"])
def test_modules_stay_readable(root: str) -> None:
    base = PACKAGE.parents[1] / root
    too_long = {
        str(path.relative_to(base)): n
        for path in base.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES * (2 if root != "src" else 1)
    }
    assert not too_long, f"modules over the limit: {too_long}"
