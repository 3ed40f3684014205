"""The package keeps its layers: no import circle among jobcage's modules, and no
module grown past what one responsibility needs (TEAM rules: ~500 lines)."""

from __future__ import annotations

import ast
import pathlib

import jobcage

ROOT = pathlib.Path(jobcage.__file__).parent
MAX_LINES = 520
# Known and open (each line removed by whoever splits that module):
TOO_LONG_FOR_NOW: set[str] = set()


def _modules() -> dict[str, tuple[pathlib.Path, list[str]]]:
    """module name -> (file, the package its relative imports start from)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["jobcage", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def _graph() -> dict[str, set[str]]:
    """Every import, at any depth (type-only and late imports count: a circle hidden
    in a function is still a circle)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    for candidate in (f"{target}.{alias.name}", target):
                        if candidate in modules:
                            deps.add(candidate)
                            break
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_jobcage_modules():
    graph = _graph()
    assert "jobcage.network.cage" in graph  # the walk saw the package
    assert _cycles(graph) == []


def test_no_module_over_the_line_limit():
    lines = {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, (path, _) in _modules().items()
    }
    too_long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert {k: v for k, v in too_long.items() if k not in TOO_LONG_FOR_NOW} == {}
