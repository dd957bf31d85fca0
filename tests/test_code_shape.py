"""The code stays readable in pieces: no module over 400 lines, no function over 50 (issue 16's
bar; ruff holds each function's branching to 10, C90). Migrations are generated, not read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    path
    for package in ("awx_ws", "config")
    for path in (ROOT / package).rglob("*.py")
    if "migrations" not in path.parts
)


def test_the_sources_are_found():
    assert len(SOURCES) > 50 and ROOT / "awx_ws" / "main" / "consumers.py" in SOURCES


def test_no_module_is_over_400_lines():
    long = {
        path.relative_to(ROOT).as_posix(): n
        for path in SOURCES
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_no_function_is_over_50_lines():
    long = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 50:
                    long[f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}"] = lines
    assert long == {}


def _imports() -> dict[str, set[str]]:
    """{module: the awx_ws modules it imports}, type-checking imports included."""
    modules = {}
    for path in (ROOT / "awx_ws").rglob("*.py"):
        if "migrations" not in path.parts:
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                # `from package import submodule` depends on the submodule only.
                subs = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                targets = subs | ({node.module} if len(subs) < len(node.names) else set())
            elif isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            else:
                continue
            graph[name] |= (targets & set(modules)) - {name}
    return graph


def test_no_import_cycle_not_even_in_type_hints():
    graph = _imports()
    assert "awx_ws.main.layers.redis_fanout" in graph["awx_ws.main.layers.redis"]
    cycles = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []
