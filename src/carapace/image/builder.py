"""Builds the guest image (kernel + initramfs) and the default busybox rootfs.

Everything comes from Debian packages installed on the host: the distribution
kernel (kept as an uncompressed vmlinux for the faster PVH boot), its modules (the
agent's, and those workloads need, loaded only on the kernel's request: image/kmod.py),
Debian's CPython with the stdlib subset the agent imports, crun with its libraries,
plus protobuf and the agent's own code from the virtualenv; busybox-static for the
containers' default rootfs. The initramfs holds only what the agent runs (the kernel
unpacks every byte of it at each boot, uncompressed: faster than decompressing under
TCG).
Nothing is downloaded. A manifest records the inputs; an unchanged input set is
not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from carapace.errors import ImageError
from carapace.guest import CRUN_VERSION_FILE, SHIPPED
from carapace.guest.modprobe import PROGRAM as MODPROBE_PROGRAM
from carapace.image.cpio import Entry, encode_archive
from carapace.image.kmod import WORKLOAD_MODULES, modprobe_script, module_files, workload_modules
from carapace.image.sources import (
    extract_vmlinux,
    kernel_package,
    package_version,
    run_tool,
    shared_libraries,
    stdlib_imports,
)
from carapace.image.store import MANIFEST, GuestImage, current_image

BUILDER_VERSION = "1"
GUEST_PYTHON = "/usr/bin/python3.11"
GUEST_LIB = "/opt/carapace/lib"  # where the agent package and protobuf live in the guest
#: The carapace package directory (found from this file: importing ``carapace`` here
#: would import the package's API, which imports the sandbox, which reads images).
PACKAGE_DIR = Path(__file__).parent.parent

#: Debian packages the image is made of (the kernel package is found at build time).
PACKAGES = ("busybox-static", "python3.11-minimal", "libpython3.11-stdlib", "crun")

#: Kernel modules of the guest (their dependencies are added from modules.dep). Those
#: of ON_DEMAND_MODULES load the first time they are needed, the others at start.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "virtiofs",
    "overlay",
    "virtio_net",
    "virtio_blk",
    "virtio_balloon",
)

#: Modules of GUEST_MODULES the agent loads only when it first needs them, by group
#: (guest/sysinit.need_modules): a filesystem when a storage of its type is mounted,
#: the NIC driver when the network verbs are first called. Not loading them at start
#: keeps them off the path to "agent ready" (each costs tens of milliseconds).
ON_DEMAND_MODULES: dict[str, tuple[str, ...]] = {
    "virtiofs": ("virtiofs",),
    "9p": ("9pnet_virtio", "9p"),
    "overlay": ("overlay",),
    "net": ("virtio_net",),
    "blk": ("virtio_blk",),
}

#: Modules of the stdlib the agent may import lazily (the import capture adds the rest).
EXTRA_STDLIB = (
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.idna",
    "encodings.aliases",
    "concurrent.futures.thread",
)

ProgressFn = Callable[[str], None]


def shipped_files(
    package_dir: Path = PACKAGE_DIR, shipped: Iterable[str] = SHIPPED
) -> dict[str, Path]:
    """Files of the carapace package that go into the guest (``carapace.guest.SHIPPED``),
    by guest-relative name (``carapace/guest/agent.py``)."""
    out: dict[str, Path] = {}
    for rel in shipped:
        if rel.endswith("/"):
            for f in sorted((package_dir / rel).rglob("*.py")):
                out[f"carapace/{f.relative_to(package_dir).as_posix()}"] = f
        else:
            out[f"carapace/{rel}"] = package_dir / rel
    return out


_CAPTURE = r"""
import importlib, json, sys
sys.path[:0] = sys.argv[1].split(":")
for name in sys.argv[3].split(","):
    sys.modules[name] = None  # excluded: importers fall back to doing without
for name in sys.argv[2].split(","):
    importlib.import_module(name)
