"""CPU/memory hotplug planning on recorded QMP replies (carapace.hypervisor.qemu.hotplug)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from carapace.errors import HypervisorError, InvalidArgument
from carapace.hypervisor.base import align_up, memory_headroom_mib
from carapace.hypervisor.qemu import hotplug
from carapace.hypervisor.qemu.hotplug import (
    CpuSlot,
    Dimm,
    cpu_device_add_args,
    cpu_device_id,
    next_memory_index,
    parse_hotpluggable_cpus,
    parse_memory_devices,
    plan_memory_add,
    plan_vcpus,
    vcpu_threads,
)


def slot(socket: int, qom_path: str | None = None) -> dict[str, object]:
    entry: dict[str, object] = {
        "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": socket},
        "vcpus-count": 1,
        "type": "max-x86_64-cpu",
    }
    if qom_path:
        entry["qom-path"] = qom_path
    return entry


# query-hotpluggable-cpus of QEMU 7.2, -smp cpus=1,maxcpus=4,sockets=4,cores=1,threads=1,
# after `device_add max-x86_64-cpu id=cpu-1 socket-id=1 core-id=0 thread-id=0`
HOTPLUGGABLE = [
    slot(3),
    slot(2),
    slot(1, "/machine/peripheral/cpu-1"),
    slot(0, "/machine/unattached/device[0]"),
]
# query-cpus-fast of the same VM
CPUS_FAST = [
    {
        "thread-id": 10455,
        "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0},
        "qom-path": "/machine/unattached/device[0]",
        "cpu-index": 0,
        "target": "x86_64",
    },
    {
        "thread-id": 10456,
        "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 1},
        "qom-path": "/machine/peripheral/cpu-1",
        "cpu-index": 1,
        "target": "x86_64",
    },
]
# query-memory-devices after object-add mem0 (128 MiB) + device_add pc-dimm dimm0
MEMORY_DEVICES = [
    {
        "type": "dimm",
        "data": {
            "memdev": "/objects/mem0",
            "hotplugged": True,
            "addr": 4294967296,
            "hotpluggable": True,
            "size": 134217728,
            "slot": 0,
            "node": 0,
            "id": "dimm0",
        },
    }
]


def test_slots_are_sorted_by_socket_and_know_who_plugged_them() -> None:
    slots = parse_hotpluggable_cpus(HOTPLUGGABLE)
    assert [s.props["socket-id"] for s in slots] == [0, 1, 2, 3]
    assert [s.plugged for s in slots] == [True, True, False, False]
    # the boot vCPU is not ours; the one we added is
    assert [s.device_id for s in slots] == [None, "cpu-1", None, None]
    assert slots[2].type == "max-x86_64-cpu"


def test_grow_picks_empty_slots_in_order() -> None:
    plan = plan_vcpus(parse_hotpluggable_cpus(HOTPLUGGABLE), 4, boot_vcpus=1)
    assert [s.props["socket-id"] for s in plan.add] == [2, 3]
    assert plan.remove == []
    plan = plan_vcpus(parse_hotpluggable_cpus(HOTPLUGGABLE), 3, boot_vcpus=1)
    assert [s.props["socket-id"] for s in plan.add] == [2]


def test_device_add_arguments_come_from_the_slot() -> None:
    empty = parse_hotpluggable_cpus(HOTPLUGGABLE)[2]
    assert cpu_device_add_args(empty) == {
        "driver": "max-x86_64-cpu",
        "id": "cpu-2",
        "socket-id": 2,
        "core-id": 0,
        "thread-id": 0,
    }


def test_cpu_ids() -> None:
    assert cpu_device_id({"socket-id": 5, "core-id": 0, "thread-id": 0}) == "cpu-5"
    assert cpu_device_id({"socket-id": 1, "core-id": 2, "thread-id": 1}) == "cpu-1-2-1"


def test_same_count_is_nothing_to_do() -> None:
    plan = plan_vcpus(parse_hotpluggable_cpus(HOTPLUGGABLE), 2, boot_vcpus=1)
    assert (plan.add, plan.remove) == ([], [])


def test_shrink_removes_our_vcpus_last_added_first() -> None:
    reply = [slot(3, "/machine/peripheral/cpu-3"), *HOTPLUGGABLE[1:]]
    reply[1] = slot(2, "/machine/peripheral/cpu-2")
    slots = parse_hotpluggable_cpus(reply)
    assert plan_vcpus(slots, 2, boot_vcpus=1).remove == ["cpu-3", "cpu-2"]
    assert plan_vcpus(slots, 1, boot_vcpus=1).remove == ["cpu-3", "cpu-2", "cpu-1"]


def test_never_below_boot_nor_above_maxcpus() -> None:
    slots = parse_hotpluggable_cpus(HOTPLUGGABLE)
    with pytest.raises(InvalidArgument) as exc:
        plan_vcpus(slots, 0, boot_vcpus=1)
    assert "0 is out of range; accepted: 1 (the boot vCPUs) to 4" in str(exc.value)
    with pytest.raises(InvalidArgument, match="5 is out of range"):
        plan_vcpus(slots, 5, boot_vcpus=1)
    with pytest.raises(InvalidArgument, match="1 is out of range; accepted: 2"):
        plan_vcpus(slots, 1, boot_vcpus=2)


def test_a_vcpu_someone_else_plugged_is_not_removed() -> None:
    # plugged by hand (another id): we may not remove it, so we cannot go down
    reply = [slot(3), slot(2), slot(1, "/machine/peripheral/mine"), HOTPLUGGABLE[3]]
    with pytest.raises(InvalidArgument, match="only 0 were hot-added by carapace"):
        plan_vcpus(parse_hotpluggable_cpus(reply), 1, boot_vcpus=1)


def test_multi_vcpu_slots_are_refused() -> None:
    entry = slot(0)
    entry["vcpus-count"] = 2
    with pytest.raises(HypervisorError, match="holds 2 vCPUs"):
        parse_hotpluggable_cpus([entry])
    with pytest.raises(HypervisorError, match="expected a list"):
        parse_hotpluggable_cpus({"error": 1})


def test_vcpu_threads() -> None:
    assert vcpu_threads(CPUS_FAST) == {0: 10455, 1: 10456}
    with pytest.raises(HypervisorError, match="unexpected reply"):
        vcpu_threads([{"cpu-index": 0}])


@pytest.mark.parametrize(
    ("mib", "aligned"), [(1, 128), (128, 128), (129, 256), (3072, 3072), (100, 128)]
)
def test_align_up_to_memory_blocks(mib: int, aligned: int) -> None:
    assert align_up(mib) == aligned


@pytest.mark.parametrize(
    ("boot", "maximum", "headroom"),
    [(1024, 0, 0), (1024, 1024, 0), (1024, 1100, 0), (1024, 1152, 128), (1000, 8192, 7168)],
)
def test_memory_headroom_is_whole_blocks(boot: int, maximum: int, headroom: int) -> None:
    assert memory_headroom_mib(boot, maximum) == headroom


def test_memory_devices_and_next_index() -> None:
    dimms = parse_memory_devices(MEMORY_DEVICES)
    assert dimms == [Dimm("dimm0", 128, 0)]
    assert next_memory_index(dimms) == 1
    assert next_memory_index([]) == 0
    assert next_memory_index([Dimm("dimm0", 128, 0), Dimm("dimm7", 128, 1)]) == 8
    # a virtio-mem device is not a DIMM of ours
    assert parse_memory_devices([{"type": "virtio-mem", "data": {}}]) == []


def test_memory_add_plan_and_its_qmp_arguments() -> None:
    add = plan_memory_add(3000, parse_memory_devices(MEMORY_DEVICES), 1024, 8192 - 1024)
    assert (add.index, add.size_mib) == (1, 3072)
    assert add.object_add_args() == {
        "qom-type": "memory-backend-ram",
        "id": "mem1",
        "size": 3072 << 20,
    }
    assert add.device_add_args() == {"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"}
    # with virtio-fs the daemon maps guest memory: a hot-added DIMM is a shared memfd too
    assert replace(add, shared=True).object_add_args() == {
        "qom-type": "memory-backend-memfd",
        "id": "mem1",
        "size": 3072 << 20,
        "share": True,
    }


def test_memory_add_above_maxmem_is_refused() -> None:
    dimms = [Dimm("dimm0", 6144, 0)]
    # 1024 boot + 6144 plugged: 1024 left of 8192
    assert plan_memory_add(1024, dimms, 1024, 8192 - 1024).size_mib == 1024
    with pytest.raises(InvalidArgument) as exc:
        plan_memory_add(1025, dimms, 1024, 8192 - 1024)
    msg = str(exc.value)
    assert "1152 MiB (1025 MiB aligned up to 128 MiB blocks)" in msg
    assert "1024 MiB left; the VM has 7168 MiB and can grow to 8192 MiB" in msg


def test_memory_add_without_headroom_or_slots_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="without memory headroom"):
        plan_memory_add(128, [], 1024, 0)
    full = [Dimm(f"dimm{i}", 128, i) for i in range(hotplug.MEMORY_SLOTS)]
    with pytest.raises(InvalidArgument, match="all 16 DIMM slots are in use"):
        plan_memory_add(128, full, 1024, 65536 - 1024)
    with pytest.raises(InvalidArgument, match="accepted: a positive size"):
        plan_memory_add(0, [], 1024, 8192 - 1024)


def test_cpu_slot_order_defaults() -> None:
    assert CpuSlot("t", {"socket-id": 2}, None).order == (2, 0, 0)
