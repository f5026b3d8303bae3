"""No import cycle between the project's modules, lazy or not, read from the source with `ast`.

An import inside a function (a lazy import) runs after the modules involved have loaded, so it
cannot fail at import time; it is still a dependency, and one that closes a cycle hides that two
modules need each other. So lazy imports count as edges like module-level ones; cycle messages
mark them "in a function". There is no allowed exception today. Imports under
`if TYPE_CHECKING:` never run and are skipped. The package facade
`evictkit/__init__.py` importing its submodules is its job; a submodule importing the facade at
module level (`import evictkit`, `from evictkit import compress`) is an upward import and counts
as an edge to `evictkit`, so it shows up as a cycle. Importing a submodule implicitly runs its
parents' `__init__`; those implicit edges are not counted, or every package would be a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: package name -> folder, as pyproject.toml's [tool.setuptools] package-dir maps them
PACKAGE_DIRS = {
    "evictkit": ROOT / "evictkit",
    "evictkit.plugins": ROOT / "plugins",
    "evictkit.kernels": ROOT / "kernels",
    "evictkit.specs": ROOT / "specs",
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (one of ours) or top-level distribution name (external)
    path: Path
    line: int
    lazy: bool  # inside a function body

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def discover(package_dirs: Mapping[str, Path] = PACKAGE_DIRS) -> dict[str, Path]:
    """Module name -> file, for every .py under the package folders."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, path: Path, modules: Mapping[str, Path]) -> None:
        self.name, self.path, self.modules = name, path, modules
        self.is_package = path.name == "__init__.py"
        self.depth = 0  # function nesting
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        self.found.append(Import(self.name, target, self.path, node.lineno, self.depth > 0))

    def _resolve(self, dotted: str) -> str:
        """Our longest module that `dotted` names, or its top-level name when it is not ours."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.modules:
                return ".".join(parts[:n])
        return parts[0]

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: only its else branch does
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(self._resolve(alias.name), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.name.split(".")
            if not self.is_package:
                base.pop()
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module == "__future__":
            return
        for alias in node.names:
            # `from pkg import sub` imports the submodule; `from pkg import name` runs pkg/__init__
            sub = f"{module}.{alias.name}"
            self._add(sub if sub in self.modules else self._resolve(module), node)


def collect(modules: Mapping[str, Path]) -> list[Import]:
    """Every import statement in `modules`, resolved."""
    out: list[Import] = []
    for name, path in modules.items():
        c = _Collector(name, path, modules)
        c.visit(ast.parse(path.read_text(), filename=str(path)))
        out += c.found
    return out


def cycles(edges: Iterable[Import]) -> list[list[Import]]:
    """One cycle (as the imports that form it) per strongly connected component of the graph."""
    graph: dict[str, dict[str, Import]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, {}).setdefault(e.target, e)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    components.append(sorted(comp))
    found = []
    for comp in components:
        members = set(comp)
        # the shortest way back to the component's first module: a readable cycle to name
        start = comp[0]
        paths: dict[str, list[Import]] = {start: []}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            node = queue.pop(0)
            for target, e in sorted(graph.get(node, {}).items()):
                if target == start:
                    cycle = paths[node] + [e]
                    break
                if target in members and target not in paths:
                    paths[target] = paths[node] + [e]
                    queue.append(target)
        assert cycle is not None
        found.append(cycle)
    return found


def describe(cycle: list[Import]) -> str:
    return cycle[0].source + "".join(
        f" -> {e.target} ({e.where()}{', in a function' if e.lazy else ''})" for e in cycle
    )


def _ours(edges: Iterable[Import], modules: Mapping[str, Path]) -> list[Import]:
    """The imports between project modules, module-level and lazy alike."""
    return [e for e in edges if e.target in modules]


def test_no_import_cycle() -> None:
    modules = discover()
    edges = collect(modules)
    assert len(modules) > 40 and "evictkit.eval.report" in modules and "evictkit.plugins.restkv" in modules
    # one line per (importer, imported, line): `from m import a, b` is one import here
    lazy = list(dict.fromkeys(e for e in edges if e.lazy and e.target in modules and e.source != e.target))
    print(f"\n{len(lazy)} lazy imports between project modules (inside functions; counted):")
    for e in lazy:
        print(f"  {e.source} -> {e.target} ({e.where()})")
    found = cycles(_ours(edges, modules))
    assert not found, "import cycles:\n" + "\n".join("  " + describe(c) for c in found)


def _closure(start: str, edges: Iterable[Import], modules: Mapping[str, Path]) -> dict[str, list[Import]]:
    """Every name (ours or external) that importing `start` reaches at module level, with the
    chain of imports that gets there (parents' __init__ not followed, as in the graph above)."""
    out: dict[str, list[Import]] = {start: []}
    by_source: dict[str, list[Import]] = {}
    for e in edges:
        if not e.lazy:
            by_source.setdefault(e.source, []).append(e)
    queue = [start]
    while queue:
        node = queue.pop(0)
        for e in by_source.get(node, []):
            if e.target not in out:
                out[e.target] = out[node] + [e]
                if e.target in modules:
                    queue.append(e.target)
    return out


def test_eval_report_needs_no_torch() -> None:
    """Writing a summary from results.jsonl is plain Python: neither the report nor anything it
    imports at module level imports torch (or the runner)."""
    modules = discover()
    reach = _closure("evictkit.eval.report", collect(modules), modules)
    for unwanted in ("torch", "evictkit.eval.runner", "evictkit"):
        assert unwanted not in reach, f"evictkit.eval.report imports {unwanted}: {describe(reach[unwanted])}"
    # and at run time: with the parent packages stubbed (evictkit/__init__ imports torch-heavy
    # modules by design), importing the report loads no torch
    stubs = [("evictkit", str(ROOT / "evictkit")), ("evictkit.eval", str(ROOT / "evictkit" / "eval"))]
    code = textwrap.dedent(f"""
        import sys, types
        for name, folder in {stubs!r}:
            stub = types.ModuleType(name)
            stub.__path__ = [folder]
            sys.modules[name] = stub
        import evictkit.eval.report
        assert "torch" not in sys.modules, "importing evictkit.eval.report loaded torch"
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_walk_finds_cycles_lazy_ones_included(tmp_path: Path) -> None:
    """The checker itself: an upward import of the facade, a relative cycle, a cycle closed by a
    lazy import, and an import under TYPE_CHECKING (skipped)."""
    pkg = tmp_path / "evictkit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from evictkit.a import f\n")
    (pkg / "a.py").write_text("import evictkit\n\ndef f():\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from . import c\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evictkit import a\n"
    )
    (pkg / "sub" / "c.py").write_text("from .b import x\nfrom ..a import f\n")
    (pkg / "x.py").write_text("def g():\n    from evictkit import y\n")
    (pkg / "y.py").write_text("from evictkit.x import g\n")
    modules = discover({"evictkit": pkg})
    global ROOT
    saved, ROOT = ROOT, tmp_path  # Import.where() paths relative to the fake tree
    try:
        edges = collect(modules)
        found = sorted(describe(c) for c in cycles(_ours(edges, modules)))
    finally:
        ROOT = saved
    assert found == [
        "evictkit -> evictkit.a (evictkit/__init__.py:1) -> evictkit (evictkit/a.py:1)",
        "evictkit.sub.b -> evictkit.sub.c (evictkit/sub/b.py:1) -> evictkit.sub.b (evictkit/sub/c.py:1)",
        "evictkit.x -> evictkit.y (evictkit/x.py:2, in a function) -> evictkit.x (evictkit/y.py:1)",
    ]
    assert [(e.source, e.target) for e in edges if e.lazy] == [("evictkit.x", "evictkit.y")]
