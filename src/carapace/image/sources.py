"""Where the guest image's parts come from on the host: installed Debian packages, the
distribution kernel and its modules, the shared libraries of the binaries shipped.

Read-only: asks dpkg-query and ldd, reads files; builds nothing.
"""

from __future__ import annotations

import ast
import lzma
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from carapace.errors import ImageError
from carapace.guest.modprobe import module_name


def run_tool(argv: list[str]) -> str:
    """The output of a command, or an ImageError saying why it failed."""
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as e:
        raise ImageError(f"command {argv[0]!r} not found; is it installed?") from e
    except subprocess.CalledProcessError as e:
        raise ImageError(f"{' '.join(argv)} failed ({e.returncode}): {e.stderr.strip()}") from e


def package_version(name: str) -> str:
    """Installed version of a Debian package, or an ImageError naming it."""
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", name],
        capture_output=True,
        text=True,
    )
    status, _, version = r.stdout.partition(" ")
    if r.returncode != 0 or status != "installed":
        raise ImageError(
            f"Debian package {name!r} is not installed; the guest image needs it "
            f"(apt-get install {name})"
        )
    return version


def kernel_package() -> tuple[str, str]:
    """(package, kernel release) of the kernel linux-image-amd64 depends on."""
    package_version("linux-image-amd64")
    deps = run_tool(["dpkg-query", "-W", "-f=${Depends}", "linux-image-amd64"])
    for dep in deps.split(","):
        name = dep.strip().split(" ")[0]
        if name.startswith("linux-image-") and name != "linux-image-amd64":
            return name, name.removeprefix("linux-image-")
    raise ImageError(f"cannot find the kernel package in linux-image-amd64's Depends: {deps!r}")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the ELF vmlinux from a bzImage's XZ payload (Debian's compression)."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise ImageError("no XZ payload found in the kernel image; cannot extract vmlinux")
    out = lzma.LZMADecompressor().decompress(bzimage[start:])
    if out[:4] != b"\x7fELF":
        raise ImageError("the kernel's XZ payload is not an ELF vmlinux")
    return out


def parse_modules_dep(modules_dep: str) -> dict[str, list[str]]:
    """modules.dep as {module file: the files it depends on}, in the file's order."""
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        path, colon, rest = line.partition(":")
        if colon and path.strip():
            deps[path.strip()] = rest.split()
    return deps


def module_closure(modules_dep: str, wanted: Iterable[str]) -> list[str]:
    """Paths (relative to /lib/modules/<release>) of ``wanted`` modules and their
    dependencies, in an order where each module comes after what it depends on."""
    deps = parse_modules_dep(modules_dep)
    by_name = {module_name(path): path for path in deps}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order:
            return
        if path in stack:
            raise ImageError(f"module dependency cycle through {path}")
        for dep in deps.get(path, []):
            visit(dep, (*stack, path))
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ImageError(f"kernel module {name!r} not found in modules.dep")
        visit(by_name[key], ())
    return order


def module_lists(
    modules_dep: str, modules: Iterable[str], on_demand: dict[str, tuple[str, ...]]
) -> dict[str, list[str]]:
    """The module list of each group: ``modules`` and their dependencies in load order,
    "" for those loaded at start, each ``on_demand`` group for its modules (those of
    ``modules`` only) without what is loaded at start already."""
    wanted = list(modules)
    later = {m for group in on_demand.values() for m in group}
    boot = module_closure(modules_dep, [m for m in wanted if m not in later])
    lists = {"": boot}
    for group, names in on_demand.items():
        present = [m for m in names if m in wanted]
        if present:
            lists[group] = [p for p in module_closure(modules_dep, present) if p not in boot]
    return lists


#: What ends a signed kernel module (scripts/sign-file): signature, then a 12-byte
#: ``struct module_signature`` whose last field is the signature's length (big endian).
MODULE_SIG_MARKER = b"~Module signature appended~\n"


def strip_module_signature(data: bytes) -> bytes:
    """A kernel module without its appended signature (unchanged if it has none)."""
    if not data.endswith(MODULE_SIG_MARKER):
        return data
    end = len(data) - len(MODULE_SIG_MARKER)
    if end < 12:
        raise ImageError("a kernel module's signature trailer is cut short")
    sig_len = int.from_bytes(data[end - 4 : end], "big")
    start = end - 12 - sig_len
    if start < 0:
        raise ImageError(f"a kernel module's signature is longer ({sig_len}) than the module")
    return data[:start]


def shared_libraries(paths: Iterable[str]) -> set[str]:
    """Every shared library (and the loader) the ELF files at ``paths`` need."""
    libs: set[str] = set()
    for path in paths:
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in out.splitlines():
            line = line.strip()
            if "=>" in line:
                target = line.split("=>", 1)[1].strip().split(" ")[0]
            else:
                target = line.split(" ")[0]
            if target.startswith("/"):
                libs.add(target)
    return libs


def stdlib_imports(sources: Iterable[Path], excluded: Iterable[str] = ()) -> set[str]:
    """The stdlib modules the ``import`` statements of ``sources`` name, wherever they
    are (also inside functions, which importing the agent does not run), without the
    ``excluded`` ones."""
    names: set[str] = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    skip = set(excluded)
    return {
        n
        for n in names
        if n.split(".")[0] in sys.stdlib_module_names and n not in skip and n != "__future__"
    }
