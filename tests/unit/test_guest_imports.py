"""The code that runs inside the guest imports only the stdlib, protobuf and itself.

The guest image carries Debian's CPython with just the stdlib modules the agent
imports, plus google.protobuf; anything else (qemu.qmp, pyroute2, the host side of
carapace) is not there, so an import of it would kill PID 1.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import google.protobuf
import pytest

import carapace
from carapace.guest import SHIPPED
from carapace.image.builder import shipped_files

PKG = Path(carapace.__file__).parent
SRC = PKG.parent
GUEST_PYTHON = "/usr/bin/python3.11"


def shipped_names(shipped: tuple[str, ...] = SHIPPED) -> tuple[set[str], tuple[str, ...]]:
    """(modules, packages) named by ``SHIPPED``: ``guest/`` is the package carapace.guest
    with everything under it, ``linux.py`` the module carapace.linux."""
    modules: set[str] = set()
    packages: list[str] = []
    for rel in shipped:
        parts = ["carapace", *Path(rel).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        modules.add(name)
        if rel.endswith("/"):
            packages.append(name)
    return modules, tuple(packages)


#: carapace modules (and packages, with everything under them) the guest may import:
#: what goes into the guest image (carapace.guest.SHIPPED), nothing else.
ALLOWED_MODULES, ALLOWED_PACKAGES = shipped_names()
#: Host-only modules; also checked at run time.
FORBIDDEN = (
    "qemu",
    "pyroute2",
    "carapace.sandbox",
    "carapace.hypervisor",
    "carapace.agent",
    "carapace.cli",
    "carapace.api",
    "carapace.image",
    "carapace.config",
    "carapace.oci",
)


def guest_files() -> list[Path]:
    """The carapace files the image builder puts into the guest."""
    return list(shipped_files().values())


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, this: str | None = None) -> list[tuple[int, str, str | None]]:
    """(line, imported module, enclosing function) of every import that can run,
    skipping ``if TYPE_CHECKING:`` blocks. ``from a import b`` yields a.b if that
    names a carapace module, else a. ``this`` is the file's module name."""
    tree = ast.parse(path.read_text(), str(path))
    this = this or module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: list[tuple[int, str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for stmt in node.orelse:
                visit(stmt, func)
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node.name
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, func))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = base.startswith("carapace") and (
                    (SRC / sub.replace(".", "/")).with_suffix(".py").exists()
                    or (SRC / sub.replace(".", "/")).is_dir()
                )
                out.append((node.lineno, sub if is_module else base, func))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, None)
    return out


def allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names:
        return True
    if module == "google.protobuf" or module.startswith("google.protobuf."):
        return True
    if module in ALLOWED_MODULES:
        return True
    return any(module.startswith(p + ".") for p in ALLOWED_PACKAGES)


def test_guest_file_list_is_complete() -> None:
    names = {module_name(p) for p in guest_files()}
    assert {"carapace", "carapace.guest.agent", "carapace.guest.server", "carapace.guest.reaper",
            "carapace.ttrpc.server", "carapace.protocols.agent_pb2",
            "carapace.protocols.contract", "carapace.linux"} <= names  # fmt: skip


def test_allowed_modules_come_from_shipped() -> None:
    assert {
        "carapace", "carapace.errors", "carapace.linux",
        "carapace.guest", "carapace.ttrpc", "carapace.protocols",
    } == ALLOWED_MODULES  # fmt: skip
    assert ALLOWED_PACKAGES == ("carapace.guest", "carapace.ttrpc", "carapace.protocols")
    assert shipped_names(("linux.py", "guest/")) == (
        {"carapace.linux", "carapace.guest"},
        ("carapace.guest",),
    )


def test_the_boundary_is_what_the_builder_ships() -> None:
    # every file the image builder puts into the guest is checked, and lies inside
    # the allowed set; every allowed module is in the image
    names = {module_name(p) for p in guest_files()}
    assert all(allowed(n) for n in names)
    assert names >= ALLOWED_MODULES


def test_checker_catches_host_imports(tmp_path: Path) -> None:
    # the checker itself must be able to fail
    assert not allowed("qemu.qmp")
    assert not allowed("pyroute2")
    assert not allowed("carapace.sandbox.state")
    assert not allowed("carapace.hypervisor")
    assert not allowed("carapace.api")
    assert allowed("asyncio")
    assert allowed("google.protobuf.message")
    assert allowed("carapace.guest.spec")
    assert not allowed("google.cloud")
    assert not allowed("carapace.guestx")


@pytest.mark.parametrize("path", guest_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_guest_code_imports_only_stdlib_protobuf_and_guest_modules(path: Path) -> None:
    bad = []
    for line, module, func in imports(path):
        if path == PKG / "__init__.py" and module == "carapace.api" and func == "__getattr__":
            continue  # lazy: only when the host asks for carapace.Sandbox
        if not allowed(module):
            bad.append(f"{path.relative_to(SRC)}:{line}: imports {module}")
    assert not bad, "\n".join(bad)


def test_imports_sees_relative_and_from_imports() -> None:
    found = {m for _, m, _ in imports(PKG / "guest" / "containers.py")}
    assert "carapace.linux" in found
    assert "carapace.guest.pod" in found
    assert "carapace.protocols.agent_pb2" in found
    assert "carapace.guest.server" in {m for _, m, _ in imports(PKG / "guest" / "agent.py")}


def test_imports_finds_host_imports(tmp_path: Path) -> None:
    f = tmp_path / "mod.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "import qemu.qmp\n"
        "from carapace.sandbox import state\n"
        "from ..hypervisor import qemu\n"
        "from . import spec\n"
        "if TYPE_CHECKING:\n"
        "    import pyroute2\n"
        "else:\n"
        "    import json\n"
        "def f():\n"
        "    import pyroute2\n"
    )
    found = imports(f, this="carapace.guest.mod")
    assert found == [
        (1, "typing", None),
        (2, "qemu.qmp", None),
        (3, "carapace.sandbox.state", None),
        (4, "carapace.hypervisor.qemu", None),
        (5, "carapace.guest.spec", None),
        (9, "json", None),
        (11, "pyroute2", "f"),
    ]
    assert [m for _, m, _ in found if not allowed(m)] == [
        "qemu.qmp", "carapace.sandbox.state", "carapace.hypervisor.qemu", "pyroute2",
    ]  # fmt: skip


@pytest.mark.skipif(not os.path.exists(GUEST_PYTHON), reason=f"no {GUEST_PYTHON}")
def test_agent_imports_under_the_guest_python_without_host_modules() -> None:
    site = Path(google.protobuf.__file__).parent.parent.parent  # holds google/ (and qemu/)
    code = f"""
import sys
sys.path[:0] = [{str(SRC)!r}, {str(site)!r}]
import carapace.guest.agent
forbidden = {FORBIDDEN!r}
bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
assert "qemu" not in sys.modules, bad
assert not bad, bad
print("ok", len(sys.modules))
"""
    r = subprocess.run(
        [GUEST_PYTHON, "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")
