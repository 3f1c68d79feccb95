"""The package's layering, read from the source: who may import what (docs/design.md).

Every import counts: at the top of a module, inside a function (deferred) and under
``if TYPE_CHECKING:``. Only importable modules are read (directories with an
``__init__.py``): ``dask_hetzner/scripts/`` holds files copied to the servers, not modules.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import dask_hetzner

PACKAGE = "dask_hetzner"
ROOT = Path(dask_hetzner.__file__).parent
DESIGN = ROOT.parent / "docs" / "design.md"

SDK_ADAPTER = "dask_hetzner.cloud.sdk"  # the only module that imports hcloud
SSH_PACKAGE = "dask_hetzner.remote"  # its modules are the only production code that imports asyncssh
SIM = "dask_hetzner.sim"
# Production code never imports the simulator, except the two verbs that run it: the CLI's
# `sim` (its click group is loaded on demand) and `demo` (cli's `demo` command imports
# demo.py lazily, whose `run` starts a Simulator). Both import it inside the function, so
# importing the CLI or the package never loads the simulator. (module, enclosing function)
SIM_ALLOWED = {
    ("dask_hetzner.cli", "_Group.get_command"),
    ("dask_hetzner.demo", "run"),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: Path
    line: int
    where: str  # enclosing function/class ("Class.method"), "" at module level
    text: str  # the statement as written
    targets: tuple[str, ...]  # absolute names of what it imports (modules, as far as known)

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT.parent)}:{self.line} `{self.text}`"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        # A directory without __init__.py (scripts/) is not part of the importable package.
        if all((d / "__init__.py").exists() for d in path.parents if d.is_relative_to(ROOT)):
            files[_module_name(path)] = path
    return files


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base.pop()  # relative to the module's package
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, source: str) -> None:
        self.module, self.path, self.source = module, path, source
        self.scope: list[str] = []
        self.found: list[Import] = []

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _add(self, node: ast.Import | ast.ImportFrom, targets: list[str]) -> None:
        text = " ".join((ast.get_source_segment(self.source, node) or "").split())
        where = ".".join(self.scope)
        self.found.append(Import(self.module, self.path, node.lineno, where, text, tuple(targets)))

    def visit_Import(self, node: ast.Import) -> None:
        self._add(node, [alias.name for alias in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, node)
        submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        if node.module is None:
            # `from . import x`: the submodule x; a name that is no submodule is the package's.
            others = len(submodules) < len(node.names)
            self._add(node, submodules + ([base] if others else []))
        else:
            # `from .pkg import name`: pkg, and pkg.name too when that is a submodule.
            self._add(node, [base, *submodules])


def _imports() -> list[Import]:
    found = []
    for module, path in MODULES.items():
        source = path.read_text()
        collector = _Collector(module, path, source)
        collector.visit(ast.parse(source, str(path)))
        found += collector.found
    return found


IMPORTS = _imports()


def _production(module: str) -> bool:
    return module != SIM and not module.startswith(SIM + ".")


def _imports_of(top: str) -> list[Import]:
    """Production imports of the top-level package ``top`` (or its submodules)."""
    return [
        imp
        for imp in IMPORTS
        if _production(imp.module) and any(t == top or t.startswith(top + ".") for t in imp.targets)
    ]


def test_only_the_sdk_adapter_imports_hcloud() -> None:
    wrong = [str(imp) for imp in _imports_of("hcloud") if imp.module != SDK_ADAPTER]
    assert not wrong, f"only {SDK_ADAPTER} may import hcloud; also imported by: " + "; ".join(wrong)


def test_only_remote_imports_asyncssh() -> None:
    wrong = [
        str(imp)
        for imp in _imports_of("asyncssh")
        if imp.module != SSH_PACKAGE and not imp.module.startswith(SSH_PACKAGE + ".")
    ]
    assert not wrong, (
        f"only the modules of the {SSH_PACKAGE} package may import asyncssh; also imported by: "
        + "; ".join(wrong)
    )


def test_production_code_never_imports_the_simulator() -> None:
    wrong = [
        f"{imp} (in {imp.module}{'.' + imp.where if imp.where else ' at module level'})"
        for imp in _imports_of(SIM)
        if (imp.module, imp.where) not in SIM_ALLOWED
    ]
    assert not wrong, (
        f"production code imports the simulator outside {sorted(SIM_ALLOWED)}: " + "; ".join(wrong)
    )
    stale = SIM_ALLOWED - {(imp.module, imp.where) for imp in _imports_of(SIM)}
    assert not stale, f"SIM_ALLOWED names places that no longer import the simulator: {sorted(stale)}"


def _graph() -> dict[str, dict[str, Import]]:
    """module -> {imported module of the package: the first import that says so}.

    An import of one's own parent package (``from .. import __version__``) is no edge:
    Python imports a module's parent packages before the module anyway, so such an edge
    would close a "cycle" with every import of the parent's ``__init__``.
    """
    graph: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for imp in IMPORTS:
        for target in imp.targets:
            if target in MODULES and target != imp.module and not imp.module.startswith(target + "."):
                graph[imp.module].setdefault(target, imp)
    return graph


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of the graph (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return [_path_back(graph, sorted(c)[0], set(c)) for c in components]


def _path_back(graph: dict[str, dict[str, Import]], start: str, within: set[str]) -> list[str]:
    """A shortest closed path start -> ... -> start inside one component (breadth first)."""
    came: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [start, v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return path[::-1] if v != start else [start, start]
                if w in within and w not in came:
                    came[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    described = [
        " -> ".join(cycle) + "\n      " + "\n      ".join(
            str(graph[a][b]) for a, b in zip(cycle, cycle[1:], strict=False)
        )
        for cycle in cycles
    ]
    assert not cycles, "import cycles (deferred and type-only imports count):\n  " + "\n  ".join(
        described
    )


def _documented() -> set[str]:
    """Paths named (in backquotes) in the first cell of the module table's rows."""
    named = set()
    for line in DESIGN.read_text().splitlines():
        if line.startswith("|") and line.count("|") >= 3:
            first = line.split("|")[1]
            named.update(re.findall(r"`([^`]+)`", first))
    return named


def test_every_module_is_in_the_design_table() -> None:
    named = _documented()
    missing = []
    for module, path in MODULES.items():
        relative = path.relative_to(ROOT.parent).as_posix()
        # The simulator has its own section in design.md; the table names it as a whole.
        if not _production(module) and f"{PACKAGE}/sim/" in named:
            continue
        if relative not in named:
            missing.append(relative)
    assert not missing, f"modules without a row in {DESIGN.name}'s module table: " + ", ".join(
        missing
    )