files = {}
for name, mod in list(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if f:
        files[name] = f
print(json.dumps(files))
"""

#: Stdlib modules left out of the guest: their importers (asyncio, shutil, hashlib)
#: work without them, and they would bring OpenSSL (4.6 MiB, to unpack at every boot)
#: and compression libraries along. hashlib falls back to CPython's built-in hashes.
EXCLUDED_STDLIB = ("ssl", "_ssl", "_hashlib", "bz2", "_bz2", "lzma", "_lzma")


class ImageBuilder:
    """Builds the guest image into ``out_dir``, only when its inputs changed."""

    def __init__(
        self,
        out_dir: Path,
        progress: ProgressFn | None = None,
        kernel_path: Path | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.progress = progress or (lambda _msg: None)
        self._kernel_path = kernel_path

    # -- inputs ---------------------------------------------------------------

    def _agent_sources(self) -> dict[str, Path]:
        """Files of the carapace package that go into the guest, by guest-relative name."""
        return shipped_files()

    def inputs(self) -> dict[str, object]:
        """What the image is made of: package versions and hashes of our own files."""
        import google.protobuf

        kpkg, release = kernel_package()
        versions = {kpkg: package_version(kpkg)}
        for p in PACKAGES:
            versions[p] = package_version(p)
        h = hashlib.sha256()
        for name, path in sorted(self._agent_sources().items()):
            h.update(name.encode() + b"\0" + path.read_bytes())
        # the builder itself: a change in how the image is made is a change of input
        builder = hashlib.sha256(Path(__file__).read_bytes())
        for part in ("cpio.py", "sources.py", "kmod.py"):
            builder.update((Path(__file__).parent / part).read_bytes())
        return {
            "builder_version": BUILDER_VERSION,
            "kernel_release": release,
            "packages": versions,
            "protobuf": google.protobuf.__version__,
            "agent_sha256": h.hexdigest(),
            "builder_sha256": builder.hexdigest(),
            "modules": list(GUEST_MODULES),
            "modules_on_demand": {g: list(m) for g, m in ON_DEMAND_MODULES.items()},
            "modules_workload": {g: list(m) for g, m in WORKLOAD_MODULES.items()},
            "zlib": zlib.ZLIB_RUNTIME_VERSION,  # compresses the workload modules
        }

    # -- outputs --------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST

    def current(self) -> GuestImage | None:
        """The image on disk, if it is complete and its files match the manifest
        (``carapace.image.store.current_image``)."""
        return current_image(self.out_dir)

    def up_to_date(self, inputs: dict[str, object] | None = None) -> GuestImage | None:
        img = self.current()
        if img is None:
            return None
        if img.manifest.get("inputs") != (inputs if inputs is not None else self.inputs()):
            return None
        return img

    def build(self, force: bool = False) -> GuestImage:
        inputs = self.inputs()  # queried once: dpkg and hashing are the slow part of a check
        if not force:
            img = self.up_to_date(inputs)
            if img is not None:
                self.progress(f"guest image is up to date ({self.out_dir})")
                return img
        t0 = time.monotonic()
        release = str(inputs["kernel_release"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.out_dir, prefix=".build-") as tmp:
            work = Path(tmp)
            self.progress(f"[1/4] kernel {release}: extracting vmlinux")
            kernel = self._kernel_path or Path(f"/boot/vmlinuz-{release}")
            try:
                vmlinux = extract_vmlinux(kernel.read_bytes())
            except OSError as e:
                raise ImageError(f"cannot read the kernel {kernel}: {e.strerror}") from e
            (work / "vmlinux").write_bytes(vmlinux)
            self.progress("[2/4] initramfs: modules, python, crun, agent")
            entries = self._initramfs_entries(release, work)
            initrd = encode_archive(entries)
            (work / "initrd.img").write_bytes(initrd)
            self.progress("[3/4] default container rootfs (busybox)")
            rootfs_tmp = work / "rootfs"
            build_busybox_rootfs(rootfs_tmp)
            self.progress("[4/4] writing manifest")
            outputs: dict[str, dict[str, int | str]] = {}
            for name in ("vmlinux", "initrd.img"):
                data = (work / name).read_bytes()
                outputs[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            manifest = {
                "inputs": inputs,
                "kernel_release": release,
                "outputs": outputs,
                "initrd_files": len(entries),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            for name in ("vmlinux", "initrd.img"):
                os.replace(work / name, self.out_dir / name)
            old_rootfs = self.out_dir / "rootfs"
            if old_rootfs.exists():
                shutil.rmtree(old_rootfs)
            os.replace(rootfs_tmp, old_rootfs)
            tmp_manifest = work / "manifest.json"
            tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp_manifest, self.manifest_path)
        self.progress(
            f"built guest image in {time.monotonic() - t0:.1f}s: "
            f"vmlinux {int(outputs['vmlinux']['size']) / 2**20:.1f} MiB, "
            f"initramfs {int(outputs['initrd.img']['size']) / 2**20:.1f} MiB "
            f"({len(entries)} files) in {self.out_dir}"
        )
        img = self.current()
        assert img is not None
        return img

    # -- the initramfs --------------------------------------------------------

    def _initramfs_entries(self, release: str, work: Path) -> list[Entry]:
        files = InitramfsTree()
        for d in (
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "etc",
            "root",
            "mnt",
            "usr/bin",
            "usr/lib",
            "lib",
            "lib64",
            "bin",
            "sbin",
        ):
            files.dir(d)
        files.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        files.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        files.file("etc/group", b"root:x:0:\n")
        files.file("etc/hostname", b"carapace\n")
        # kernel modules: the agent's with its load lists, the workloads' (compressed),
        # the index of both, and the modprobe the kernel runs for the latter
        moddir = Path(f"/lib/modules/{release}")
        modules = module_files(
            moddir, release, GUEST_MODULES, ON_DEMAND_MODULES, workload_modules()
        )
        for name, data in sorted(modules.items()):
            files.file(name, data)
        script = modprobe_script(GUEST_PYTHON, GUEST_LIB).encode()
        files.file(MODPROBE_PROGRAM.lstrip("/"), script, mode=0o755)
        # CPython with just what the agent imports
        elfs = [GUEST_PYTHON, "/usr/bin/crun"]
        for p in elfs:
            if not Path(p).exists():
                raise ImageError(f"{p} is missing; install python3.11-minimal and crun")
        files.copy("usr/bin/python3.11", Path(GUEST_PYTHON))
        files.symlink("usr/bin/python3", "python3.11")
        files.copy("usr/bin/crun", Path("/usr/bin/crun"))
        # the agent answers GetGuestDetails with this line instead of running crun
        crun_version = run_tool(["/usr/bin/crun", "--version"]).splitlines()[:1]
        files.file(CRUN_VERSION_FILE.lstrip("/"), "".join(crun_version).encode() + b"\n")
        staged = self._stage_python(work)
        for rel, path in sorted(staged.items()):
            files.copy(rel, path)
            if path.suffix == ".so":
                elfs.append(str(path))
        for lib in sorted(shared_libraries(elfs)):
            real = Path(lib).resolve()
            rel = lib.lstrip("/")
            if rel.startswith("lib64/"):
                continue  # the loader is reached through the lib64 symlink
            files.copy(rel, real)
        files.copy(
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            Path("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").resolve(),
        )
        files.file("init", INIT_SCRIPT.encode(), mode=0o755)
        return files.entries()

    def _stage_python(self, work: Path) -> dict[str, Path]:
        """Copy the agent, protobuf and the stdlib modules they import into a staging
        tree, byte-compile it with the guest's Python, and return guest path -> file."""
        import google.protobuf

        stage = work / "python"
        lib = stage / GUEST_LIB.lstrip("/")
        for rel, src in self._agent_sources().items():
            dst = lib / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        pb_root = Path(google.protobuf.__file__).parent.parent  # .../site-packages/google
        shutil.copytree(
            pb_root,
            lib / "google",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyi", "compiler", "testing", "util"),
        )
        # import the agent with the guest's interpreter and record what it loads; and
        # what its modules import lazily (inside functions)
        lazy = stdlib_imports(self._agent_sources().values(), EXCLUDED_STDLIB)
        r = subprocess.run(
            [
                GUEST_PYTHON,
                "-S",
                "-c",
                _CAPTURE,
                str(lib),
                ",".join(["carapace.guest.agent", *EXTRA_STDLIB, *sorted(lazy)]),
                ",".join(EXCLUDED_STDLIB),
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise ImageError(f"the agent does not import under {GUEST_PYTHON}: {r.stderr[-2000:]}")
        loaded: dict[str, str] = json.loads(r.stdout)
        stdlib = Path("/usr/lib/python3.11")
        for f in loaded.values():
            p = Path(f)
            if p.is_relative_to(stdlib):
                dst = stage / p.relative_to("/")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst)
        (stage / "usr/lib/python3.11/lib-dynload").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                GUEST_PYTHON,
                "-m",
                "compileall",
                "-q",
                "-b",  # x.pyc beside x.py, so the sources can be left out
                "-j",
                "0",
                "--invalidation-mode",
                "unchecked-hash",
                "-s",
                str(stage),
                "-p",
                "/",
                str(stage),
            ],
            check=True,
            capture_output=True,
        )
        out: dict[str, Path] = {}
        for path in stage.rglob("*"):
            if path.suffix == ".py" and path.with_suffix(".pyc").exists():
                continue  # the byte code alone is imported (and starts faster)
            if path.is_file():
                out[str(path.relative_to(stage))] = path
        return out


