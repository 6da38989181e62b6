"""The pod VM's size (pure functions): part of carapace.resources' policy, which
re-exports it.

Lowest precedence first: configuration.toml (``default_vcpus``, ``default_memory``);
containerd's sizing annotations (``io.kubernetes.cri.sandbox-cpu-quota/period``,
``io.kubernetes.cri.sandbox-memory``: the sum of the pod's container limits), which can
only grow the VM beyond the default, since the default vCPU and memory of the pause
container are shared with the pod's containers; Kata's
``io.katacontainers.config.hypervisor.default_vcpus/default_memory``; openEuler's
``com.github.containers.virtcontainers.sandbox_cpu/sandbox_mem``, which set the VM size
outright; and the caller's ``--cpus``/``--memory``. CPU: at least 0.5; a fractional
amount boots ceil(n) vCPUs whose host threads are capped to n CPUs of time. Memory: at
least 1G. Whatever asks, the VM is at most its ``SizeCap`` (``default_maxvcpus`` /
``default_maxmemory``; by default the host's usable CPUs and memory, never above 256G):
a larger ask is refused naming the key, the value and the cap. Which annotations a pod
may use at all is carapace.annotations' allow-list.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from carapace.errors import InvalidArgument, shown
from carapace.protocols.contract import (
    CFS_PERIOD_US,
    CRI_CPU_PERIOD,
    CRI_CPU_QUOTA,
    CRI_CPU_SHARES,
    CRI_MEMORY,
    KATA_MEMORY,
    KATA_VCPUS,
    SANDBOX_CPU,
    SANDBOX_MEM,
)
from carapace.sizing import GiB, MiB, ascii_int, format_size, parse_size

MIN_CPUS = 0.5
MIN_MEMORY = 1 * GiB
#: The largest VM carapace makes (openEuler: "Currently, secure containers do not
#: support the scenario where the memory size exceeds 256 GB").
MAX_MEMORY = 256 * GiB
DEFAULT_MEMORY = 1 * GiB
DEFAULT_CPU_PERIOD = CFS_PERIOD_US
#: The integers containerd writes (signed 64 bits).
INT64 = (-(1 << 63), (1 << 63) - 1)


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


@dataclass(frozen=True)
class SizeCap:
    """The most a pod VM may have, whatever asks (configuration, annotations, flags),
    and why (for messages): by default the host's usable CPUs and memory."""

    cpus: int
    memory: int = MAX_MEMORY  # bytes
    cpus_why: str = "the host's usable CPUs"
    memory_why: str = "the largest VM carapace makes"


def _cpus(value: object, what: str, cap: SizeCap) -> float:
    n = math.nan
    if isinstance(value, int) and not isinstance(value, bool):
        n = float(max(min(value, 1 << 60), -(1 << 60)))  # 10**400 is too many, not an error
    elif isinstance(value, float):
        n = value
    elif isinstance(value, str) and len(value) <= 32 and value.isascii():
        with contextlib.suppress(ValueError):
            n = float(value.strip())
    if math.isnan(n) or n < MIN_CPUS:
        raise InvalidArgument(
            f"{what}: {shown(value)} is not a valid CPU amount; accepted: a number from "
            f"{MIN_CPUS:g} to {cap.cpus} ({cap.cpus_why}), e.g. 2 or 1.5"
        )
    if n > cap.cpus:
        raise InvalidArgument(
            f"{what}: {shown(value)} asks for more CPUs than a pod VM may have here: at most "
            f"{cap.cpus} ({cap.cpus_why}); accepted: a number from {MIN_CPUS:g} to {cap.cpus}"
        )
    return n


