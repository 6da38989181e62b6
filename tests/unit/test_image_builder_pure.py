"""The pure parts of the guest image builder (carapace.image.builder and .sources)."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
from pathlib import Path

import pytest

import carapace
from carapace.errors import ImageError
from carapace.guest import SHIPPED
from carapace.image.builder import (
    PACKAGE_DIR,
    ImageBuilder,
    InitramfsTree,
    build_busybox_rootfs,
    shipped_files,
)
from carapace.image.cpio import decode_archive, encode_archive
from carapace.image.sources import extract_vmlinux, module_closure, package_version

XZ_MAGIC = b"\xfd7zXZ\x00"
FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def fake_bzimage(payload: bytes) -> bytes:
    setup = b"MZ" + b"\x90" * 1000 + b"HdrS" + bytes(range(200)) * 3
    assert XZ_MAGIC not in setup
    # the real bzImage has bytes after the payload (its size, the rest of the decompressor)
    return setup + lzma.compress(payload, format=lzma.FORMAT_XZ) + b"\x00\x10\x00\x00tail"


def test_extract_vmlinux_round_trip() -> None:
    assert extract_vmlinux(fake_bzimage(FAKE_ELF)) == FAKE_ELF


def test_extract_vmlinux_without_xz_payload() -> None:
    bz = b"MZ" + b"\0" * 4096 + lzma.compress(FAKE_ELF, format=lzma.FORMAT_ALONE)
    with pytest.raises(ImageError, match="no XZ payload"):
        extract_vmlinux(bz)


def test_extract_vmlinux_non_elf_payload() -> None:
    with pytest.raises(ImageError, match="not an ELF vmlinux"):
        extract_vmlinux(fake_bzimage(b"\x1fELF not really" * 10))


MODULES_DEP = """\
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz \
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/fs/netfs/netfs.ko.xz: kernel/fs/fscache/fscache.ko.zst
kernel/fs/fscache/fscache.ko.zst:
kernel/drivers/char/virtio_console.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
kernel/sound/snd_hda_core.ko: kernel/arch/x86/crypto/crc32c-intel.ko.xz
kernel/drivers/block/virtio_blk.ko.gz:

