"""The guest's modprobe (carapace.guest.modprobe): what a name the kernel asks for
resolves to, the order modules load in, its command line, and what it does with a
module index in a directory. Nothing here loads a module: the loader is replaced."""

from __future__ import annotations

import errno
import fnmatch
import os
from pathlib import Path

import pytest

from carapace.guest import modprobe, sysinit
from carapace.guest.modprobe import ModuleIndex, glob_match, module_name, normalize, parse_args

MODULES_DEP = """\
kernel/net/llc/llc.ko:
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/bridge/bridge.ko.gz: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/lib/libcrc32c.ko.gz:
kernel/crypto/crc32c_generic.ko.gz:
kernel/arch/x86/crypto/crc32c-intel.ko.gz:
kernel/net/netfilter/nfnetlink.ko.gz:
kernel/net/netfilter/nf_tables.ko.gz: kernel/net/netfilter/nfnetlink.ko.gz \
kernel/lib/libcrc32c.ko.gz
kernel/net/netfilter/x_tables.ko.gz:
kernel/net/netfilter/xt_LOG.ko.gz: kernel/net/netfilter/x_tables.ko.gz
kernel/net/netfilter/nf_log_syslog.ko.gz:
kernel/drivers/virtio/virtio_net.ko:
kernel/fs/overlayfs/overlay.ko:
"""
MODULES_ALIAS = """\
# Aliases extracted from modules themselves.
alias rtnl-link-bridge bridge
alias net-pf-16-proto-12 nfnetlink
alias nfnetlink-subsys-10 nf_tables
alias crypto-crc32c crc32c_intel
alias crc32c crc32c_intel
alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
alias ipt_LOG xt_LOG
alias fs-overlay overlay
alias virtio:d00000001v* virtio_net
alias pci:v00001AF4d0000[1-9]000sv*sd*bc*sc*i* virtio_net
alias nosuch-alias module_not_shipped
not an alias line
"""
MODULES_SOFTDEP = """\
# Soft dependencies extracted from modules themselves.
softdep libcrc32c pre: crc32c
softdep xt_LOG pre: nf_log_syslog
softdep bridge post: not_shipped
"""


@pytest.fixture
def index() -> ModuleIndex:
    return ModuleIndex.parse(MODULES_DEP, MODULES_ALIAS, MODULES_SOFTDEP)


def test_module_names_from_paths() -> None:
    assert module_name("kernel/net/bridge/bridge.ko.gz") == "bridge"
    assert module_name("kernel/arch/x86/crypto/crc32c-intel.ko") == "crc32c_intel"
    assert module_name("kernel/fs/fuse/fuse.ko.xz") == "fuse"


def test_normalize_reads_dash_as_underscore_outside_brackets() -> None:
    assert normalize("rtnl-link-bridge") == "rtnl_link_bridge"
    assert normalize("ipt_REDIRECT") == "ipt_REDIRECT"
    assert normalize("pci:v-[a-z]d-[0-9]") == "pci:v_[a-z]d_[0-9]"


@pytest.mark.parametrize(
    "pattern",
    ["virtio:d00000001v*", "a?c", "[!x]bc", "[a-c]b*", "*", "", "abc", "a[b-]c", "*d*", "[^a]*"],
)
@pytest.mark.parametrize("name", ["virtio:d00000001v00001AF4", "abc", "xbc", "", "cbd", "a-c"])
def test_glob_match_agrees_with_fnmatch(name: str, pattern: str) -> None:
    assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern.replace("[^", "[!"))


def test_resolve_a_module_name_an_alias_and_a_glob(index: ModuleIndex) -> None:
    assert index.resolve("bridge") == ["bridge"]
    assert index.resolve("rtnl-link-bridge") == ["bridge"]
    assert index.resolve("crc32c-intel") == ["crc32c_intel"]  # a name, "-" read as "_"
    assert index.resolve("crypto-crc32c") == ["crc32c_intel", "crc32c_generic"]
    assert index.resolve("net-pf-16-proto-12") == ["nfnetlink"]
    assert index.resolve("virtio:d00000001v00001AF4") == ["virtio_net"]
    assert index.resolve("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00") == ["virtio_net"]


