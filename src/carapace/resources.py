"""Pod and container resources: one policy for every front end (pure functions).

The rules are openEuler's for secure containers ("Configuring Resources for a Secure
Container") and Kubernetes' sizing:

* **The pod VM's size** comes from, lowest precedence first: configuration.toml
  (``default_vcpus``, ``default_memory``); containerd's sizing annotations
  (``io.kubernetes.cri.sandbox-cpu-quota/period``, ``io.kubernetes.cri.sandbox-memory``:
  the sum of the pod's container limits) which can only grow the VM beyond the default,
  since the default vCPU and memory of the pause container are shared with the pod's
  containers; Kata's ``io.katacontainers.config.hypervisor.default_vcpus/default_memory``;
  and ``com.github.containers.virtcontainers.sandbox_cpu/sandbox_mem``, which set the VM
  size outright. CPU: at least 0.5, at most the host's usable CPUs (isolated cores
  excluded); a fractional amount boots ceil(n) vCPUs whose host threads are capped to n
  CPUs of time. Memory: default 1G, at least 1G, at most 256G.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from carapace.errors import InvalidArgument
from carapace.hypervisor.base import MEMORY_BLOCK_MIB
from carapace.protocols.contract import (
    BLKIO_CGROUP,
    CFS_PERIOD_US,
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
from carapace.sizing import GiB, MiB, format_size, parse_size

if TYPE_CHECKING:
    from carapace.oci.bundle import Namespace

__all__ = [
    "BLKIO_CGROUP",
    "CRI_CPU_PERIOD",
    "CRI_CPU_QUOTA",
    "CRI_CPU_SHARES",
    "CRI_MEMORY",
    "FILES_LIMIT",
    "KATA_MEMORY",
    "KATA_VCPUS",
    "SANDBOX_CPU",
    "SANDBOX_MEM",
]

# -- annotations (their names are contract constants) --------------------------------

#: Annotations that describe the pod VM, so only its sandbox (pause) container sets them.
SANDBOX_ONLY = (SANDBOX_CPU, SANDBOX_MEM, BLKIO_CGROUP, FILES_LIMIT)

# -- limits --------------------------------------------------------------------------

MIN_CPUS = 0.5
MIN_MEMORY = 1 * GiB
MAX_MEMORY = 256 * GiB
DEFAULT_MEMORY = 1 * GiB
#: Hot-added memory comes in whole guest memory blocks (the hypervisor's block size).
MEMORY_BLOCK = MEMORY_BLOCK_MIB * MiB
#: Below this, a files limit is raised to it.
MIN_FILES_LIMIT = 1024
#: files_limit = 0 means fs.file-max divided by this.
FILES_LIMIT_DIVISOR = 400
#: Namespaces a container may not share with the host (the VM has its own kernel).
HOST_NAMESPACES_REFUSED = ("network", "ipc", "pid", "uts")
_NS_FLAG = {"network": "--net", "ipc": "--ipc", "pid": "--pid", "uts": "--uts"}
DEFAULT_CPU_PERIOD = CFS_PERIOD_US


@dataclass(frozen=True)
class SandboxSize:
    """The pod VM's size and where each part came from (for messages)."""

    cpus: float
    memory: int  # bytes, a whole number of MiB
    cpu_source: str = "default"
    memory_source: str = "default"

    @property
    def vcpus(self) -> int:
        """vCPUs to boot: a fractional amount boots ceil(n)."""
        return vcpus_for(self.cpus)

    @property
    def cpu_cap(self) -> float | None:
        """Host CPU time the vCPU threads may use when the amount is fractional."""
        return None if self.cpus == self.vcpus else self.cpus

    @property
    def memory_mib(self) -> int:
        return self.memory // MiB


def vcpus_for(cpus: float) -> int:
    return max(1, math.ceil(round(cpus, 6)))


def usable_cpus(affinity: Iterable[int], isolated: str) -> int:
    """CPUs the host lets us run on: our affinity minus isolated cores
    (/sys/devices/system/cpu/isolated, a cpu list such as ``2-3,6``)."""
    return len(set(affinity) - parse_cpu_list(isolated, "isolated CPUs"))


def parse_cpu_list(text: str, what: str) -> set[int]:
    """A kernel cpu list (``0-3,5``; empty means none) as a set of ids."""
    out: set[int] = set()
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise InvalidArgument(
                f"{what}: {text!r} is not a CPU list; accepted: ids and ranges such as 0-3,5"
            ) from None
        if a < 0 or b < a:
            raise InvalidArgument(
                f"{what}: {text!r} has the range {part.strip()!r}; accepted: ascending "
                "ranges of non-negative ids such as 0-3,5"
            )
        out.update(range(a, b + 1))
    return out


