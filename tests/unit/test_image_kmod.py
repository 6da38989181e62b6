"""The modules the guest image carries for workloads and the index its modprobe reads
(carapace.image.kmod): which modules, stored how, and the cut-down modules.dep,
modules.alias and modules.softdep; then the same on the host's Debian kernel, if
installed: what the kernel's requests for iptables, bridges, veth... resolve to."""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import pytest

from carapace.errors import ImageError
from carapace.guest.modprobe import PROGRAM, ModuleIndex
from carapace.image.builder import GUEST_LIB, GUEST_MODULES, GUEST_PYTHON, ON_DEMAND_MODULES
from carapace.image.kmod import (
    WORKLOAD_MODULES,
    gzip_module,
    image_module_paths,
    modprobe_script,
    module_index,
    with_soft_dependencies,
    workload_modules,
)
from carapace.image.sources import module_lists

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko
kernel/fs/overlayfs/overlay.ko:
kernel/net/llc/llc.ko:
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/drivers/net/veth.ko:
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
kernel/net/netfilter/nf_tables.ko: kernel/lib/libcrc32c.ko
kernel/sound/core/snd.ko:
"""
MODULES_ALIAS = """\
# Aliases extracted from modules themselves.
alias virtio:d00000001v* virtio_net
alias fs-overlay overlay
alias rtnl-link-bridge bridge
alias rtnl-link-veth veth
alias crc32c crc32c_generic
alias nfnetlink-subsys-10 nf_tables
alias char-major-116-* snd
"""
MODULES_SOFTDEP = """\
softdep libcrc32c pre: crc32c
softdep snd pre: soundcore
"""
AGENT = {"": ["kernel/drivers/virtio/virtio.ko"], "net": ["kernel/drivers/net/virtio_net.ko"]}
AGENT["overlay"] = ["kernel/fs/overlayfs/overlay.ko"]


def test_workload_modules_each_once_in_order() -> None:
    assert workload_modules({"a": ("x", "y"), "b": ("y", "z")}) == ["x", "y", "z"]
    names = workload_modules()
    assert len(names) == len(set(names))
    assert {"bridge", "veth", "tun", "vxlan", "nf_tables", "nft_chain_nat", "xt_REDIRECT"} <= set(
        names
    )
    assert {"ip_tables", "iptable_nat", "iptable_filter", "ip_vs", "ip_vs_rr", "fuse"} <= set(names)
    assert "overlay" in WORKLOAD_MODULES["filesystems"]


def test_soft_dependencies_are_added_through_their_aliases() -> None:
    index = ModuleIndex.parse(MODULES_DEP, MODULES_ALIAS, MODULES_SOFTDEP)
    # nf_tables needs libcrc32c, whose softdep "crc32c" is crc32c_generic
    assert with_soft_dependencies(index, ["nf_tables", "bridge"]) == [
        "nf_tables",
        "bridge",
        "crc32c_generic",
    ]
    # a softdep nothing provides is left out (modprobe skips it too)
    assert with_soft_dependencies(index, ["snd"]) == ["snd"]
    with pytest.raises(ImageError, match="kernel module 'nosuch' not found"):
        with_soft_dependencies(index, ["nosuch"])


def test_workload_modules_are_compressed_the_agents_kept() -> None:
    paths = image_module_paths(MODULES_DEP, AGENT, ["bridge", "overlay", "nf_tables"])
    assert paths == {
        "kernel/drivers/virtio/virtio.ko": "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/net/virtio_net.ko": "kernel/drivers/net/virtio_net.ko",
        # the agent loads overlay by its list (finit_module on the file): as it is
        "kernel/fs/overlayfs/overlay.ko": "kernel/fs/overlayfs/overlay.ko",
        "kernel/net/llc/llc.ko": "kernel/net/llc/llc.ko.gz",
        "kernel/net/802/stp.ko": "kernel/net/802/stp.ko.gz",
        "kernel/net/bridge/bridge.ko": "kernel/net/bridge/bridge.ko.gz",
        "kernel/lib/libcrc32c.ko": "kernel/lib/libcrc32c.ko.gz",
        "kernel/net/netfilter/nf_tables.ko": "kernel/net/netfilter/nf_tables.ko.gz",
    }


def test_the_index_is_cut_to_the_image_with_its_paths() -> None:
    paths = image_module_paths(MODULES_DEP, AGENT, ["bridge", "nf_tables", "crc32c_generic"])
    files = module_index(paths, MODULES_DEP, MODULES_ALIAS, MODULES_SOFTDEP)
    assert files["modules.dep"].splitlines() == [
        "kernel/drivers/virtio/virtio.ko:",
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko",
        "kernel/fs/overlayfs/overlay.ko:",
        "kernel/net/llc/llc.ko.gz:",
        "kernel/net/802/stp.ko.gz: kernel/net/llc/llc.ko.gz",
        "kernel/net/bridge/bridge.ko.gz: kernel/net/802/stp.ko.gz kernel/net/llc/llc.ko.gz",
        "kernel/lib/libcrc32c.ko.gz:",
        "kernel/crypto/crc32c_generic.ko.gz:",
        "kernel/net/netfilter/nf_tables.ko.gz: kernel/lib/libcrc32c.ko.gz",
    ]
    aliases = files["modules.alias"].splitlines()
    assert aliases[1:] == [
        "alias virtio:d00000001v* virtio_net",
        "alias fs-overlay overlay",
        "alias rtnl-link-bridge bridge",
        "alias crc32c crc32c_generic",
        "alias nfnetlink-subsys-10 nf_tables",
    ]
    assert files["modules.softdep"].splitlines()[1:] == ["softdep libcrc32c pre: crc32c"]
    # what the guest's modprobe makes of it
    index = ModuleIndex.parse(
        *(files[n] for n in ("modules.dep", "modules.alias", "modules.softdep"))
    )
    assert index.resolve("rtnl-link-veth") == []  # veth is not in this image
    assert index.load_order(index.resolve("nfnetlink-subsys-10")) == [
        "crc32c_generic",
        "libcrc32c",
        "nf_tables",
    ]
    assert index.paths["bridge"] == "kernel/net/bridge/bridge.ko.gz"


def test_the_index_refuses_a_module_without_its_dependency() -> None:
    paths = {"kernel/net/bridge/bridge.ko": "kernel/net/bridge/bridge.ko.gz"}
    missing = "needs kernel/net/802/stp.ko, kernel/net/llc/llc.ko, which the image lacks"
    with pytest.raises(ImageError, match=re.escape(missing)):
        module_index(paths, MODULES_DEP, "", "")
    with pytest.raises(ImageError, match=re.escape("modules not in modules.dep: kernel/x.ko")):
        module_index({"kernel/x.ko": "kernel/x.ko"}, MODULES_DEP, "", "")


def test_gzip_module_is_deterministic_gzip() -> None:
    data = bytes(range(256)) * 100
    packed = gzip_module(data)
    assert packed == gzip_module(data)
    assert gzip.decompress(packed) == data
    assert packed[:4] == b"\x1f\x8b\x08\x00" and packed[4:8] == bytes(4)  # no name, time 0


def test_modprobe_script_runs_the_guest_module() -> None:
    script = modprobe_script(GUEST_PYTHON, GUEST_LIB)
    assert script.startswith(f"#!{GUEST_PYTHON} -IS\n")
    assert f'sys.path.append("{GUEST_LIB}/carapace/guest")' in script
    assert "from modprobe import main" in script
    assert PROGRAM.startswith("/usr/lib/")


# -- the host's Debian kernel -------------------------------------------------------------


def debian_moddir() -> Path:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Depends}", "linux-image-amd64"], capture_output=True, text=True
    )
    for dep in r.stdout.split(","):
        name = dep.strip().split(" ")[0]
        if name.startswith("linux-image-") and name != "linux-image-amd64":
            d = Path("/lib/modules") / name.removeprefix("linux-image-")
            if (d / "modules.dep").exists():
                return d
    pytest.skip("linux-image-amd64's modules are not installed")


@pytest.fixture(scope="module")
def image_index() -> tuple[ModuleIndex, dict[str, list[str]]]:
    """The guest's module index as the builder makes it from the host's kernel, and the
    agent's load lists."""
    moddir = debian_moddir()
    texts = [(moddir / n).read_text() for n in ("modules.dep", "modules.alias", "modules.softdep")]
    lists = module_lists(texts[0], GUEST_MODULES, ON_DEMAND_MODULES)
    host = ModuleIndex.parse(*texts)
    paths = image_module_paths(texts[0], lists, with_soft_dependencies(host, workload_modules()))
    files = module_index(paths, *texts)
    index = ModuleIndex.parse(
        files["modules.dep"], files["modules.alias"], files["modules.softdep"]
    )
    return index, lists


