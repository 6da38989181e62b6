"""A pod's memory footprint on the QEMU command line: the TCG translation cache size and
the free page reporting balloon, and their configuration keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from carapace.config import (
    DEFAULT_TCG_TB_SIZE_MIB,
    MAX_TCG_TB_SIZE_MIB,
    HypervisorConfig,
    parse_config,
)
from carapace.errors import InvalidArgument
from carapace.hypervisor import VMSpec
from carapace.hypervisor.qemu.channels import ChannelFds
from carapace.hypervisor.qemu.cmdline import qemu_argv

QEMU = "/usr/bin/qemu-system-x86_64"
FDS = ChannelFds(agent=21, qmp=22, console=23)


def make_spec(tmp_path: Path, **kw: object) -> VMSpec:
    spec = VMSpec(
        name="sb-1",
        run_dir=tmp_path / "run",
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        vcpus=1,
        memory_mib=1024,
        accel="tcg",
        shared_dir=tmp_path / "shared",
    )
    return replace(spec, **kw)  # type: ignore[arg-type]


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def balloons(argv: list[str]) -> list[str]:
    return [d for d in values(argv, "-device") if d.startswith("virtio-balloon")]


# -- the TCG translation cache --------------------------------------------------------------


def test_tcg_gets_its_translation_cache_size_in_an_accel_option(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, tcg_tb_size_mib=64), FDS)
    assert values(argv, "-accel") == ["tcg,tb-size=64"]
    # QEMU refuses "-machine accel=" together with "-accel"
    assert "accel=" not in values(argv, "-machine")[0]


def test_tcg_without_a_size_leaves_qemus_default(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path), FDS)
    assert values(argv, "-accel") == ["tcg"]


def test_vcpu_headroom_keeps_qemus_default_cache(tmp_path: Path) -> None:
    """A hot-added vCPU needs a free region of the cache (QEMU 7.2 aborts without one):
    VMs that can grow keep QEMU's large default."""
    grows = make_spec(tmp_path, tcg_tb_size_mib=64, vcpus=1, max_vcpus=2)
    assert values(qemu_argv(QEMU, grows, FDS), "-accel") == ["tcg"]
    # memory headroom alone does not matter
    fixed = make_spec(tmp_path, tcg_tb_size_mib=64, vcpus=2, max_vcpus=2, max_memory_mib=4096)
    assert values(qemu_argv(QEMU, fixed, FDS), "-accel") == ["tcg,tb-size=64"]


def test_kvm_ignores_the_translation_cache_size(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, accel="kvm", tcg_tb_size_mib=64), FDS)
    assert "-accel" not in argv
    assert values(argv, "-machine") == ["q35,accel=kvm"]
    assert not any("tb-size" in a for a in argv)


# -- free page reporting ----------------------------------------------------------------


def test_free_page_reporting_adds_a_reporting_balloon(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, free_page_reporting=True), FDS)
    assert balloons(argv) == ["virtio-balloon-pci,id=balloon0,free-page-reporting=on"]


def test_no_balloon_when_free_page_reporting_is_off(tmp_path: Path) -> None:
    assert balloons(qemu_argv(QEMU, make_spec(tmp_path), FDS)) == []


def test_no_reporting_into_a_file_other_vms_map(tmp_path: Path) -> None:
    """A reported page of file-backed RAM is a hole punched into the file: never for RAM
    mapped private from a file (a template's clone), which other clones map too."""
    ram = tmp_path / "template.ram"
    clone = make_spec(tmp_path, free_page_reporting=True, memory_file=ram)
    assert balloons(qemu_argv(QEMU, clone, FDS)) == []
    # the VM that owns the file (the template itself) may report
    owner = replace(clone, memory_file_shared=True)
    assert len(balloons(qemu_argv(QEMU, owner, FDS))) == 1


# -- configuration ----------------------------------------------------------------------


def test_defaults() -> None:
    hv = HypervisorConfig()
    assert hv.tcg_tb_size_mib == DEFAULT_TCG_TB_SIZE_MIB > 0
    assert hv.reclaim_guest_freed_memory is True


def test_keys_are_read() -> None:
    cfg = parse_config("[hypervisor]\ntcg_tb_size_mib = 0\nreclaim_guest_freed_memory = false\n")
    assert cfg.hypervisor.tcg_tb_size_mib == 0
    assert cfg.hypervisor.reclaim_guest_freed_memory is False
    cfg = parse_config(f"[hypervisor]\ntcg_tb_size_mib = {MAX_TCG_TB_SIZE_MIB}\n")
    assert cfg.hypervisor.tcg_tb_size_mib == MAX_TCG_TB_SIZE_MIB


@pytest.mark.parametrize("bad", [-1, MAX_TCG_TB_SIZE_MIB + 1, 1 << 40])
def test_tb_size_out_of_range_is_refused(bad: int) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_config(f"[hypervisor]\ntcg_tb_size_mib = {bad}\n", source="c.toml")
    msg = str(e.value)
    assert "c.toml [hypervisor] tcg_tb_size_mib" in msg and str(bad) in msg
    assert f"1 to {MAX_TCG_TB_SIZE_MIB}" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('tcg_tb_size_mib = "64"', "expected a int"),
        ("tcg_tb_size_mib = 64.5", "expected a int"),
        ('reclaim_guest_freed_memory = "yes"', "expected a bool"),
        ("reclaim_guest_freed_memory = 1", "expected a bool"),
    ],
)
def test_wrong_types_are_refused(text: str, expected: str) -> None:
    with pytest.raises(InvalidArgument, match=expected):
        parse_config(f"[hypervisor]\n{text}\n")