# -- the pod VM's size ----------------------------------------------------------------


def _cpus(value: object, what: str, host_cpus: int) -> float:
    try:
        n = float(str(value).strip())
    except ValueError:
        n = math.nan
    if not math.isfinite(n) or n < MIN_CPUS or n > host_cpus:
        raise InvalidArgument(
            f"{what}: {value!r} is not a valid CPU amount; accepted: a number from "
            f"{MIN_CPUS:g} to {host_cpus} (the host's usable CPUs), e.g. 2 or 1.5"
        )
    return n


def _memory(value: object, what: str, bare_unit: int = 1) -> int:
    """Bytes from a size; a bare number counts ``bare_unit`` bytes (1, or MiB for Kata)."""
    text = str(value).strip()
    try:
        n = int(text) * bare_unit if text.isdigit() else parse_size(text, what)
    except InvalidArgument:
        n = -1
    if n < MIN_MEMORY or n > MAX_MEMORY:
        unit = " (a bare number is MiB)" if bare_unit == MiB else ""
        raise InvalidArgument(
            f"{what}: {value!r} is not a valid VM memory size; accepted: "
            f"{format_size(MIN_MEMORY)} to {format_size(MAX_MEMORY)}, written like 1G, "
            f"2048m or 1073741824{unit}"
        )
    return math.ceil(n / MiB) * MiB


def _cri_int(annotations: Mapping[str, str], key: str) -> int | None:
    raw = annotations.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise InvalidArgument(
            f"annotation {key}: {raw!r} is not an integer; accepted: an integer as "
            "containerd writes it"
        ) from None


def cri_workload(annotations: Mapping[str, str]) -> tuple[float | None, int | None]:
    """The pod's CPUs and memory from containerd's sandbox sizing annotations (the sum
    of its containers' limits); None where the pod sets no limit."""
    quota = _cri_int(annotations, CRI_CPU_QUOTA)
    period = _cri_int(annotations, CRI_CPU_PERIOD)
    shares = _cri_int(annotations, CRI_CPU_SHARES)
    memory = _cri_int(annotations, CRI_MEMORY)
    for key, v in ((CRI_CPU_PERIOD, period), (CRI_CPU_SHARES, shares), (CRI_MEMORY, memory)):
        if v is not None and v < 0:
            raise InvalidArgument(f"annotation {key}: {v} is negative; accepted: 0 or more")
    cpus = None
    if quota is not None and quota > 0:
        cpus = quota / (period or DEFAULT_CPU_PERIOD)
    return cpus, (memory or None)


def sandbox_size(
    annotations: Mapping[str, str],
    *,
    default_cpus: float,
    default_memory_mib: int,
    host_cpus: int,
    cpus: float | str | None = None,
    memory: int | str | None = None,
) -> SandboxSize:
    """The pod VM's size from the configuration, the sandbox container's annotations and
    the caller's own request (``cpus``/``memory``: ``carapace run --cpus/--memory``, the
    Python API), which like sandbox_cpu/sandbox_mem sets the size outright."""
    size_cpus = _cpus(default_cpus, "configuration default_vcpus", host_cpus)
    size_mem = _memory(default_memory_mib, "configuration default_memory", MiB)
    cpu_src = mem_src = "configuration"
    cri_cpus, cri_mem = cri_workload(annotations)
    if cri_cpus is not None and vcpus_for(cri_cpus) > size_cpus:
        size_cpus = _cpus(
            vcpus_for(cri_cpus), f"annotations {CRI_CPU_QUOTA}/{CRI_CPU_PERIOD}", host_cpus
        )
        cpu_src = "containerd sandbox annotations"
    if cri_mem is not None and cri_mem > size_mem:
        size_mem = _memory(cri_mem, f"annotation {CRI_MEMORY}")
        mem_src = "containerd sandbox annotations"
    for key, what_cpu in ((KATA_VCPUS, True), (KATA_MEMORY, False)):
        if key in annotations:
            if what_cpu:
                size_cpus, cpu_src = _cpus(annotations[key], f"annotation {key}", host_cpus), key
            else:
                size_mem, mem_src = _memory(annotations[key], f"annotation {key}", MiB), key
    if SANDBOX_CPU in annotations:
        size_cpus = _cpus(annotations[SANDBOX_CPU], f"annotation {SANDBOX_CPU}", host_cpus)
        cpu_src = SANDBOX_CPU
    if SANDBOX_MEM in annotations:
        size_mem, mem_src = (
            _memory(annotations[SANDBOX_MEM], f"annotation {SANDBOX_MEM}"),
            (SANDBOX_MEM),
        )
    if cpus is not None:
        size_cpus, cpu_src = _cpus(cpus, "--cpus", host_cpus), "--cpus"
    if memory is not None:
        size_mem, mem_src = _memory(memory, "--memory"), "--memory"
    return SandboxSize(size_cpus, size_mem, cpu_src, mem_src)


