"""Imports inside `gateway/` run one way: no module imports, even through others, one that
imports it back (ARCHITECTURE.md, "One direction").

Every import statement counts, wherever it stands: inside a function (the usual way a cycle
gets hidden) and under `TYPE_CHECKING` too. An annotation-only import never runs, but a
cycle through one still means two modules each need the other, which is what the direction
forbids; none is needed today.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

PACKAGE = Path(gateway.__file__).parent


def module_name(package: Path, path: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement may load, absolute."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        if path.name != "__init__.py":
            base = base[:-1]  # relative to the module's package
        base = base[:len(base) - node.level + 1]
        origin = ".".join([*base, node.module] if node.module else base)
    else:
        origin = node.module or ""
    # `from a import b` loads `a`, and `a.b` when b is a submodule.
    return [origin, *(f"{origin}.{alias.name}" for alias in node.names)]


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """Each module of the package: the package's modules it imports, with a line doing so."""
    paths = {module_name(package, p): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {m: {} for m in paths}
    for module, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported(module, path, node):
                # `gateway.store.Store` is the module `gateway.store`; a name outside the
                # package ends up empty.
                while name and name not in paths:
                    name = name.rpartition(".")[0]
                # A package's module importing its own package is Python loading it first.
                if name and name != module and not module.startswith(name + "."):
                    graph[module].setdefault(name, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def describe(graph: dict[str, dict[str, int]], group: list[str]) -> str:
    members = set(group)
    lines = [f"import cycle of {len(group)} modules:"]
    for module in group:
        lines += [f"  {module} (line {line}) imports {other}"
                  for other, line in sorted(graph[module].items()) if other in members]
    return "\n".join(lines)


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    found = cycles(graph)
    assert not found, "\n".join(describe(graph, group) for group in found)


def test_a_cycle_is_found_and_named() -> None:
    # Through a third module, and hidden in a function, as the package's own cycle was.
    graph = {"a": {"b": 3}, "b": {"c": 7}, "c": {"a": 12}, "d": {"a": 1}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert describe(graph, ["a", "b", "c"]).splitlines() == [
        "import cycle of 3 modules:",
        "  a (line 3) imports b",
        "  b (line 7) imports c",
        "  c (line 12) imports a",
    ]


def test_imports_in_functions_relative_ones_and_submodules_count(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.low import thing\n")
    (package / "sub" / "low.py").write_text("def late():\n    from .. import top\n")
    (package / "top.py").write_text("import os\n\nfrom pkg import sub\n")
    graph = import_graph(package)
    assert graph == {"pkg": {}, "pkg.sub": {"pkg.sub.low": 1}, "pkg.sub.low": {"pkg.top": 2},
                     "pkg.top": {"pkg.sub": 3}}
    assert cycles(graph) == [["pkg.sub", "pkg.sub.low", "pkg.top"]]
