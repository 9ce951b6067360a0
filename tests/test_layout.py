"""The package's layout: no import cycle among adgen's modules; no module over 500 lines, no function over 100.

The graph is built from the source (AST), not by importing: every `import` / `from ... import` anywhere in
a module counts, at the top and inside functions alike (a function-level import is how a cycle usually
hides). Imports under `if TYPE_CHECKING:` are left out: they never run. An edge goes to the module that
is imported: `from adgen.data import records` -> adgen.data.records, `from adgen.data.records import X`
-> adgen.data.records, `from adgen.export import merge_adapter` -> adgen.export (its __init__).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "adgen"

# Cycles known and left for their owners: each entry is the exact set of modules of one strongly connected
# component, with why it is allowed, e.g. `frozenset({"adgen.a", "adgen.b"}): "issue N: ..."`. A new cycle, or a
# known one that grows, fails; so does an entry whose cycle is gone (remove the entry then). None today: issue 34
# broke the only one (adgen.data.records <-> adgen.data.sources, through adgen.data.errors).
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (packages by their __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes anywhere in `tree`, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """module -> the adgen modules it imports (top-level and function-level imports alike)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from .x import y / from .. import z
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from mod import name`, the module itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import adgen.x.y` of a name below a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(found)


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One import cycle through the component's first module: a -> b -> ... -> a."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    queue = [start]
    while queue:  # breadth first: the shortest way back to start
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if w not in parents:
                parents[w] = v
                queue.append(w)
    return component


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    path = cycle_path(graph, component)
    return " -> ".join(path) + (f" (component: {', '.join(component)})" if len(component) > len(set(path)) else "")


def test_no_import_cycle_in_adgen():
    graph = import_graph()
    assert "adgen.data.records" in graph and "adgen.cli" in graph, "the package was not found"
    found = cycles(graph)
    new = [c for c in found if frozenset(c) not in KNOWN_CYCLES]
    stale = [sorted(k) for k in KNOWN_CYCLES if list(sorted(k)) not in found]
    problems = [f"import cycle: {describe(graph, c)}" for c in new]
    problems += [f"KNOWN_CYCLES entry {', '.join(s)}: that cycle is gone (or changed): remove the entry" for s in stale]
    assert not problems, "\n".join(problems)


def test_the_cycle_check_finds_function_level_cycles(tmp_path):
    pkg = tmp_path / "adgen"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from adgen.data.b import x\n")
    (pkg / "data" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from adgen.data import c\n"
        "def x():\n    from . import a\n")
    (pkg / "data" / "c.py").write_text("from adgen.data.a import y\n")
    graph = import_graph(pkg)
    assert graph["adgen.data.b"] == {"adgen.data.a"}  # the TYPE_CHECKING import is not an edge
    found = cycles(graph)
    assert found == [["adgen.data.a", "adgen.data.b"]]
    assert describe(graph, found[0]) == "adgen.data.a -> adgen.data.b -> adgen.data.a"


# ---- sizes: a module holds one job, a function one step ----------------------------------------------------------
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100


def oversized(root: Path = PACKAGE_ROOT) -> list[str]:
    """`path: N lines` for every module over MAX_MODULE_LINES and `path:line name(): N lines` for every function
    (methods and nested functions included, from `def` to its last line) over MAX_FUNCTION_LINES."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root.parent)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES}: split it along its jobs)")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name}(): {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_no_module_over_500_lines_and_no_function_over_100():
    problems = oversized()
    assert not problems, "\n".join(problems)


def test_the_size_check_counts_modules_and_functions(tmp_path):
    pkg = tmp_path / "adgen"
    pkg.mkdir()
    (pkg / "small.py").write_text("def f():\n    return 1\n")
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # def + 100 lines: one too many
    (pkg / "long_function.py").write_text("class C:\n    def method(self):\n" + body)
    (pkg / "long_module.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert oversized(pkg) == [
        f"adgen/long_function.py:2 method(): {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})",
        f"adgen/long_module.py: {MAX_MODULE_LINES + 1} lines (at most {MAX_MODULE_LINES}: split it along its jobs)",
    ]
