"""No import cycles in the package, counting every import: those made only for type
checking (``if TYPE_CHECKING:``) and those inside functions included.

A cycle that only type checking or a deferred import keeps from failing at run time is
still two modules that cannot be understood, tested or changed one without the other.
The checker reads the sources (``ast``), maps folders to import names as
``pyproject.toml``'s ``[tool.setuptools.package-dir]`` does, and finds the strongly
connected components of the import graph. It counts the imports a file writes; the
implicit import of a package's ``__init__`` by its submodules is not an edge.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def package_dirs(root: Path) -> dict[str, Path]:
    """Import name -> folder, from ``pyproject.toml``."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: root / folder for name, folder in mapping.items()}


def modules(dirs: Mapping[str, Path]) -> dict[str, Path]:
    """Every module's import name -> its file (a package is its ``__init__.py``)."""
    out: dict[str, Path] = {}
    roots = {path.resolve() for path in dirs.values()}
    for name, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            # A folder mapped to its own import name is not also a subpackage here.
            if any((folder / p).resolve() in roots - {folder.resolve()} for p in parts[:1]):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterable[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                yield alias.name
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join([*here, *([node.module] if node.module else [])])
        for alias in node.names:
            full = f"{base}.{alias.name}"
            if full in known:
                yield full
            elif base in known:
                yield base


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file."""
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        targets = {t for node in ast.walk(tree) for t in _imported(node, module, is_package, known)}
        graph[module] = targets - {module}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = counter
                    counter += 1
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
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
    return sorted(found)


def test_the_package_has_no_import_cycles() -> None:
    """No module imports, even for type checking or inside a function, a module that
    imports it back (directly or through others)."""
    graph = import_graph(modules(package_dirs(ROOT)))
    assert len(graph) > 100, "the checker found the package's modules"
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_finds_cycles_hidden_behind_type_checking_and_functions(
    tmp_path: Path,
) -> None:
    """A cycle closed by an import under ``TYPE_CHECKING`` and one closed by an import
    inside a function are both found; an acyclic chain is not reported."""
    pkg = tmp_path / "pkg"
    sub = tmp_path / "sub"
    pkg.mkdir()
    sub.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n"
    )
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("def f():\n    import pkg.c\n")
    (pkg / "e.py").write_text("import pkg.a\n")
    (sub / "__init__.py").write_text("")
    (sub / "x.py").write_text("from pkg.sub import y\n")
    (sub / "y.py").write_text("")
    files = modules({"pkg": pkg, "pkg.sub": sub})
    assert "pkg.sub.x" in files
    assert cycles(import_graph(files)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