def test_resolve_what_the_image_lacks(index: ModuleIndex) -> None:
    assert index.resolve("rtnl-link-vxlan") == []
    assert index.resolve("nosuch-alias") == []  # its module is not in modules.dep
    assert index.resolve("crypto-hmac(sha256)") == []


def test_load_order_puts_dependencies_first_each_once(index: ModuleIndex) -> None:
    assert index.load_order(["bridge"]) == ["llc", "stp", "bridge"]
    assert index.load_order(["stp", "bridge", "llc"]) == ["llc", "stp", "bridge"]


def test_load_order_with_soft_dependencies(index: ModuleIndex) -> None:
    # pre: an alias standing for two modules, before the module; a missing post: skipped
    assert index.load_order(["nf_tables"]) == [
        "nfnetlink",
        "crc32c_intel",
        "crc32c_generic",
        "libcrc32c",
        "nf_tables",
    ]
    assert index.load_order(["xt_LOG"]) == ["nf_log_syslog", "x_tables", "xt_LOG"]
    assert index.load_order(["bridge"])[-1] == "bridge"


def test_load_order_refuses_a_cut_index_and_a_cycle() -> None:
    cut = ModuleIndex.parse("kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(LookupError, match=r"module b is not in modules\.dep"):
        cut.load_order(["a"])
    cycle = ModuleIndex.parse("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(LookupError, match="cycle through a"):
        cycle.load_order(["a"])
    # soft dependencies both ways are no cycle
    soft = ModuleIndex.parse(
        "kernel/a.ko:\nkernel/b.ko:\n", "", "softdep a pre: b\nsoftdep b pre: a\n"
    )
    assert soft.load_order(["a"]) == ["b", "a"]


def test_dependencies_are_transitive(index: ModuleIndex) -> None:
    assert index.dependencies("bridge") == {"stp", "llc"}
    assert index.dependencies("llc") == set()


def test_parse_args_as_the_kernel_calls() -> None:
    opts = parse_args(["-q", "--", "rtnl-link-bridge"])
    assert opts.quiet and opts.names == ["rtnl-link-bridge"]
    opts = parse_args(["-a", "-vn", "bridge", "veth"])
    assert opts.verbose and opts.dry_run and opts.names == ["bridge", "veth"]
    assert parse_args(["--show-depends", "bridge"]).show_depends


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-r", "bridge"], "option '-r' is not supported; accepted: -q"),
        (["--remove", "bridge"], "option '--remove' is not supported"),
        (["bridge", "stp_max=1"], "module parameters 'stp_max=1' are not supported"),
        (["-q"], "no module name given"),
    ],
)
def test_parse_args_refuses(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


@pytest.fixture
def moddir(tmp_path: Path) -> Path:
    d = tmp_path / "lib/modules/6.1.0-test"
    d.mkdir(parents=True)
    (d / "modules.dep").write_text(MODULES_DEP)
    (d / "modules.alias").write_text(MODULES_ALIAS)
    (d / "modules.softdep").write_text(MODULES_SOFTDEP)
    return d


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Module files ``main`` loads (the loader records instead of loading)."""
    done: list[str] = []
    monkeypatch.setattr(modprobe, "load_module", lambda path, params="": done.append(path))
    return done


def run(moddir: Path, argv: list[str], sysfs: Path, kmsg: Path) -> int:
    """modprobe's main on these files; ``kmsg`` stands for /dev/kmsg (which exists)."""
    kmsg.touch()
    return modprobe.main(argv, moddir=str(moddir), sysfs=str(sysfs), kmsg=str(kmsg))


def test_main_loads_what_a_request_resolves_to(
    moddir: Path, tmp_path: Path, loads: list[str]
) -> None:
    sysfs = tmp_path / "sys/module"
    (sysfs / "llc").mkdir(parents=True)
    (sysfs / "llc" / "initstate").write_text("live\n")  # loaded already: skipped
    (sysfs / "ip_tables").mkdir()  # built in (no initstate): no module of ours anyway
    kmsg = tmp_path / "kmsg"
    assert run(moddir, ["-q", "--", "rtnl-link-bridge"], sysfs, kmsg) == 0
    assert loads == [f"{moddir}/kernel/net/802/stp.ko", f"{moddir}/kernel/net/bridge/bridge.ko.gz"]
    record = kmsg.read_text()
    assert record.startswith("<6>carapace-modprobe: rtnl-link-bridge: loaded stp bridge in ")


def test_main_says_when_nothing_provides_a_name(
    moddir: Path, tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    kmsg = tmp_path / "kmsg"
    assert run(moddir, ["-q", "--", "crypto-hmac(sha256)"], tmp_path, kmsg) == 1
    assert loads == []
    assert "crypto-hmac(sha256): no module in " in kmsg.read_text()
    assert capsys.readouterr().err == ""  # -q
    assert run(moddir, ["rtnl-link-vxlan"], tmp_path, kmsg) == 1
    assert "modprobe: rtnl-link-vxlan: no module in" in capsys.readouterr().err


def test_main_show_depends_loads_nothing(
    moddir: Path, tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    kmsg = tmp_path / "kmsg"
    assert run(moddir, ["-D", "nfnetlink-subsys-10"], tmp_path, kmsg) == 0
    assert loads == [] and kmsg.read_text() == ""
    assert capsys.readouterr().out.splitlines() == [
        f"insmod {moddir}/kernel/net/netfilter/nfnetlink.ko.gz",
        f"insmod {moddir}/kernel/arch/x86/crypto/crc32c-intel.ko.gz",
        f"insmod {moddir}/kernel/crypto/crc32c_generic.ko.gz",
        f"insmod {moddir}/kernel/lib/libcrc32c.ko.gz",
        f"insmod {moddir}/kernel/net/netfilter/nf_tables.ko.gz",
    ]


def test_main_skips_a_failing_soft_dependency_but_not_a_hard_one(
    moddir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done: list[str] = []

    def load(path: str, params: str = "") -> None:
        if "crc32c-intel" in path or "x_tables" in path:
            raise OSError(errno.ENODEV, f"loading {path}: No such device")
        done.append(os.path.basename(path))

    monkeypatch.setattr(modprobe, "load_module", load)
    kmsg = tmp_path / "kmsg"
    assert run(moddir, ["-q", "nf_tables"], tmp_path, kmsg) == 0
    assert done == ["nfnetlink.ko.gz", "crc32c_generic.ko.gz", "libcrc32c.ko.gz", "nf_tables.ko.gz"]
    assert "(a soft dependency: skipped)" in kmsg.read_text()
    done.clear()
    assert run(moddir, ["-q", "ipt_LOG"], tmp_path, kmsg) == 1  # x_tables is a hard one
    assert done == ["nf_log_syslog.ko.gz"]
    lines = kmsg.read_text().splitlines()
    assert (
        f"<4>carapace-modprobe: ipt_LOG: loading {moddir}/kernel/net/netfilter/x_tables"
        in lines[-2]
    )
    assert lines[-1].startswith("<6>carapace-modprobe: ipt_LOG: loaded nf_log_syslog in")


def test_main_without_a_module_index(tmp_path: Path, loads: list[str]) -> None:
    kmsg = tmp_path / "kmsg"
    assert run(tmp_path / "nowhere", ["-q", "bridge"], tmp_path, kmsg) == 1
    assert "cannot read" in kmsg.read_text() and loads == []


def test_main_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, ["-r", "bridge"], tmp_path, tmp_path / "kmsg") == 1
    assert "option '-r' is not supported" in capsys.readouterr().err


def test_a_module_that_does_not_inflate_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bridge.ko.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    with pytest.raises(OSError, match=f"loading {bad}: cannot inflate it") as e:
        modprobe.load_module(str(bad))
    assert e.value.errno == errno.ENOEXEC


def test_the_agent_names_the_image_modprobe_to_the_kernel(tmp_path: Path) -> None:
    program, setting = tmp_path / "modprobe", tmp_path / "kernel.modprobe"
    setting.write_text("/sbin/modprobe\n")
    sysinit.set_modprobe(str(program), str(setting))  # no program in the image: left alone
    assert setting.read_text() == "/sbin/modprobe\n"
    program.write_text("#!/usr/bin/python3.11 -IS\n")
    sysinit.set_modprobe(str(program), str(setting))
    assert setting.read_text() == str(program)
    assert modprobe.PROGRAM != "/sbin/modprobe"  # the kernel's default runs at boot
