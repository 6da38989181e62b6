"""What keeps the guest's boot lean: kernel modules in groups loaded when first needed,
unsigned module copies, crun's version recorded at build time, lazily imported stdlib
modules still shipped (carapace.image.sources, carapace.guest.sysinit and users)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from carapace import linux
from carapace.errors import ImageError
from carapace.guest import ALL_MODULES_PARAM, CRUN_VERSION_FILE, module_list, storage, sysinit
from carapace.guest import netlink as nl
from carapace.guest.crun import recorded_version
from carapace.guest.network import NetworkService
from carapace.image.builder import EXCLUDED_STDLIB, GUEST_MODULES, ON_DEMAND_MODULES
from carapace.image.sources import (
    MODULE_SIG_MARKER,
    module_lists,
    stdlib_imports,
    strip_module_signature,
)
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
"""


def test_module_lists_keep_on_demand_groups_off_the_start() -> None:
    lists = module_lists(
        MODULES_DEP,
        ["virtio_pci", "virtio_console", "virtiofs", "virtio_net"],
        {"virtiofs": ("virtiofs",), "net": ("virtio_net",), "overlay": ("overlay",)},
    )
    assert lists[""] == [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/drivers/char/virtio_console.ko",
    ]
    # a group lists its own modules and dependencies, not what the start loaded
    assert lists["virtiofs"] == ["kernel/fs/fuse/fuse.ko", "kernel/fs/fuse/virtiofs.ko"]
    assert lists["net"] == [
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ]
    # a group none of whose modules the image has gets no list
    assert "overlay" not in lists


def test_the_image_groups_are_among_its_modules() -> None:
    on_demand = {m for group in ON_DEMAND_MODULES.values() for m in group}
    assert on_demand <= set(GUEST_MODULES)
    assert {"virtio_pci", "virtio_console"} <= set(GUEST_MODULES) - on_demand
    assert module_list() == "/lib/modules/carapace.load"
    assert module_list("net") == "/lib/modules/carapace.net.load"


def signed(body: bytes, signature: bytes) -> bytes:
    info = bytes(8) + len(signature).to_bytes(4, "big")  # struct module_signature
    return body + signature + info + MODULE_SIG_MARKER


def test_strip_module_signature() -> None:
    body = b"\x7fELF" + bytes(range(256)) * 8
    assert strip_module_signature(signed(body, b"S" * 512)) == body
    assert strip_module_signature(body) == body  # unsigned: unchanged


def test_strip_module_signature_refuses_a_cut_trailer() -> None:
    with pytest.raises(ImageError, match="longer"):
        strip_module_signature(signed(b"", b"S" * 64)[40:])
    with pytest.raises(ImageError, match="cut short"):
        strip_module_signature(b"abc" + MODULE_SIG_MARKER)


def test_stdlib_imports_finds_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "mod.py"
    f.write_text(
        "from __future__ import annotations\n"
        "import os, json\n"
        "from collections.abc import Callable\n"
        "from carapace.guest import sysinit\n"
        "from . import spec\n"
        "import google.protobuf\n"
        "def f() -> None:\n"
        "    import shutil\n"
        "    import ssl\n"
        "    if True:\n"
        "        from tempfile import mkstemp\n"
    )
    assert stdlib_imports([f], EXCLUDED_STDLIB) == {
        "os",
        "json",
        "collections.abc",
        "shutil",
        "tempfile",
    }


def test_recorded_crun_version(tmp_path: Path) -> None:
    assert CRUN_VERSION_FILE.startswith("/")
    f = tmp_path / "crun.version"
    f.write_text("crun version 1.8.1\n")
    assert recorded_version(str(f)) == "crun version 1.8.1"
    assert recorded_version(str(tmp_path / "none")) == ""


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The module lists need_modules loads (none for real), none loaded yet."""
    seen: list[str] = []

    def load(path: str) -> list[str]:
        seen.append(path)
        return []

    monkeypatch.setattr(sysinit, "load_modules", load)
    monkeypatch.setattr(sysinit, "_groups_loaded", set())
    return seen


def test_need_modules_loads_a_group_once(loads: list[str]) -> None:
    sysinit.need_modules("virtiofs")
    sysinit.need_modules("virtiofs")
    sysinit.need_modules("net")
    assert loads == [module_list("virtiofs"), module_list("net")]


def test_need_all_modules_loads_every_listed_group(tmp_path: Path, loads: list[str]) -> None:
    for name in ("carapace.load", "carapace.net.load", "carapace.9p.load", "other.load"):
        (tmp_path / name).write_text("")
    sysinit.need_all_modules(str(tmp_path))
    assert loads == [module_list("9p"), module_list("net")]
    assert ALL_MODULES_PARAM == "carapace.modules=all"


def test_a_mount_loads_its_filesystem_first(
    monkeypatch: pytest.MonkeyPatch, loads: list[str]
) -> None:
    mounted: list[tuple[str, str]] = []
    monkeypatch.setattr(storage, "wait_virtiofs_device", lambda: None)
    monkeypatch.setattr(linux, "mount", lambda src, dst, fstype, *_: mounted.append((fstype, dst)))
    storage.mount_storage(pb.Storage(source="carapace", fstype="virtiofs", mount_point="/s"))
    storage.mount_storage(pb.Storage(source="tmpfs", fstype="tmpfs", mount_point="/t"))
    assert loads == [module_list("virtiofs")]
    assert mounted == [("virtiofs", "/s"), ("tmpfs", "/t")]


def test_a_module_that_does_not_load_fails_the_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str) -> list[str]:
        raise OSError(8, f"finit_module {path}: Exec format error")

    monkeypatch.setattr(sysinit, "load_modules", broken)
    monkeypatch.setattr(sysinit, "_groups_loaded", set())
    with pytest.raises(TtrpcError) as e:
        storage.mount_storage(pb.Storage(source="share", fstype="9p", mount_point="/s"))
    assert e.value.code == Code.INTERNAL
    assert "cannot mount 9p at /s" in e.value.message and "Exec format" in e.value.message


def test_the_network_verbs_load_the_nic_driver_first(loads: list[str]) -> None:
    class NoNetlink:
        def __enter__(self) -> NoNetlink:
            assert loads == [module_list("net")]  # before any netlink socket
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def dump(self, req: nl.Request) -> list[nl.Message]:
            return []

        def request(self, req: nl.Request, what: str) -> None:
            return None

    svc = NetworkService(NoNetlink)
    assert asyncio.run(svc.list_interfaces(pb.ListInterfacesRequest())).interfaces == []
    asyncio.run(svc.list_routes(pb.ListRoutesRequest()))
    assert loads == [module_list("net")]