def check_sandbox_only(
    annotations: Mapping[str, str], container_id: str, pod: Mapping[str, str]
) -> None:
    """A container that is not the pod's sandbox may not set the VM's annotations,
    except to repeat the pod's own value (CRI copies pod annotations to containers)."""
    for key in SANDBOX_ONLY:
        if key in annotations and annotations[key] != pod.get(key):
            raise InvalidArgument(
                f"container {container_id}: annotation {key}={annotations[key]!r} can be "
                "set only on the pod's sandbox (pause) container, where it sizes the VM"
                + (f" (the pod has {pod[key]!r})" if key in pod else "")
            )


# -- host namespaces ------------------------------------------------------------------


def check_namespaces(
    namespaces: Iterable[Namespace],
    container_id: str,
    is_host_namespace: Callable[[str, str], bool] = lambda ns_type, path: False,
) -> None:
    """Refuse a spec that would share the host's net, ipc, pid or uts namespace: in OCI
    a namespace type missing from linux.namespaces means the host's, and so does a path
    to the host's own namespace (``is_host_namespace(type, path)`` tells)."""
    entries = list(namespaces)
    have = {ns.type for ns in entries}
    missing = [t for t in HOST_NAMESPACES_REFUSED if t not in have]
    missing += [
        ns.type
        for ns in entries
        if ns.type in HOST_NAMESPACES_REFUSED and ns.path and is_host_namespace(ns.type, ns.path)
    ]
    if missing:
        flags = ", ".join(f"{_NS_FLAG[t]} host" for t in missing)
        raise InvalidArgument(
            f"container {container_id}: asks for the host's {' and '.join(missing)} "
            f"namespace{'s' if len(missing) > 1 else ''} ({flags}); a pod VM has its own "
            "kernel and cannot share the host's net, ipc, pid or uts namespace; accepted: "
            "private namespaces (or the pod's)"
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


def _int_field(section: Mapping[str, Any], key: str, what: str) -> int | None:
    v = section.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgument(f"{what}.{key}: {v!r} is not an integer")
    return v


def container_resources(
    resources: Mapping[str, Any] | None, container_id: str
) -> ContainerResources:
    """Parse OCI linux.resources (only what sizing and checks need)."""
    if not resources:
        return ContainerResources()
    what = f"container {container_id}: linux.resources"
    cpu = resources.get("cpu")
    mem = resources.get("memory")
    cpu = {} if cpu is None else cpu
    mem = {} if mem is None else mem
    if not isinstance(cpu, dict) or not isinstance(mem, dict):
        raise InvalidArgument(f"{what}: cpu and memory must be objects")
    quota = _int_field(cpu, "quota", f"{what}.cpu")
    period = _int_field(cpu, "period", f"{what}.cpu")
    shares = _int_field(cpu, "shares", f"{what}.cpu")
    limit = _int_field(mem, "limit", f"{what}.memory")
    cpus = None
    if quota is not None and quota > 0:
        if period is not None and period <= 0:
            raise InvalidArgument(f"{what}.cpu.period: {period} must be positive")
        cpus = quota / (period or DEFAULT_CPU_PERIOD)
    cpuset_cpus = cpuset_mems = None
    if cpu.get("cpus"):
        cpuset_cpus = frozenset(
            parse_cpu_list(str(cpu["cpus"]), f"{what}.cpu.cpus (--cpuset-cpus)")
        )
    if cpu.get("mems"):
        cpuset_mems = frozenset(
            parse_cpu_list(str(cpu["mems"]), f"{what}.cpu.mems (--cpuset-mems)")
        )
    memory = limit if limit is not None and limit > 0 else None
    return ContainerResources(cpus, shares, cpuset_cpus, cpuset_mems, memory)


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


def files_limit_value(asked: int | None, annotations: Mapping[str, str]) -> int | None:
    """The files limit asked for: ``asked`` (the spec's ``linux.resources.files.limit``,
    as openEuler's ``--files-limit`` carries it, checked by the OCI edge) or the
    files_limit annotation."""
    if asked is not None:
        return asked
    if FILES_LIMIT not in annotations:
        return None
    raw, what = annotations[FILES_LIMIT], f"annotation {FILES_LIMIT}"
    try:
        n = int(str(raw).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise InvalidArgument(
            f"{what}: {raw!r} is not a valid files limit; accepted: 0 (fs.file-max / "
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