def _memory(value: object, what: str, cap: SizeCap, bare_unit: int = 1) -> int:
    """Bytes from a size; a bare number counts ``bare_unit`` bytes (1, or MiB for Kata)."""
    n = ascii_int(value, digits=24)
    if n is not None:
        n *= bare_unit
    elif isinstance(value, str):
        with contextlib.suppress(InvalidArgument):
            n = parse_size(value.strip(), what)
    if n is None or n < MIN_MEMORY:
        unit = " (a bare number is MiB)" if bare_unit == MiB else ""
        here = ""
        if cap.memory < MAX_MEMORY:
            here = f"; a pod VM may have at most {format_size(cap.memory)} here ({cap.memory_why})"
        raise InvalidArgument(
            f"{what}: {shown(value)} is not a valid VM memory size; accepted: "
            f"{format_size(MIN_MEMORY)} to {format_size(MAX_MEMORY)}, written like 1G, "
            f"2048m or 1073741824{unit}{here}"
        )
    if n > cap.memory:
        raise InvalidArgument(
            f"{what}: {shown(value)} asks for more memory than a pod VM may have here: at most "
            f"{format_size(cap.memory)} ({cap.memory_why}); accepted: "
            f"{format_size(MIN_MEMORY)} to {format_size(cap.memory)}"
        )
    return math.ceil(n / MiB) * MiB


def _cri_int(annotations: Mapping[str, object], key: str) -> int | None:
    raw = annotations.get(key)
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return None
    n = ascii_int(raw) if isinstance(raw, str) else None
    if n is None or not INT64[0] <= n <= INT64[1]:
        raise InvalidArgument(
            f"annotation {key}: {shown(raw)} is not an integer; accepted: a 64-bit integer "
            "as containerd writes it"
        )
    return n


def cri_workload(annotations: Mapping[str, object]) -> tuple[float | None, int | None]:
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
    annotations: Mapping[str, object],
    *,
    default_cpus: float,
    default_memory_mib: int,
    cap: SizeCap,
    cpus: float | str | None = None,
    memory: int | str | None = None,
) -> SandboxSize:
    """The pod VM's size from the configuration, the sandbox container's annotations and
    the caller's own request (``cpus``/``memory``: ``carapace run --cpus/--memory``, the
    Python API), which like sandbox_cpu/sandbox_mem sets the size outright. Whatever
    asks, the VM is at most ``cap``: a larger ask is refused naming it and the cap."""
    size_cpus = _cpus(default_cpus, "configuration default_vcpus", cap)
    size_mem = _memory(default_memory_mib, "configuration default_memory", cap, MiB)
    cpu_src = mem_src = "configuration"
    cri_cpus, cri_mem = cri_workload(annotations)
    if cri_cpus is not None and vcpus_for(cri_cpus) > size_cpus:
        what = f"annotations {CRI_CPU_QUOTA}/{CRI_CPU_PERIOD}"
        size_cpus = _cpus(vcpus_for(cri_cpus), what, cap)
        cpu_src = "containerd sandbox annotations"
    if cri_mem is not None and cri_mem > size_mem:
        size_mem = _memory(cri_mem, f"annotation {CRI_MEMORY}", cap)
        mem_src = "containerd sandbox annotations"
    if KATA_VCPUS in annotations:
        size_cpus = _cpus(annotations[KATA_VCPUS], f"annotation {KATA_VCPUS}", cap)
        cpu_src = KATA_VCPUS
    if KATA_MEMORY in annotations:
        size_mem = _memory(annotations[KATA_MEMORY], f"annotation {KATA_MEMORY}", cap, MiB)
        mem_src = KATA_MEMORY
    if SANDBOX_CPU in annotations:
        size_cpus = _cpus(annotations[SANDBOX_CPU], f"annotation {SANDBOX_CPU}", cap)
        cpu_src = SANDBOX_CPU
    if SANDBOX_MEM in annotations:
        size_mem = _memory(annotations[SANDBOX_MEM], f"annotation {SANDBOX_MEM}", cap)
        mem_src = SANDBOX_MEM
    if cpus is not None:
        size_cpus, cpu_src = _cpus(cpus, "--cpus", cap), "--cpus"
    if memory is not None:
        size_mem, mem_src = _memory(memory, "--memory", cap), "--memory"
    return SandboxSize(size_cpus, size_mem, cpu_src, mem_src)
