"""Pod and container resources: one policy for every front end (pure functions).

The rules are openEuler's for secure containers ("Configuring Resources for a Secure
Container") and Kubernetes' sizing:

* **The pod VM's size** (carapace.vmsize, re-exported here) comes from, lowest
  precedence first: configuration.toml (``default_vcpus``, ``default_memory``);
  containerd's sizing annotations; Kata's ``default_vcpus/default_memory``; openEuler's
  ``sandbox_cpu/sandbox_mem``; the caller's flags. CPU: at least 0.5, memory at least 1G
  (default 1G); at most the ``SizeCap``: by default the host's usable CPUs (isolated
  cores excluded) and memory, never above 256G. Which of these annotations a pod may
  use at all is the configuration's ``enable_annotations`` (carapace.annotations).
* **Sandbox-only annotations** (sandbox_cpu, sandbox_mem, blkio_cgroup, files_limit)
  belong to the pause container; on another container they are an error unless they
  repeat the pod's value (containerd's CRI copies pod annotations to every container).
* **Containers** bring their own CPU and memory options (OCI ``linux.resources``),
  applied to their cgroup inside the VM; ``cpuset.cpus`` must name vCPUs the VM has,
  ``cpuset.mems`` only node 0, and without hotplug ``memory.limit`` must fit the VM.
* **Hotplug** (``enable_cpu_memory_hotplug``): the VM has max(boot vCPUs, ceil(sum of the
  containers' CPUs)) vCPUs and max(boot memory, sum of the containers' memory limits)
  memory; CPUs come and go with containers, memory is only ever added.
* **Host namespaces** (net, ipc, pid, uts) cannot be shared with a VM: refused.
* **The hypervisor's open files limit** (``files_limit``): 0 < n < 1024 → 1024,
  0 → fs.file-max / 400, unset → the system's default; never above the host's cap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from carapace.errors import InvalidArgument, shown
from carapace.hypervisor.base import MEMORY_BLOCK_MIB
from carapace.protocols.contract import (
    BLKIO_CGROUP,
    CRI_CPU_PERIOD,
    CRI_CPU_QUOTA,
    CRI_CPU_SHARES,
    CRI_MEMORY,
    FILES_LIMIT,
    KATA_MEMORY,
    KATA_VCPUS,
    SANDBOX_CPU,
    SANDBOX_MEM,
)
from carapace.sizing import MiB, ascii_int, format_size
from carapace.vmsize import (
    DEFAULT_CPU_PERIOD,
    DEFAULT_MEMORY,
    MAX_MEMORY,
    MIN_CPUS,
    MIN_MEMORY,
    SandboxSize,
    SizeCap,
    cri_workload,
    sandbox_size,
    vcpus_for,
)

if TYPE_CHECKING:
    from carapace.oci.bundle import Namespace

__all__ = [
    "BLKIO_CGROUP",
    "CRI_CPU_PERIOD",
    "CRI_CPU_QUOTA",
    "CRI_CPU_SHARES",
    "CRI_MEMORY",
    "DEFAULT_MEMORY",
    "FILES_LIMIT",
    "KATA_MEMORY",
    "KATA_VCPUS",
    "MAX_MEMORY",
    "MIN_CPUS",
    "MIN_MEMORY",
    "SANDBOX_CPU",
    "SANDBOX_MEM",
    "SandboxSize",
    "SizeCap",
    "cri_workload",
    "sandbox_size",
    "vcpus_for",
]

# -- annotations (their names are contract constants) --------------------------------

#: Annotations that describe the pod VM, so only its sandbox (pause) container sets them.
SANDBOX_ONLY = (SANDBOX_CPU, SANDBOX_MEM, BLKIO_CGROUP, FILES_LIMIT)

# -- limits --------------------------------------------------------------------------

#: Hot-added memory comes in whole guest memory blocks (the hypervisor's block size).
MEMORY_BLOCK = MEMORY_BLOCK_MIB * MiB
#: Below this, a files limit is raised to it.
MIN_FILES_LIMIT = 1024
#: files_limit = 0 means fs.file-max divided by this.
FILES_LIMIT_DIVISOR = 400
#: Namespaces a container may not share with the host (the VM has its own kernel).
HOST_NAMESPACES_REFUSED = ("network", "ipc", "pid", "uts")
_NS_FLAG = {"network": "--net", "ipc": "--ipc", "pid": "--pid", "uts": "--uts"}


def usable_cpus(affinity: Iterable[int], isolated: str) -> int:
    """CPUs the host lets us run on: our affinity minus isolated cores
    (/sys/devices/system/cpu/isolated, a cpu list such as ``2-3,6``)."""
    return len(set(affinity) - parse_cpu_list(isolated, "isolated CPUs"))


#: The largest CPU id (or memory node id) a list may name: Linux's NR_CPUS is at most
#: 8192. Bounds the list before it is expanded ("0-4294967295" is refused, not built).
MAX_CPU_ID = 8191
_CPU_RANGE_RE = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?", re.ASCII)
#: The integers OCI writes: signed and unsigned 64 bits.
INT64 = (-(1 << 63), (1 << 63) - 1)
UINT64 = (0, (1 << 64) - 1)


def parse_cpu_list(text: str, what: str) -> set[int]:
    """A kernel cpu list (``0-3,5``; empty means none) as a set of ids (0 to MAX_CPU_ID)."""
    if not isinstance(text, str):
        raise InvalidArgument(
            f"{what}: {shown(text)} is a {type(text).__name__}; accepted: a string of ids "
            "and ranges such as 0-3,5"
        )
    out: set[int] = set()
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        m = _CPU_RANGE_RE.fullmatch(part.strip())
        if m is None:
            raise InvalidArgument(
                f"{what}: {shown(text)} is not a CPU list; accepted: ids and ranges such as "
                f"0-3,5 (ids 0 to {MAX_CPU_ID})"
            )
        a = int(m[1])
        b = int(m[2]) if m[2] is not None else a
        if b < a or b > MAX_CPU_ID:
            raise InvalidArgument(
                f"{what}: {shown(text)} has the range {shown(part.strip())}; accepted: "
                f"ascending ranges of ids 0 to {MAX_CPU_ID} such as 0-3,5"
            )
        out.update(range(a, b + 1))
    return out


def check_sandbox_only(
    annotations: Mapping[str, str], container_id: str, pod: Mapping[str, str]
) -> None:
    """A container that is not the pod's sandbox may not set the VM's annotations,
    except to repeat the pod's own value (CRI copies pod annotations to containers)."""
    for key in SANDBOX_ONLY:
        if key in annotations and annotations[key] != pod.get(key):
            raise InvalidArgument(
                f"container {container_id}: annotation {key}={shown(annotations[key])} can "
                "be set only on the pod's sandbox (pause) container, where it sizes the VM"
                + (f" (the pod has {shown(pod[key])})" if key in pod else "")
            )


