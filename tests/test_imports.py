"""No module of ``src/director`` imports itself back through others: the import graph is a
tree of layers, not a knot (a cycle makes the import order matter, and a module impossible to
read or test without the whole circle).

Every import statement counts, at module level or inside a function (a lazy import is a cycle
deferred, not avoided), except those under ``if TYPE_CHECKING:``, which never run. The graph is
read from the source with ``ast``; strongly connected components (Tarjan) of more than one
module are the cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "src"


def modules_of(root: Path) -> dict[str, Path]:
    """Every module under ``root`` (a source directory), by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the nodes under an ``if TYPE_CHECKING:`` block."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                hidden.update(id(inner) for inner in ast.walk(statement))
    return hidden


def _imported_names(module: str, path: Path) -> Iterator[str]:
    """The dotted names an import of ``module`` may bring in (a module, or a name in one)."""
    tree = ast.parse(path.read_text(), str(path))
    hidden = _type_checking_only(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                yield f"{base}.{alias.name}"


def import_graph(root: Path, prefix: str) -> dict[str, set[str]]:
    """Module -> the modules of ``root`` it imports (only those whose name starts with
    ``prefix``): ``from a import b`` is an import of ``a.b`` when that is a module, else of
    ``a``."""
    modules = modules_of(root)
    graph: dict[str, set[str]] = {module: set() for module in modules if
                                  module.startswith(prefix)}
    for module in graph:
        for name in _imported_names(module, modules[module]):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name in graph:
                graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
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


def test_no_module_of_director_imports_itself_back() -> None:
    graph = import_graph(SOURCE, "director")
    assert len(graph) > 50  # the whole package was read
    assert "director.cli.base" in graph["director.cli.accounts"]  # and its imports
    assert cycles(graph) == [], "modules importing each other in a circle (runtime imports)"


def test_the_check_finds_a_cycle(tmp_path: Path) -> None:
    """A package with a cycle through a lazy import and a relative one, an import that only
    type checkers see, and an import of a name (not a module) from a package."""
    package = tmp_path / "pkg"
    package.mkdir()
    files = {
        "__init__.py": "VERSION = 1\n",
        "a.py": "from pkg import VERSION\nfrom pkg.b import thing\n",
        "b.py": "def thing():\n    from . import c\n",
        "c.py": "import pkg.a\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "e.py": "import pkg.d\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg", "pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
