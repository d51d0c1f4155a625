"""The three floors of the code, read from its import statements: the core (`gkt`) imports no service and no
tool, the services import no tool, and no module imports itself through others.

Every import counts, those inside functions and under `TYPE_CHECKING` too: a deferred import is still a
dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLOORS = ("gkt", "services", "gkt_tools")
"""Lowest first: each may import only from its own floor and those before it."""
GENERATED = REPO / "gkt" / "v1"


def _modules() -> dict[str, Path]:
    modules = {}
    for floor in FLOORS:
        for path in (REPO / floor).rglob("*.py"):
            if path.is_relative_to(GENERATED):
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = _modules()


def _project_module(name: str) -> str | None:
    """The project module an imported name lives in (a package's own module for its attributes)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> set[str]:
    """The project modules `path` imports, anywhere in its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module}"
            assert node.module is not None
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = {_project_module(name) for name in names}
    return {module for module in found if module is not None} - {_name(path)}


def _name(path: Path) -> str:
    return next(name for name, known in MODULES.items() if known == path)


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def _floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def test_the_graph_is_read_from_the_real_tree() -> None:
    # the walk sees what is there: a tool that drives the services, a service that uses the core
    assert "gkt_tools.stack" in GRAPH and "services.gateway.server" in GRAPH and "gkt.jobs" in GRAPH
    assert "gkt.jobs" in GRAPH["services.gateway.service"]
    assert "gkt_tools.stack" in GRAPH["gkt_tools.demo"]
    assert "services.teacher.backends.local" in GRAPH["services.teacher.backends"]  # a deferred import


def test_no_module_imports_a_floor_above_its_own() -> None:
    upward = sorted(
        f"{module} imports {imported}"
        for module, imported_modules in GRAPH.items()
        for imported in imported_modules
        if _floor(imported) > _floor(module)
    )
    assert upward == [], "the core imports no service or tool, and the services import no tool"


def test_there_are_no_import_cycles() -> None:
    cycles = _cycles(GRAPH)
    assert cycles == [], f"modules that import each other: {cycles}"


def test_a_cycle_would_be_found() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found
