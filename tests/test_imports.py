"""Every import inside agcl_ds points down the pipeline: no module reaches, even for a type hint or
inside a function, a module that (directly or not) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package's own modules it imports, read from the source (top level, functions
    and `if TYPE_CHECKING:` blocks alike); `from pkg import mod` counts as importing `pkg.mod`."""
    pkg = package_dir.name
    files = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.split(".")[0] == pkg)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.split(".")[0] == pkg:
                    deps.update(owner(f"{base}.{a.name}") for a in node.names)
        deps.discard(None)
        deps.discard(name)
        graph[name] = {d for d in deps if d is not None}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
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

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_agcl_ds():
    graph = module_graph(ROOT / "agcl_ds")
    assert "agcl_ds.loop" in graph and "agcl_ds.methods.base" in graph  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_type_hint_and_function_imports(tmp_path):
    """The circles this test guards against were a TYPE_CHECKING import and an import inside a function."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import X\n")
    (pkg / "high.py").write_text("def f():\n    from .sub import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from .. import low\n")
    graph = module_graph(pkg)
    assert graph["pkg.high"] == {"pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.low"}
    assert find_cycle(graph) == ["pkg.high", "pkg.sub.leaf", "pkg.low", "pkg.high"]
    (pkg / "low.py").write_text("X = 1\n")
    assert find_cycle(module_graph(pkg)) is None
