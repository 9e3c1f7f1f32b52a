"""memlm has no import cycles: the graph of `memlm.*` imports between its modules (function-level
imports included, since they run too) must be acyclic.

A module importing its own ancestor package (`from memlm.entrypoints.cli import args` inside
`memlm.entrypoints.cli.generate`) is not an edge to that package's `__init__`: Python initializes
the package before the submodule, so that pattern never deadlocks on a half-built module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import memlm

ROOT = Path(memlm.__file__).parent


def module_files(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the memlm modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t in mods and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}      # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_memlm_has_no_import_cycles():
    graph = import_graph(module_files())
    assert "memlm.engine.request" in graph["memlm.entrypoints.processing"]     # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_engine_does_not_import_entrypoints():
    graph = import_graph(module_files())
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("memlm.engine.")
                 for t in ts if t.startswith("memlm.entrypoints"))
    assert not bad


def test_the_checker_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "memlm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from memlm.sub import a\n")
    (pkg / "sub" / "a.py").write_text("from memlm.sub import b\nfrom memlm import sub\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .a import x\n")
    graph = import_graph(module_files(pkg))
    assert find_cycle(graph) == ["memlm.sub.a", "memlm.sub.b", "memlm.sub.a"]
