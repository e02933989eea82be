"""The package's import graph, read from the source: no cycle, no private name of another module,
no import of a higher stage (``shared/spec/LAYOUT.md``).

Every import counts, at the top of a module and inside a function (an import inside a function is
still an import: a cycle that needs one says that a piece belongs in a lower module); only those
under ``if TYPE_CHECKING:`` are free. ``from package import Name`` where the package's
``__init__`` maps names to modules for PEP 562 (``_EXPORTS`` / ``_LAZY``) is an import of the
module that defines the name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "samed_adapter"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# LAYOUT.md's order, lowest first; `version` (the version string) sits below everything.
STAGES = ["version", "volume", "io", "adapter_file", "hosts", "kernels", "surgery", "inference", "interactive", "core",
          "segment", "evaluation", "training", "hub", "dicomweb", "datastore", "learning", "serve",
          "cli"]
CORE = {"model", "resident", "patching", "convert"}
# The one run-time back-reference LAYOUT.md allows: SAMed's methods calling the patch operations
# that build it, patching's and resident adapters' (imported inside the methods, since both import
# what imports SAMed).
ALLOWED_LAZY = {("samed_adapter.model", "samed_adapter.patching"), ("samed_adapter.model", "samed_adapter.resident")}


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line``; ``lazy`` when inside a function."""

    source: str
    target: str
    line: int
    lazy: bool
    names: tuple[str, ...] = ()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def lazy_map(module: str) -> dict[str, str]:
    """A package's PEP 562 table: public name -> absolute module, from ``_EXPORTS`` / ``_LAZY``."""
    if module not in MODULES or not is_package(module):
        return {}
    for node in ast.parse(MODULES[module].read_text()).body:
        if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id in ("_EXPORTS", "_LAZY")
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))):
            return {k.value: f"{module}.{v.value}" for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def resolve_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class Imports(ast.NodeVisitor):
    """The edges of one module, and the names it binds to modules of the package."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.edges: list[Edge] = []
        self.module_aliases: dict[str, str] = {}
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, line: int, names: tuple[str, ...] = ()) -> None:
        if target.split(".")[0] == PACKAGE and target != self.module:
            self.edges.append(Edge(self.module, target, line, self.depth > 0, names))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name in MODULES:
                self._add(alias.name, node.lineno)
                if alias.asname:
                    self.module_aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = resolve_from(self.module, node)
        if base.split(".")[0] != PACKAGE:
            return
        lazy = lazy_map(base)
        plain: list[str] = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:
                self._add(sub, node.lineno)
                self.module_aliases[alias.asname or alias.name] = sub
            elif alias.name in lazy:
                self._add(lazy[alias.name], node.lineno, (alias.name,))
            else:
                plain.append(alias.name)
        if plain:
            self._add(base, node.lineno, tuple(plain))


def collect() -> tuple[list[Edge], dict[str, dict[str, str]], dict[str, ast.Module]]:
    edges: list[Edge] = []
    aliases: dict[str, dict[str, str]] = {}
    trees: dict[str, ast.Module] = {}
    for module, path in MODULES.items():
        trees[module] = tree = ast.parse(path.read_text(), filename=str(path))
        visitor = Imports(module)
        visitor.visit(tree)
        edges += visitor.edges
        aliases[module] = visitor.module_aliases
    return edges, aliases, trees


EDGES, ALIASES, TREES = collect()


def run_time_edges() -> list[Edge]:
    return [e for e in EDGES if not (e.lazy and (e.source, e.target) in ALLOWED_LAZY)]


def show(edge: Edge) -> str:
    short = lambda m: m[len(PACKAGE) + 1:] or PACKAGE  # noqa: E731
    how = " (inside a function)" if edge.lazy else ""
    names = f" [{', '.join(edge.names)}]" if edge.names else ""
    return f"{short(edge.source)} -> {short(edge.target)}{names} at line {edge.line}{how}"


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def stage(module: str) -> str:
    """The stage folder of a module: its first part under the package (core for the API core)."""
    parts = module.split(".")[1:]
    if not parts:
        return "api"
    return "core" if parts[0] in CORE else parts[0]


def upward(edge: Edge) -> bool:
    source, target = stage(edge.source), stage(edge.target)
    if source in ("api", "testing"):
        return False  # the public API re-exports every stage; testing/ may import anything
    if target == "testing":
        return source != "cli"
    if target == "api":
        # samed_adapter/__init__.py re-exports stages up to dicomweb/: only the command line is above it.
        return source != "cli"
    return STAGES.index(source) < STAGES.index(target)


def test_the_graph_sees_imports_at_the_top_inside_functions_and_through_pep_562():
    """The walk is not empty-handed: known edges of each kind are there, type-only ones are not."""
    pairs = {(e.source, e.target, e.lazy) for e in EDGES}
    assert ("samed_adapter.patching", "samed_adapter.model", False) in pairs
    assert ("samed_adapter.model", "samed_adapter.patching", True) in pairs
    # `from .. import AdapterConfig` in testing/cli.py goes through samed_adapter/__init__.py's table.
    assert ("samed_adapter.testing.cli", "samed_adapter.adapter_file.config", True) in pairs
    # model.py imports io's Volume under TYPE_CHECKING at the top: that one is free.
    assert not any(e.source == "samed_adapter.model" and not e.lazy and e.target.startswith("samed_adapter.io")
                   for e in EDGES)


def test_no_import_cycle():
    found = cycles(run_time_edges())
    lines = []
    for component in found:
        members = set(component)
        lines.append("cycle: " + ", ".join(m[len(PACKAGE) + 1:] for m in component))
        lines += ["    " + show(e) for e in run_time_edges() if e.source in members and e.target in members]
    assert not found, "import cycles (run-time imports, lazy ones included):\n" + "\n".join(lines)


def test_no_module_imports_a_higher_stage():
    bad = [show(e) for e in EDGES if upward(e)]
    assert not bad, f"imports of a higher stage ({' < '.join(STAGES)}):\n" + "\n".join(bad)


def private_uses() -> list[str]:
    """``from X import _name`` and ``x._name`` (x a module of the package) across modules."""
    bad = [show(e) for e in EDGES
           if any(n.startswith("_") and not n.startswith("__") for n in e.names)]
    for module, tree in TREES.items():
        aliases = ALIASES[module]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != module
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{module[len(PACKAGE) + 1:]} uses {aliases[node.value.id]}.{node.attr} "
                           f"at line {node.lineno}")
    return bad


def test_no_module_uses_another_modules_private_name():
    bad = private_uses()
    assert not bad, "private names of another module (give them a public name in the lower one):\n" + "\n".join(bad)


def test_every_folder_is_a_stage_of_layout_md():
    folders = sorted(m for m in MODULES if m.count(".") == 1 and is_package(m))
    unknown = [m for m in folders if stage(m) not in (*STAGES, "testing")]
    assert folders and not unknown, f"folders in no stage of LAYOUT.md: {unknown}"
