"""The layering of the house: `dynface/` is the method library; `app/`, `flows/`, `tasks/` and `catalogs/`
sit on top of it. The library never imports upward (nor Prefect or Ray), and no module imports itself
back through a circle. Imports inside functions count too: they are arrows all the same."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from dynface.paths import REPO_ROOT

PACKAGES = ("dynface", "app", "flows", "tasks", "catalogs")
APPLICATION = ("app", "flows", "tasks", "catalogs", "prefect", "ray")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` counts a.b when that is a module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO_ROOT / pkg).rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 60  # the walk found the house
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_never_imports_the_application():
    upward = {}
    for name, path in ((n, p) for n, p in _library_files()):
        bad = sorted(m for m in _imports(path, name) if m.split(".")[0] in APPLICATION)
        if bad:
            upward[name] = bad
    assert upward == {}


def _library_files() -> list[tuple[str, Path]]:
    return [(_module_name(p), p) for p in sorted((REPO_ROOT / "dynface").rglob("*.py"))]


def test_restorer_imports_neither_prefect_nor_ray():
    code = (
        "import dynface.restorer, sys; "
        "up = ('prefect', 'ray', 'flows', 'tasks', 'app', 'catalogs'); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in up); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