# -- host namespaces ------------------------------------------------------------------


def host_namespaces(
    namespaces: Iterable[Namespace],
    is_host_namespace: Callable[[str, str], bool] = lambda ns_type, path: False,
) -> list[str]:
    """The types of HOST_NAMESPACES_REFUSED a spec's linux.namespaces would share with
    the host: in OCI a type missing from the list means the host's, and so does a path
    to the host's own namespace (``is_host_namespace(type, path)`` tells)."""
    entries = list(namespaces)
    have = {ns.type for ns in entries}
    missing = [t for t in HOST_NAMESPACES_REFUSED if t not in have]
    missing += [
        ns.type
        for ns in entries
        if ns.type in HOST_NAMESPACES_REFUSED and ns.path and is_host_namespace(ns.type, ns.path)
    ]
    return missing


def check_namespaces(
    namespaces: Iterable[Namespace],
    container_id: str,
    is_host_namespace: Callable[[str, str], bool] = lambda ns_type, path: False,
) -> None:
    """Refuse a spec that would share the host's net, ipc, pid or uts namespace
    (``host_namespaces``), in the words of OCI and the engines' flags."""
    missing = host_namespaces(namespaces, is_host_namespace)
    if missing:
        flags = ", ".join(f"{_NS_FLAG[t]} host" for t in missing)
        raise InvalidArgument(
            f"container {container_id}: asks for the host's {' and '.join(missing)} "
            f"namespace{'s' if len(missing) > 1 else ''} ({flags}); a pod VM has its own "
            "kernel and cannot share the host's net, ipc, pid or uts namespace; accepted: "
            "private namespaces (or the pod's)"
        )


#: The pod field (the kubelet's) for which CRI leaves each namespace out of a pod
#: sandbox's spec, to share the host's: hostNetwork takes the uts one too.
POD_HOST_FIELDS = {
    "network": "hostNetwork",
    "ipc": "hostIPC",
    "pid": "hostPID",
    "uts": "hostNetwork",
}


