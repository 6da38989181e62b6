"""The layout's rules, read from the code's own imports (AST, nothing is imported):
no import cycle between carapace's modules, QEMU behind the hypervisor interface, one
reader of config.json, modules of a readable size."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import carapace

PKG = Path(carapace.__file__).parent
SRC = PKG.parent
#: The most lines a hand-written module may have.
MAX_LINES = 500
#: The sandbox's lifecycle module stays small: its concerns have modules of their own.
MAX_SANDBOX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        if path.name.endswith("_pb2.py"):
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import, at any depth (a lazy import is a dependency too), except those
    under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            yield from (n for b in node.orelse for n in _imports_of(b))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def _imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _imports(node)


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The carapace modules ``module`` imports (a name imported from a package that is
    a submodule counts as that submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        out |= {n for n in names if n in known and n != module}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imported(m, p, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports() -> None:
    g = graph()
    assert "carapace.sandbox.plan" in g["carapace.sandbox.sandbox"]
    assert "carapace.hypervisor.qemu.vm" in g["carapace.hypervisor"]  # a lazy import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert found == [], f"import cycles: {found}"


def test_qemu_is_only_behind_the_hypervisor_interface() -> None:
    offenders = {
        m: sorted(d for d in deps if d.startswith("carapace.hypervisor.qemu"))
        for m, deps in graph().items()
        if not m.startswith("carapace.hypervisor")
    }
    assert {m: d for m, d in offenders.items() if d} == {}
    host_only = {"qemu", "qemu.qmp"}
    for m, path in modules().items():
        if m.startswith("carapace.hypervisor.qemu"):
            continue
        for node in _imports(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            assert not host_only & set(names), f"{m} imports QEMU's library"


def test_config_json_is_read_in_one_place() -> None:
    """On the host, the string config.json appears in code (not in docstrings) only
    where a bundle's files are read (carapace.oci.files, for Bundle.load and the shim
    binary's start and delete). (The guest writes the bundles it hands crun.)"""
    seen = []
    for m, path in modules().items():
        if m.startswith("carapace.guest."):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Constant)
                and isinstance(n.value, str)
                and n.value.strip("/").endswith("config.json")
                and id(n) not in docstrings
            ):
                seen.append(m)
    assert seen == ["carapace.oci.files"]


def test_modules_are_of_a_readable_size() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
    assert sizes["carapace.sandbox.sandbox"] < MAX_SANDBOX_LINES
