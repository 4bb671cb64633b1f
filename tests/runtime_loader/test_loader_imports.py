"""The loader's own imports: no circle between its modules, and a function-local import only
where it keeps something heavy (numpy, jaxlib, SQLAlchemy, ...) out of an import that must
stay fast, never a standard-library or light in-package module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "runtime_loader"
LIGHT = (
    "runtime_loader.errors",
    "artifacts.digest",
    "artifacts.errors",
    "artifacts.refs",
    "artifacts.progress",
    "artifacts.table",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    # `from runtime_loader import inputs` imports the submodule runtime_loader.inputs.
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _imports(tree: ast.Module) -> tuple[set[str], list[tuple[int, list[str]]]]:
    """(every module imported anywhere, (line, modules) of each function-local import)."""
    every: set[str] = set()
    local: list[tuple[int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            every.update(_imported(node))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    local.append((inner.lineno, _imported(inner)))
    return every, local


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_circle_between_loader_modules() -> None:
    """Function-local imports count: deferring one half of a circle does not remove it."""
    sources = _sources()
    # A package's __init__ runs before its submodules whatever they import from it.
    packages = {n for n in sources if (PACKAGE.parent / n.replace(".", "/")).is_dir()}
    edges = {
        name: {m for m in _imports(tree)[0] if m in sources and m != name and m not in packages}
        for name, tree in sources.items()
    }

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(edges[name]):
            if dep in path:
                raise AssertionError("import circle: " + " -> ".join([*path, dep]))
            visit(dep, [*path, dep])

    for name in sorted(sources):
        visit(name, [name])


def test_function_local_imports_defer_only_heavy_modules() -> None:
    found = []
    for name, tree in _sources().items():
        for line, (module, *_) in _imports(tree)[1]:
            if module.split(".")[0] in sys.stdlib_module_names or module in LIGHT:
                found.append(f"{name}:{line} imports {module}")
    assert not found, found