def check_pod_namespaces(namespaces: Iterable[Namespace], pod_id: str) -> None:
    """The same refusal for a CRI pod sandbox (pause) spec, in the pod's words
    (hostNetwork, hostPID, hostIPC). CRI always lists the pod's namespaces (its mount
    namespace at least): a spec listing none is left to ``check_namespaces``, and so is
    a path to the host's own namespace."""
    entries = list(namespaces)
    missing = host_namespaces(entries) if entries else []
    if not missing:
        return
    fields = dict.fromkeys(POD_HOST_FIELDS[t] for t in missing)
    plural = "s" if len(missing) > 1 else ""
    raise InvalidArgument(
        f"pod {pod_id} asks for the host's {' and '.join(missing)} namespace{plural} "
        f"({', '.join(f'{f}: true' for f in fields)}); a VM pod has its own kernel and "
        "cannot share a namespace with the host; accepted: a pod without hostNetwork, "
        "hostPID or hostIPC (such a pod needs a runtime class whose containers run on the "
        "host, such as runc)"
    )


# -- containers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerResources:
    """A container's CPU and memory options, from OCI linux.resources."""

    cpus: float | None = None  # quota / period
    shares: int | None = None
    cpuset_cpus: frozenset[int] | None = None
    cpuset_mems: frozenset[int] | None = None
    memory: int | None = None  # bytes


def _int_field(
    section: Mapping[str, Any], key: str, what: str, bounds: tuple[int, int] = INT64
) -> int | None:
    v = section.get(key)
    if v is None:
        return None
    lo, hi = bounds
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        why = "out of range" if isinstance(v, int) and not isinstance(v, bool) else "not an integer"
        raise InvalidArgument(
            f"{what}.{key}: {shown(v)} is {why}; accepted: an integer from {lo} to {hi}"
        )
    return v


def _cpu_list(section: Mapping[str, Any], key: str, what: str) -> frozenset[int] | None:
    v = section.get(key)
    if v is None or v == "":
        return None
    return frozenset(parse_cpu_list(v, what))


def container_resources(resources: object, container_id: str) -> ContainerResources:
    """Parse OCI linux.resources (only what sizing and checks need); anything that is
    not what OCI says (a type, a value out of its range) raises InvalidArgument."""
    what = f"container {container_id}: linux.resources"
    if resources is None:
        return ContainerResources()
    if not isinstance(resources, Mapping):
        raise InvalidArgument(f"{what}: {shown(resources)}; accepted: a JSON object")
    cpu = resources.get("cpu")
    mem = resources.get("memory")
    cpu = {} if cpu is None else cpu
    mem = {} if mem is None else mem
    if not isinstance(cpu, Mapping) or not isinstance(mem, Mapping):
        raise InvalidArgument(
            f"{what}: cpu and memory must be objects; seen: cpu {shown(cpu)}, memory {shown(mem)}"
        )
    quota = _int_field(cpu, "quota", f"{what}.cpu")
    period = _int_field(cpu, "period", f"{what}.cpu", UINT64)
    shares = _int_field(cpu, "shares", f"{what}.cpu", UINT64)
    limit = _int_field(mem, "limit", f"{what}.memory")
    cpus = None
    if quota is not None and quota > 0:
        if period is not None and period <= 0:
            raise InvalidArgument(
                f"{what}.cpu.period: {period} must be positive; accepted: microseconds, 1 or more"
            )
        cpus = quota / (period or DEFAULT_CPU_PERIOD)
    cpuset_cpus = _cpu_list(cpu, "cpus", f"{what}.cpu.cpus (--cpuset-cpus)")
    cpuset_mems = _cpu_list(cpu, "mems", f"{what}.cpu.mems (--cpuset-mems)")
    memory = limit if limit is not None and limit > 0 else None
    return ContainerResources(cpus, shares, cpuset_cpus, cpuset_mems, memory)


#: linux.resources fields of cgroup v1 alone (the guest is v2): engines send them as 0
#: with every update (Docker's full resources); a value that asks for something is
#: refused rather than dropped.
V1_ONLY_FIELDS = (
    ("memory", "kernel"),
    ("memory", "kernelTCP"),
    ("cpu", "realtimeRuntime"),
    ("cpu", "realtimePeriod"),
)


def for_guest(new: Mapping[str, Any], container_id: str) -> dict[str, Any]:
    """``new`` without the cgroup v1 fields it leaves unset (0 or null); a set one is
    refused, naming it."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items()}
    for section, key in V1_ONLY_FIELDS:
        part = out.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part.pop(key)
        if value not in (0, None):
            raise InvalidArgument(
                f"container {container_id}: linux.resources.{section}.{key} "
                f"{shown(value)}: a cgroup v1 limit the VM's cgroup v2 does not have; "
                "accepted: 0 or absent"
            )
    return out


def merge(old: ContainerResources, new: ContainerResources) -> ContainerResources:
    """An update's resources over the current ones: what the update leaves out stays."""
    return ContainerResources(
        *(
            o if n is None else n
            for o, n in zip(
                (getattr(old, f.name) for f in fields(ContainerResources)),
                (getattr(new, f.name) for f in fields(ContainerResources)),
                strict=True,
            )
        )
    )