this line has no colon and is ignored
"""


def deps_of(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        if ":" in line:
            path, _, rest = line.partition(":")
            out[path] = rest.split()
    return out


def assert_dependency_order(order: list[str]) -> None:
    deps = deps_of(MODULES_DEP)
    assert len(order) == len(set(order)), order
    for i, path in enumerate(order):
        for dep in deps[path]:
            assert dep in order[:i], f"{dep} must come before {path}"


def test_module_closure_orders_dependencies_first() -> None:
    order = module_closure(MODULES_DEP, ["9p", "9pnet_virtio", "virtio_pci"])
    assert_dependency_order(order)
    assert set(order) == {
        "kernel/fs/9p/9p.ko.xz",
        "kernel/net/9p/9pnet.ko.xz",
        "kernel/fs/netfs/netfs.ko.xz",
        "kernel/fs/fscache/fscache.ko.zst",
        "kernel/net/9p/9pnet_virtio.ko.xz",
        "kernel/drivers/virtio/virtio_pci.ko.xz",
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz",
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz",
    }
    # a module depended on twice (9pnet) appears once
    assert order.count("kernel/net/9p/9pnet.ko.xz") == 1


def test_module_closure_exact_order() -> None:
    assert module_closure(MODULES_DEP, ["9p"]) == [
        "kernel/net/9p/9pnet.ko.xz",
        "kernel/fs/fscache/fscache.ko.zst",
        "kernel/fs/netfs/netfs.ko.xz",
        "kernel/fs/9p/9p.ko.xz",
    ]


def test_module_closure_wanted_twice() -> None:
    assert module_closure(MODULES_DEP, ["virtio_blk", "virtio_blk"]) == [
        "kernel/drivers/block/virtio_blk.ko.gz"
    ]


def test_module_closure_with_every_suffix() -> None:
    order = module_closure(MODULES_DEP, ["virtio_blk", "fscache", "snd_hda_core"])
    assert order == [
        "kernel/drivers/block/virtio_blk.ko.gz",
        "kernel/fs/fscache/fscache.ko.zst",
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz",
        "kernel/sound/snd_hda_core.ko",
    ]


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("crc32c_intel", "kernel/arch/x86/crypto/crc32c-intel.ko.xz"),
        ("crc32c-intel", "kernel/arch/x86/crypto/crc32c-intel.ko.xz"),
        ("virtio-console", "kernel/drivers/char/virtio_console.ko.xz"),
        ("virtio_console", "kernel/drivers/char/virtio_console.ko.xz"),
    ],
)
def test_module_closure_dash_and_underscore_match(name: str, path: str) -> None:
    assert module_closure(MODULES_DEP, [name]) == [path]


def test_module_closure_unknown_module() -> None:
    with pytest.raises(ImageError) as exc:
        module_closure(MODULES_DEP, ["9p", "vhost_vsock"])
    assert "'vhost_vsock'" in str(exc.value)
    assert "modules.dep" in str(exc.value)


def test_module_closure_cycle() -> None:
    dep = "a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n"
    with pytest.raises(ImageError, match="cycle"):
        module_closure(dep, ["a"])


def test_initramfs_tree_creates_parents() -> None:
    t = InitramfsTree()
    t.file("usr/lib/python3.11/os.py", b"x = 1\n")
    t.dir("etc", mode=0o700)
    by_name = {e.name: e for e in t.entries()}
    assert set(by_name) == {"usr", "usr/lib", "usr/lib/python3.11", "usr/lib/python3.11/os.py",
                            "etc"}  # fmt: skip
    for d in ("usr", "usr/lib", "usr/lib/python3.11"):
        assert by_name[d].mode == stat.S_IFDIR | 0o755
    assert by_name["etc"].mode == stat.S_IFDIR | 0o700
    f = by_name["usr/lib/python3.11/os.py"]
    assert f.mode == stat.S_IFREG | 0o644
    assert f.data == b"x = 1\n"


def test_initramfs_tree_dir_strips_slashes_and_keeps_existing() -> None:
    t = InitramfsTree()
    t.dir("/a/b/", mode=0o711)
    t.dir("a", mode=0o700)  # already there: not changed
    by_name = {e.name: e for e in t.entries()}
    assert set(by_name) == {"a", "a/b"}
    assert by_name["a"].mode == stat.S_IFDIR | 0o711
    assert by_name["a/b"].mode == stat.S_IFDIR | 0o711


def test_initramfs_tree_symlinks() -> None:
    t = InitramfsTree()
    t.symlink("bin/sh", "busybox")
    t.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    by_name = {e.name: e for e in t.entries()}
    assert by_name["bin"].mode == stat.S_IFDIR | 0o755
    assert by_name["lib64"].mode == stat.S_IFDIR | 0o755
    sh = by_name["bin/sh"]
    assert stat.S_ISLNK(sh.mode)
    assert sh.data == b"busybox"
    assert by_name["lib64/ld-linux-x86-64.so.2"].data.startswith(b"/lib/")


def test_initramfs_tree_copy_keeps_mode(tmp_path: Path) -> None:
    src = tmp_path / "tool"
    src.write_bytes(b"\x7fELF...")
    src.chmod(0o750)
    t = InitramfsTree()
    t.copy("usr/bin/tool", src)
    e = {e.name: e for e in t.entries()}["usr/bin/tool"]
    assert e.mode == stat.S_IFREG | 0o750
    assert e.data == b"\x7fELF..."


def test_initramfs_tree_later_file_replaces_earlier() -> None:
    t = InitramfsTree()
    t.file("init", b"old")
    t.file("init", b"new", mode=0o755)
    entries = t.entries()
    assert [e.name for e in entries] == ["init"]
    assert entries[0].data == b"new"
    assert entries[0].mode == stat.S_IFREG | 0o755


def test_initramfs_tree_encodes_parents_before_children() -> None:
    t = InitramfsTree()
    t.file("z/y/x", b"1")
    t.symlink("a/b", "../z/y/x")
    names = [e.name for e in decode_archive(encode_archive(t.entries()))]
    for i, name in enumerate(names):
        parent = name.rpartition("/")[0]
        if parent:
            assert parent in names[:i]


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="no /bin/busybox")
def test_build_busybox_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    build_busybox_rootfs(root)
    busybox = root / "bin" / "busybox"
    assert busybox.is_file() and not busybox.is_symlink()
    assert os.access(busybox, os.X_OK)
    assert busybox.read_bytes() == Path("/bin/busybox").read_bytes()
    sh = root / "bin" / "sh"
    assert sh.is_symlink()
    assert not os.readlink(sh).startswith("/")  # relative: valid inside the container
    assert sh.resolve() == busybox.resolve()
    env = root / "usr" / "bin" / "env"
    assert env.is_symlink()
    assert not os.readlink(env).startswith("/")
    assert env.resolve() == busybox.resolve()
    # every symlink in the tree resolves to busybox, inside the rootfs
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_symlink():
                assert p.resolve() == busybox.resolve(), p
    passwd = (root / "etc" / "passwd").read_text().splitlines()
    assert passwd[0].startswith("root:x:0:0:")
    assert (root / "etc" / "group").read_text().startswith("root:x:0:")
    assert (root / "etc" / "hostname").read_text() == "carapace\n"
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    for d in ("proc", "sys", "dev", "root", "var", "run"):
        assert (root / d).is_dir(), d


@pytest.mark.skipif(not shutil.which("dpkg-query"), reason="no dpkg-query")
def test_package_version_of_missing_package() -> None:
    with pytest.raises(ImageError) as exc:
        package_version("carapace-no-such-package")
    assert "'carapace-no-such-package'" in str(exc.value)
    assert "apt-get install carapace-no-such-package" in str(exc.value)


@pytest.mark.skipif(not shutil.which("dpkg-query"), reason="no dpkg-query")
def test_package_version_of_installed_package() -> None:
    version = package_version("dpkg")
    assert version and version[0].isdigit()


# -- what of carapace goes into the guest ------------------------------------------------


def test_the_package_dir_is_carapace_s() -> None:
    assert Path(carapace.__file__).parent == PACKAGE_DIR


def test_shipped_files_follow_the_shipped_list(tmp_path: Path) -> None:
    pkg = tmp_path / "carapace"
    for rel in ("__init__.py", "linux.py", "api.py", "guest/__init__.py", "guest/agent.py",
                "guest/sub/x.py", "guest/notes.txt", "sandbox/sandbox.py"):  # fmt: skip
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("")
    files = shipped_files(pkg, ("__init__.py", "linux.py", "guest/"))
    assert files == {
        "carapace/__init__.py": pkg / "__init__.py",
        "carapace/linux.py": pkg / "linux.py",
        "carapace/guest/__init__.py": pkg / "guest" / "__init__.py",
        "carapace/guest/agent.py": pkg / "guest" / "agent.py",
        "carapace/guest/sub/x.py": pkg / "guest" / "sub" / "x.py",
    }


def test_names_the_builder_used_to_define_still_import() -> None:
    from carapace.image import builder, sources, store

    assert builder.GuestImage is store.GuestImage
    assert builder.extract_vmlinux is sources.extract_vmlinux
    assert builder.package_version is sources.package_version


def test_the_builder_ships_what_shipped_names(tmp_path: Path) -> None:
    sources = ImageBuilder(tmp_path)._agent_sources()
    assert sources == shipped_files(PACKAGE_DIR, SHIPPED)
    for rel in SHIPPED:  # every entry brings something, and nothing else comes
        assert any(name == f"carapace/{rel}" or name.startswith(f"carapace/{rel}")
                   for name in sources), rel  # fmt: skip
    assert all(name.startswith(tuple(f"carapace/{rel}" for rel in SHIPPED)) for name in sources)
    assert "carapace/guest/agent.py" in sources
    assert "carapace/protocols/contract.py" in sources
    assert not any(n.startswith(("carapace/sandbox/", "carapace/image/")) for n in sources)