#: What the guest kernel asks modprobe for when a workload makes a bridge, a veth pair,
#: iptables-nft's `-t nat -A OUTPUT -p tcp --dport 80 -j REDIRECT` and `-A INPUT -j
#: ACCEPT` (seen in a guest), a vxlan, a tap, an IPVS service, an overlay or fuse mount.
REQUESTS = {
    "rtnl-link-bridge": "bridge",
    "rtnl-link-veth": "veth",
    "rtnl-link-vxlan": "vxlan",
    "net-pf-16-proto-12": "nfnetlink",
    "nfnetlink-subsys-10": "nf_tables",
    "nfnetlink-subsys-11": "nft_compat",
    "nft-chain-2-nat": "nft_chain_nat",
    "nft-expr-nat": "nft_nat",
    "ipt_tcp": "xt_tcpudp",
    "ipt_REDIRECT": "xt_REDIRECT",
    "ipt_MASQUERADE": "xt_MASQUERADE",
    "iptable_nat": "iptable_nat",
    "iptable_filter": "iptable_filter",
    "char-major-10-200": "tun",
    "net-pf-16-proto-16-family-IPVS": "ip_vs",
    "ip_vs_rr": "ip_vs_rr",
    "nfnetlink-subsys-6": "ip_set",
    "fs-overlay": "overlay",
    "fs-fuse": "fuse",
    "crypto-crc32c": "crc32c_generic",
}


def test_the_kernels_requests_resolve_in_the_image(
    image_index: tuple[ModuleIndex, dict[str, list[str]]],
) -> None:
    index, _ = image_index
    for request, module in REQUESTS.items():
        found = index.resolve(request)
        assert module in found, f"{request}: {found}"
        index.load_order(found)  # everything it needs is in the image


def test_every_module_of_the_image_loads_from_its_index(
    image_index: tuple[ModuleIndex, dict[str, list[str]]],
) -> None:
    index, _ = image_index
    assert set(workload_modules()) <= set(index.paths)
    for name in index.paths:
        index.load_order([name])


def test_workload_modules_are_not_loaded_at_start(
    image_index: tuple[ModuleIndex, dict[str, list[str]]],
) -> None:
    index, lists = image_index
    listed = {
        p.rsplit("/", 1)[1].split(".ko")[0].replace("-", "_") for ps in lists.values() for p in ps
    }
    # the agent loads only what its lists name (at start, or a group when it needs it);
    # everything else of the image, compressed, waits for the kernel to ask
    for name, path in index.paths.items():
        assert path.endswith(".ko.gz") == (name not in listed), path
    assert {"bridge", "veth", "nf_tables", "tun", "vxlan", "ip_vs"}.isdisjoint(listed)
