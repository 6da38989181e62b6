"""CPU and memory hotplug of a running VM: the pure part (QMP replies in, plans out).

vCPUs are hot-added with ``device_add`` into the empty slots ``query-hotpluggable-cpus``
lists (one socket per vCPU, see ``cmdline.smp_arg``) and hot-removed with
``device_del``, only the ones we added. Memory is hot-added as ``pc-dimm`` devices,
each backed by a ``memory-backend-ram`` object, and never removed. ``QemuVM`` runs
the QMP commands; everything that decides what to run lives here, so it is unit
tested on recorded replies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carapace.errors import HypervisorError, InvalidArgument
from carapace.hypervisor.base import MEMORY_BLOCK_MIB, align_up

#: DIMM slots a VM with memory headroom gets (each hot-add takes one).
MEMORY_SLOTS = 16
#: ``device_add`` ids of the vCPUs we hot-add start with this; QEMU puts devices with
#: an id under /machine/peripheral/<id>.
CPU_ID_PREFIX = "cpu-"
PERIPHERAL = "/machine/peripheral/"


# -- vCPUs ------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSlot:
    """One entry of ``query-hotpluggable-cpus``: where a vCPU can be (or is) plugged."""

    type: str  # the CPU device driver, e.g. max-x86_64-cpu
    props: dict[str, int]  # socket-id, core-id, thread-id (and node-id)
    qom_path: str | None  # None: the slot is empty

    @property
    def plugged(self) -> bool:
        return self.qom_path is not None

    @property
    def device_id(self) -> str | None:
        """Our ``device_add`` id if we hot-added the vCPU in this slot, else None
        (a boot vCPU lives under /machine/unattached)."""
        if self.qom_path and self.qom_path.startswith(PERIPHERAL + CPU_ID_PREFIX):
            return self.qom_path[len(PERIPHERAL) :]
        return None

    @property
    def order(self) -> tuple[int, int, int]:
        p = self.props
        return (p.get("socket-id", 0), p.get("core-id", 0), p.get("thread-id", 0))


def parse_hotpluggable_cpus(reply: object) -> list[CpuSlot]:
    """The slots of a ``query-hotpluggable-cpus`` reply, in topology order (QEMU lists
    them from the last socket down)."""
    if not isinstance(reply, list):
        raise HypervisorError(f"query-hotpluggable-cpus: expected a list, got {reply!r}")
    slots = []
    for entry in reply:
        if not isinstance(entry, dict) or "type" not in entry or "props" not in entry:
            raise HypervisorError(f"query-hotpluggable-cpus: unexpected entry {entry!r}")
        if entry.get("vcpus-count", 1) != 1:
            raise HypervisorError(
                f"query-hotpluggable-cpus: a slot holds {entry['vcpus-count']} vCPUs; "
                "carapace plugs one vCPU per socket (-smp ...,cores=1,threads=1)"
            )
        props = {str(k): int(v) for k, v in entry["props"].items()}
        slots.append(CpuSlot(str(entry["type"]), props, entry.get("qom-path")))
    return sorted(slots, key=lambda s: s.order)


def cpu_device_id(props: dict[str, int]) -> str:
    """Our id for the vCPU plugged with ``props``: cpu-<socket> (one vCPU per socket);
    with several cores or threads per socket cpu-<socket>-<core>-<thread>."""
    socket, core, thread = (props.get(k, 0) for k in ("socket-id", "core-id", "thread-id"))
    if core or thread:
        return f"{CPU_ID_PREFIX}{socket}-{core}-{thread}"
    return f"{CPU_ID_PREFIX}{socket}"


def cpu_device_add_args(slot: CpuSlot) -> dict[str, Any]:
    """The arguments of the ``device_add`` that plugs a vCPU into the empty ``slot``."""
    args: dict[str, Any] = {"driver": slot.type, "id": cpu_device_id(slot.props)}
    # node-id is listed by QEMU, but only when the VM has NUMA nodes may it be given
    args.update({k: v for k, v in slot.props.items() if k != "node-id"})
    return args


@dataclass(frozen=True)
class CpuPlan:
    add: list[CpuSlot]  # empty slots to plug, in order
    remove: list[str]  # device ids of hot-added vCPUs to unplug, last one first


def plan_vcpus(slots: list[CpuSlot], target: int, boot_vcpus: int) -> CpuPlan:
    """What to plug or unplug to have exactly ``target`` vCPUs. Only vCPUs we
    hot-added are removed (the last added first), never a boot vCPU."""
    if target < boot_vcpus or target > len(slots):
        raise InvalidArgument(
            f"vCPUs: {target} is out of range; accepted: {boot_vcpus} (the boot vCPUs) to "
            f"{len(slots)} (the VM's maxcpus)"
        )
    plugged = [s for s in slots if s.plugged]
    if target > len(plugged):
        empty = [s for s in slots if not s.plugged]
        return CpuPlan(add=empty[: target - len(plugged)], remove=[])
    ours = [s.device_id for s in reversed(plugged) if s.device_id is not None]
    excess = len(plugged) - target
    if excess > len(ours):
        raise InvalidArgument(
            f"vCPUs: cannot go down to {target}: {len(plugged)} are plugged and only "
            f"{len(ours)} were hot-added by carapace"
        )
    return CpuPlan(add=[], remove=ours[:excess])


def vcpu_threads(reply: object) -> dict[int, int]:
    """cpu-index -> host thread id, from a ``query-cpus-fast`` reply."""
    if not isinstance(reply, list):
        raise HypervisorError(f"query-cpus-fast: expected a list, got {reply!r}")
    try:
        return {int(c["cpu-index"]): int(c["thread-id"]) for c in reply}
    except (KeyError, TypeError, ValueError) as e:
        raise HypervisorError(f"query-cpus-fast: unexpected reply {reply!r}") from e


# -- memory -----------------------------------------------------------------------


@dataclass(frozen=True)
class Dimm:
    """One entry of ``query-memory-devices`` of type dimm."""

    id: str
    size_mib: int
    slot: int


def parse_memory_devices(reply: object) -> list[Dimm]:
    if not isinstance(reply, list):
        raise HypervisorError(f"query-memory-devices: expected a list, got {reply!r}")
    dimms = []
    for entry in reply:
        if not isinstance(entry, dict) or entry.get("type") != "dimm":
            continue  # virtio-mem, nvdimm ...: not ours
        data = entry.get("data", {})
        dimms.append(Dimm(str(data.get("id", "")), int(data["size"]) >> 20, int(data["slot"])))
    return dimms


def next_memory_index(dimms: list[Dimm]) -> int:
    """N of the next mem<N> / dimm<N> pair: one more than the highest in use."""
    used = [int(d.id[4:]) for d in dimms if d.id.startswith("dimm") and d.id[4:].isdigit()]
    return max(used, default=-1) + 1


@dataclass(frozen=True)
class MemoryAdd:
    """One hot-add: the backend object and the DIMM device that uses it."""

    index: int
    size_mib: int
    #: Back it by a shared memfd (a vhost-user daemon maps guest memory).
    shared: bool = False

    @property
    def backend_id(self) -> str:
        return f"mem{self.index}"

    @property
    def dimm_id(self) -> str:
        return f"dimm{self.index}"

    def object_add_args(self) -> dict[str, Any]:
        if self.shared:
            return {
                "qom-type": "memory-backend-memfd",
                "id": self.backend_id,
                "size": self.size_mib << 20,
                "share": True,
            }
        return {
            "qom-type": "memory-backend-ram",
            "id": self.backend_id,
            "size": self.size_mib << 20,
        }

    def device_add_args(self) -> dict[str, Any]:
        return {"driver": "pc-dimm", "id": self.dimm_id, "memdev": self.backend_id}


def plan_memory_add(
    mib: int, dimms: list[Dimm], boot_mib: int, headroom: int, slots: int = MEMORY_SLOTS
) -> MemoryAdd:
    """The hot-add of ``mib`` MiB (aligned up to the guest's memory block size) as one
    DIMM, checked against the free DIMM slots and the VM's ``headroom`` (MiB that can
    be hot-added above ``boot_mib``, see ``VMSpec.memory_headroom_mib``)."""
    if mib <= 0:
        raise InvalidArgument(f"memory to hot-add: {mib} MiB; accepted: a positive size")
    size = align_up(mib)
    if headroom == 0:
        raise InvalidArgument(
            f"memory hotplug: the VM was started without memory headroom ({boot_mib} MiB)"
        )
    if len(dimms) >= slots:
        raise InvalidArgument(
            f"memory hotplug: all {slots} DIMM slots are in use; cannot add {size} MiB"
        )
    plugged = sum(d.size_mib for d in dimms)
    free = headroom - plugged
    if size > free:
        raise InvalidArgument(
            f"memory hotplug: {size} MiB ({mib} MiB aligned up to {MEMORY_BLOCK_MIB} MiB "
            f"blocks) is more than the {free} MiB left; the VM has {boot_mib + plugged} MiB "
            f"and can grow to {boot_mib + headroom} MiB"
        )
    return MemoryAdd(next_memory_index(dimms), size)