class InitramfsTree:
    """Entries of the initramfs, with parent directories created on demand."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._entries:
                self._entries[d] = Entry(name=d, mode=stat.S_IFDIR | mode)

    def _parent(self, name: str) -> None:
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entries[name] = Entry(name=name, mode=stat.S_IFREG | mode, data=data)

    def copy(self, name: str, src: Path) -> None:
        st = src.stat()
        self.file(name, src.read_bytes(), mode=stat.S_IMODE(st.st_mode))

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entries[name] = Entry(name=name, mode=stat.S_IFLNK | 0o777, data=target.encode())

    def entries(self) -> list[Entry]:
        return list(self._entries.values())


#: The guest's /init: CPython straight to the agent (which mounts, loads modules, serves).
#: Isolated (-I: no PYTHON* variables from the kernel command line, no script directory
#: on sys.path) and without site (-S). The garbage collector is off while the agent's
#: modules load (a collection then would find nothing to free), and what they made is
#: frozen: it lives as long as the agent, so later collections never scan it. Modules
#: the boot path never uses are deferred (``carapace.guest.DEFERRED_IMPORTS``).
INIT_SCRIPT = f"""#!{GUEST_PYTHON} -IS
import gc
import time
started = time.monotonic()
gc.disable()
import sys
sys.path.insert(0, "{GUEST_LIB}")
from carapace.guest import defer_imports
defer_imports()
from carapace.guest.agent import main
gc.freeze()
gc.enable()
main(started)
"""


def build_busybox_rootfs(root: Path) -> None:
    """A minimal container rootfs: static busybox with its applets, /etc basics."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise ImageError("/bin/busybox is missing; install busybox-static")
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "var",
        "run",
        "home",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = run_tool([str(busybox), "--list-full"]).split()
    for applet in applets:
        link = root / applet
        if applet == "bin/busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = applet.count("/")
        link.symlink_to("../" * depth + "bin/busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    (root / "etc" / "hostname").write_text("carapace\n")


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin wrapper
    out = Path(argv[0]) if argv else Path("/var/lib/carapace/guest")
    ImageBuilder(out, progress=lambda m: print(m, file=sys.stderr)).build()
    return 0
