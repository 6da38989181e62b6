"""CPU and memory hotplug of a running pod VM: QMP on the host, onlining in the guest.

One sandbox (1 vCPU, 1024 MiB, headroom to 2 vCPUs and 8 GiB) is shared by the tests
of this module; they run in file order and each leaves it as the next one expects.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import carapace
from carapace.config import Config, load_config
from carapace.errors import InvalidArgument
from carapace.sandbox import Sandbox as AsyncSandbox

T = TypeVar("T")
MAX_VCPUS = 2
MAX_MEMORY_MIB = 8192
PROBE = (
    "echo nproc=$(nproc); echo online=$(cat /sys/devices/system/cpu/online); "
    "grep MemTotal /proc/meminfo"
)


def hotplug_config(enabled: bool = True) -> Config:
    cfg = load_config()
    cfg.hypervisor = dataclasses.replace(
        cfg.hypervisor,
        enable_cpu_memory_hotplug=enabled,
        default_maxvcpus=MAX_VCPUS,
        default_maxmemory=MAX_MEMORY_MIB,
    )
    return cfg


def call(sb: carapace.Sandbox, coro: Coroutine[Any, Any, T]) -> T:
    return sb._call(coro)


def inner(sb: carapace.Sandbox) -> AsyncSandbox:
    return sb._sandbox


def probe(sb: carapace.Sandbox) -> dict[str, str]:
    """What a container sees: nproc, the online CPU list, MemTotal (kB)."""
    r = sb.run(["sh", "-c", PROBE])
    assert r.exit_code == 0, r.stderr
    out = {}
    for line in r.text.splitlines():
        if line.startswith("MemTotal:"):
            out["mem_kb"] = line.split()[1]
        else:
            k, _, v = line.partition("=")
            out[k] = v
    print(out)
    return out


@pytest.fixture(scope="module")
def hotplug_sandbox() -> Iterator[carapace.Sandbox]:
    with carapace.Sandbox(cpus=1, memory="1024M", config=hotplug_config()) as sb:
        yield sb


def test_vm_boots_with_headroom(hotplug_sandbox: carapace.Sandbox) -> None:
    sb = inner(hotplug_sandbox)
    assert (sb.plan.max_vcpus, sb.plan.max_memory_mib) == (MAX_VCPUS, MAX_MEMORY_MIB)
    cmdline = Path(f"/proc/{hotplug_sandbox.qemu_pid}/cmdline").read_bytes().split(b"\0")
    assert b"cpus=1,maxcpus=2,sockets=2,cores=1,threads=1" in cmdline
    assert b"size=1024M,slots=16,maxmem=8192M" in cmdline
    seen = probe(hotplug_sandbox)
    assert seen["nproc"] == "1" and seen["online"] == "0"
    assert 850 * 1024 < int(seen["mem_kb"]) <= 1024 * 1024


def test_vcpu_threads_are_threads_of_qemu(hotplug_sandbox: carapace.Sandbox) -> None:
    vm = inner(hotplug_sandbox).vm
    assert vm is not None
    threads = call(hotplug_sandbox, vm.vcpu_threads())
    assert sorted(threads) == list(range(inner(hotplug_sandbox).vcpus))
    pid = hotplug_sandbox.qemu_pid
    for tid in threads.values():
        assert tid != pid
        assert os.path.isdir(f"/proc/{pid}/task/{tid}"), tid
        # QEMU names its vCPU threads with -name ...,debug-threads=on
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        assert comm.startswith("CPU "), comm


def test_grow_to_two_vcpus_and_4g(hotplug_sandbox: carapace.Sandbox) -> None:
    sb = inner(hotplug_sandbox)
    before = int(probe(hotplug_sandbox)["mem_kb"])
    call(hotplug_sandbox, sb.set_size(2, 4096))
    assert (sb.vcpus, sb.memory_mib) == (2, 4096)
    assert (sb.record.vcpus, sb.record.memory_mib) == (2, 4096)
    seen = probe(hotplug_sandbox)
    assert seen["nproc"] == "2"
    assert seen["online"] == "0-1"
    mem_kb = int(seen["mem_kb"])
    assert mem_kb - before == 3072 * 1024  # every hot-added block is online
    assert abs(mem_kb - 4096 * 1024) < 0.05 * 4096 * 1024
    threads = call(hotplug_sandbox, sb.vm.vcpu_threads())  # type: ignore[union-attr]
    assert sorted(threads) == [0, 1]
    for tid in threads.values():
        assert os.path.isdir(f"/proc/{hotplug_sandbox.qemu_pid}/task/{tid}")


def test_shrink_to_one_vcpu_keeps_memory(hotplug_sandbox: carapace.Sandbox) -> None:
    sb = inner(hotplug_sandbox)
    assert sb.vm is not None
    mem_before = int(probe(hotplug_sandbox)["mem_kb"])
    call(hotplug_sandbox, sb.set_size(1, 1024))
    assert (sb.vcpus, sb.memory_mib) == (1, 4096)  # memory is hot-add only
    seen = probe(hotplug_sandbox)
    assert seen["nproc"] == "1"
    assert seen["online"] == "0"
    assert int(seen["mem_kb"]) == mem_before
    threads = call(hotplug_sandbox, sb.vm.vcpu_threads())
    if sb.vm.can_unplug_vcpus:
        assert list(threads) == [0]
    else:
        # QEMU 7.2 under TCG corrupts its heap on a vCPU hot-remove: the vCPU stays
        # plugged and the guest took it offline (nproc and the online list above)
        assert list(threads) == [0, 1]
        # and it comes back online when the pod needs it again
        call(hotplug_sandbox, sb.set_size(2, 4096))
        assert probe(hotplug_sandbox)["online"] == "0-1"
        call(hotplug_sandbox, sb.set_size(1, 4096))
        assert probe(hotplug_sandbox)["online"] == "0"


@pytest.mark.parametrize(
    ("vcpus", "memory_mib", "message"),
    [
        (3, 4096, "vCPUs 3 is out of range; accepted: 1 (the boot vCPUs) to 2 (max vCPUs)"),
        (0, 4096, "vCPUs 0 is out of range"),
        (2, 8192 + 128, "memory 8320 MiB is out of range; accepted: 1024 MiB"),
        (2, 512, "memory 512 MiB is out of range"),
    ],
)
def test_beyond_the_limits_is_refused(
    hotplug_sandbox: carapace.Sandbox, vcpus: int, memory_mib: int, message: str
) -> None:
    sb = inner(hotplug_sandbox)
    before = (sb.vcpus, sb.memory_mib)
    with pytest.raises(InvalidArgument) as exc:
        call(hotplug_sandbox, sb.set_size(vcpus, memory_mib))
    assert message in str(exc.value)
    assert (sb.vcpus, sb.memory_mib) == before
    seen = probe(hotplug_sandbox)  # the VM still works, unchanged
    assert seen["nproc"] == str(before[0])
    assert 0.95 * 4096 * 1024 < int(seen["mem_kb"]) <= 4096 * 1024


def test_memory_grows_again_in_whole_blocks(hotplug_sandbox: carapace.Sandbox) -> None:
    sb = inner(hotplug_sandbox)
    assert sb.vm is not None
    vcpus = sb.vcpus
    before = int(probe(hotplug_sandbox)["mem_kb"])
    call(hotplug_sandbox, sb.set_size(vcpus, 4096 + 100))  # aligned up to a 128 MiB block
    assert (sb.vcpus, sb.memory_mib) == (vcpus, 4096 + 128)
    seen = probe(hotplug_sandbox)
    assert int(seen["mem_kb"]) - before == 128 * 1024
    assert seen["nproc"] == str(vcpus)
    dimms = call(hotplug_sandbox, sb.vm.memory_dimms())
    assert [(d.id, d.size_mib) for d in dimms] == [("dimm0", 3072), ("dimm1", 128)]


def test_vcpu_hot_remove_mechanism() -> None:
    """device_del of a hot-added vCPU: the guest ejects it, QEMU reports the slot empty.
    Under TCG this VM is thrown away right after (QEMU's heap is corrupt by then)."""
    with carapace.Sandbox(cpus=1, memory="1G", config=hotplug_config()) as box:
        sb = inner(box)
        assert sb.vm is not None
        sb.vm.unplug_under_tcg = True
        call(box, sb.set_size(2, 1024))
        assert box.run(["nproc"]).text == "2\n"
        call(box, sb.set_size(1, 1024))
        assert sb.vcpus == 1
        r = box.run(["sh", "-c", "nproc; cat /sys/devices/system/cpu/online"])
        assert r.text == "1\n0\n"
        assert list(call(box, sb.vm.vcpu_threads())) == [0]
        slots = call(box, sb.vm.cpu_slots())
        assert [s.plugged for s in slots] == [True, False]


def test_hotplug_disabled_is_refused() -> None:
    with carapace.Sandbox(cpus=1, memory="1G", config=hotplug_config(False)) as box:
        sb = inner(box)
        assert (sb.plan.max_vcpus, sb.plan.max_memory_mib) == (1, 1024)
        cmdline = Path(f"/proc/{box.qemu_pid}/cmdline").read_bytes().split(b"\0")
        assert b"maxcpus" not in b" ".join(cmdline) and b"maxmem" not in b" ".join(cmdline)
        with pytest.raises(InvalidArgument, match="hotplug is disabled"):
            call(box, sb.set_size(2, 1024))
        assert (sb.vcpus, sb.memory_mib) == (1, 1024)
        assert box.run(["nproc"]).text == "1\n"