def check_container(
    res: ContainerResources,
    container_id: str,
    *,
    vm_vcpus: int,
    vm_memory: int,
    hotplug: bool,
) -> None:
    """Check a container's options against the VM it runs in (``vm_vcpus``: after any
    hotplug for this container; ``vm_memory``: the VM's memory, or the most it can grow
    to when hotplug is on)."""
    if res.cpuset_cpus is not None:
        bad = sorted(i for i in res.cpuset_cpus if i >= vm_vcpus)
        if bad:
            raise InvalidArgument(
                f"container {container_id}: --cpuset-cpus names CPU {bad[0]}, but the pod VM "
                f"has {vm_vcpus} vCPU{'s' if vm_vcpus > 1 else ''}; accepted: CPU ids 0 to "
                f"{vm_vcpus - 1} (ids count from 0 inside the VM)"
            )
    if res.cpuset_mems is not None and res.cpuset_mems != {0}:
        raise InvalidArgument(
            f"container {container_id}: --cpuset-mems "
            f"{','.join(map(str, sorted(res.cpuset_mems)))} is not supported; the pod VM has "
            "one memory node: accepted: 0"
        )
    if res.memory is not None and res.memory > vm_memory:
        how = "can grow to" if hotplug else "has (memory hotplug is off)"
        raise InvalidArgument(
            f"container {container_id}: --memory {format_size(res.memory)} is more than the "
            f"pod VM {how}: {format_size(vm_memory)}; accepted: at most "
            f"{format_size(vm_memory)}"
        )


# -- hotplug ----------------------------------------------------------------------------


def pod_vcpus(boot_vcpus: int, containers: Iterable[ContainerResources]) -> int:
    """vCPUs the VM should have: the boot vCPUs are shared with the containers (the pause
    container runs nothing), so 1 + a 4-CPU container → 4, not 5."""
    total = sum(r.cpus for r in containers if r.cpus is not None)
    return max(boot_vcpus, vcpus_for(total) if total > 0 else 0)


def pod_memory(
    boot_memory: int,
    current: int,
    containers: Iterable[ContainerResources],
    block: int = MEMORY_BLOCK,
) -> int:
    """Bytes of memory the VM should have: max(boot memory, sum of the containers'
    limits), rounded up to whole memory blocks, never less than it has (memory is only
    ever hot-added): 1G + a 4G container → 4G, not 5G."""
    total = sum(r.memory for r in containers if r.memory is not None)
    want = max(boot_memory, math.ceil(total / block) * block)
    return max(current, want)


def pod_limits(containers: Iterable[ContainerResources]) -> tuple[float | None, int | None]:
    """The pod cgroup's CPU (CPUs) and memory (bytes) limits when only the vCPU threads
    are placed there (sandbox_cgroup_only = false): the sums of the containers' limits;
    None (no limit) when no container sets one."""
    items = list(containers)
    cpus = [r.cpus for r in items if r.cpus is not None]
    memory = [r.memory for r in items if r.memory is not None]
    return (sum(cpus) if cpus else None), (sum(memory) if memory else None)


# -- the hypervisor's open files -------------------------------------------------------------


def files_limit_value(asked: int | None, annotations: Mapping[str, object]) -> int | None:
    """The files limit asked for: ``asked`` (the spec's ``linux.resources.files.limit``,
    as openEuler's ``--files-limit`` carries it, checked by the OCI edge) or the
    files_limit annotation."""
    if asked is not None:
        return asked
    if FILES_LIMIT not in annotations:
        return None
    raw, what = annotations[FILES_LIMIT], f"annotation {FILES_LIMIT}"
    n = ascii_int(raw) if isinstance(raw, str) else None
    if n is None or n < 0:
        raise InvalidArgument(
            f"{what}: {shown(raw)} is not a valid files limit; accepted: 0 (fs.file-max / "
            f"{FILES_LIMIT_DIVISOR}) or a positive number of open files"
        )
    return n


def files_limit(value: int | None, file_max: int, hard_cap: int) -> tuple[int | None, str]:
    """The RLIMIT_NOFILE to give the hypervisor and a warning ('' if none):
    0 < n < 1024 → 1024; 0 → file_max / 400; None → None (the system default);
    anything above ``hard_cap`` (the most this host allows) → hard_cap."""
    if value is None:
        return None, ""
    n = file_max // FILES_LIMIT_DIVISOR if value == 0 else max(value, MIN_FILES_LIMIT)
    n = max(n, MIN_FILES_LIMIT)
    if n > hard_cap:
        return hard_cap, (
            f"files limit {n} is above what this host allows ({hard_cap}); the hypervisor "
            f"gets {hard_cap}"
        )
    return n, ""
