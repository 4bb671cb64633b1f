"""The project's import structure, read statically (ast, no module is imported): no import
circle among the project's modules, function-local imports included (they hide circles), and
no function-local import of a standard-library module (those only defer heavy packages)."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kiln

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("artifacts", "pipeline", "runtime_loader", "kiln")
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset()  # none left
LOCAL_STDLIB_PENDING: frozenset[str] = frozenset()  # none left


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    local: bool  # inside a function body


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if "migrations" in parts:
                continue  # Alembic loads these by path
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import that runs (not under `if TYPE_CHECKING:`), with whether it is local."""

    def walk(node: ast.AST, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk(sub, local)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def _resolve(module: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if known[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".strip(".")
        names = [f"{base}.{alias.name}" for alias in node.names]
        if not all(name in known for name in names):  # `from pkg import submodule` needs
            names.append(base)  # the submodule, not the package's own namespace
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph() -> dict[str, list[Edge]]:
    known = module_files()
    graph: dict[str, list[Edge]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = graph.setdefault(module, [])
        for node, local in _imports(tree):
            for target in dict.fromkeys(_resolve(module, node, known)):
                if target != module:
                    edges.append(Edge(target, node.lineno, local))
    return graph


def cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph.get(node, []):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_function_local_imports() -> None:
    """The checker itself: the lazily imported commands and a known local import are edges."""
    graph = import_graph()
    assert {"artifacts.errors", "artifacts.redact"} <= {e.target for e in graph["kiln.cli"]}
    local = {e.target for e in graph["pipeline.spec"] if e.local}
    assert "pipeline.compile_budget" in local  # it imports SQLAlchemy: deferred on purpose
    assert cycles({"a": [Edge("b", 1, True)], "b": [Edge("a", 1, False)], "c": []}) == [["a", "b"]]


def test_no_import_circle_among_the_projects_modules() -> None:
    found = [c for c in cycles(import_graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert found == []


def test_no_function_local_import_of_a_stdlib_module() -> None:
    offenders = []
    for path in module_files().values():
        rel = path.relative_to(REPO).as_posix()
        if rel in LOCAL_STDLIB_PENDING:
            continue
        for node, local in _imports(ast.parse(path.read_text(), str(path))):
            if not local or (isinstance(node, ast.ImportFrom) and node.level):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                if name and name.partition(".")[0] in sys.stdlib_module_names:
                    offenders.append(f"{rel}:{node.lineno}: {name}")
    assert offenders == []


def test_no_package_imports_the_root_cli_package() -> None:
    """`kiln` sits on top: artifacts/, pipeline/ and runtime_loader/ never import it (the
    release's recorded Kiln version comes from the installed package's metadata)."""
    upward = [
        f"{module} -> {edge.target}"
        for module, edges in import_graph().items()
        if not module.startswith("kiln")
        for edge in edges
        if edge.target == "kiln" or edge.target.startswith("kiln.")
    ]
    assert upward == []
    assert importlib.metadata.version("kiln") == kiln.__version__


def test_packages_import_only_downward() -> None:
    """pipeline -> artifacts <- runtime_loader: the store imports neither side, and the
    deploy side never imports the build side (deferred imports included)."""
    forbidden = {"artifacts": ("pipeline", "runtime_loader"), "runtime_loader": ("pipeline",)}
    wrong = [
        f"{module} -> {edge.target}"
        for module, edges in import_graph().items()
        for edge in edges
        if edge.target.split(".")[0] in forbidden.get(module.split(".")[0], ())
    ]
    assert wrong == []
