"""Which file each setting lives in and what is written there, per cgroup version.

Pure functions: (file name, value) pairs in the order they must be written, and
parsers for what the kernel reports. The drivers only open and write.
"""

from __future__ import annotations

from typing import Literal

from carapace.errors import InvalidArgument
from carapace.protocols.contract import CFS_PERIOD_US

Version = Literal["v1", "v2"]

#: Kernel bounds on the CFS bandwidth period (kernel/sched/core.c): 1 ms .. 1 s.
MIN_CFS_PERIOD_US = 1_000
MAX_CFS_PERIOD_US = 1_000_000
#: The smallest quota the kernel accepts (min_cfs_quota_period = 1 ms).
MIN_CFS_QUOTA_US = 1_000
DEFAULT_CFS_PERIOD_US = CFS_PERIOD_US

#: Controller names callers may use, translated to each version's own.
_V2_NAMES = {"blkio": "io", "io": "io", "cpu": "cpu", "cpuacct": "cpu", "cpuset": "cpuset",
             "memory": "memory", "pids": "pids", "hugetlb": "hugetlb", "rdma": "rdma",
             "misc": "misc", "perf_event": "perf_event", "freezer": "freezer",
             "devices": "devices", "net_cls": "net_cls", "net_prio": "net_prio"}  # fmt: skip
_V1_NAMES = {"io": "blkio"}
#: Controllers that follow single threads (vCPUs) rather than whole processes.
THREADED_CONTROLLERS_V1 = frozenset({"cpu", "cpuacct", "cpuset"})
THREADED_CONTROLLERS_V2 = frozenset({"cpu", "cpuset", "pids", "perf_event"})


def controller_name(version: Version, controller: str) -> str:
    """A controller's name in ``version``: 'blkio' and 'io' are the same thing, as are
    'cpuacct' and 'cpu' on v2 (cpu.stat reports usage there)."""
    if controller not in _V2_NAMES:
        raise InvalidArgument(
            f"unknown cgroup controller {controller!r}; known: {', '.join(sorted(_V2_NAMES))}"
        )
    if version == "v2":
        return _V2_NAMES[controller]
    return _V1_NAMES.get(controller, controller)


def cfs_quota_us(cpus: float, period_us: int = DEFAULT_CFS_PERIOD_US) -> int:
    """The CFS quota giving ``cpus`` CPUs of bandwidth per ``period_us``."""
    check_cfs_period(period_us)
    if isinstance(cpus, bool) or not isinstance(cpus, int | float):
        raise InvalidArgument(f"CPU limit {cpus!r} must be a number of CPUs (e.g. 0.5)")
    if not cpus > 0 or cpus != cpus or cpus == float("inf"):
        raise InvalidArgument(f"CPU limit {cpus!r} must be a positive number of CPUs (e.g. 0.5)")
    quota = round(cpus * period_us)
    if quota < MIN_CFS_QUOTA_US:
        raise InvalidArgument(
            f"CPU limit {cpus} over a {period_us} us period gives a quota of {quota} us; "
            f"the kernel's minimum is {MIN_CFS_QUOTA_US} us (at least "
            f"{MIN_CFS_QUOTA_US / period_us:g} CPUs with this period)"
        )
    return quota


def check_cfs_period(period_us: int) -> None:
    if isinstance(period_us, bool) or not isinstance(period_us, int):
        raise InvalidArgument(f"CFS period {period_us!r} must be an integer of microseconds")
    if not MIN_CFS_PERIOD_US <= period_us <= MAX_CFS_PERIOD_US:
        raise InvalidArgument(
            f"CFS period {period_us} us is outside the kernel's range "
            f"{MIN_CFS_PERIOD_US}..{MAX_CFS_PERIOD_US} us"
        )


def cpu_limit_writes(
    version: Version, cpus: float | None, period_us: int = DEFAULT_CFS_PERIOD_US
) -> list[tuple[str, str]]:
    """Files and values that set (``cpus``) or lift (None) a CPU bandwidth limit.
    v1 writes the period before the quota: the kernel checks the quota against it."""
    check_cfs_period(period_us)
    quota = None if cpus is None else cfs_quota_us(cpus, period_us)
    if version == "v1":
        return [("cpu.cfs_period_us", str(period_us)), ("cpu.cfs_quota_us", str(quota or -1))]
    return [("cpu.max", f"{'max' if quota is None else quota} {period_us}")]


def memory_limit_writes(version: Version, limit_bytes: int | None) -> list[tuple[str, str]]:
    """Files and values that set or lift (None) a memory limit."""
    if limit_bytes is not None and (
        isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes <= 0
    ):
        raise InvalidArgument(
            f"memory limit {limit_bytes!r} must be a positive integer of bytes, or None for none"
        )
    if version == "v1":
        return [("memory.limit_in_bytes", str(-1 if limit_bytes is None else limit_bytes))]
    return [("memory.max", "max" if limit_bytes is None else str(limit_bytes))]


def procs_file() -> str:
    return "cgroup.procs"


def threads_file(version: Version) -> str:
    """Where a thread id is written to move one thread: v1 tasks, v2 cgroup.threads."""
    return "tasks" if version == "v1" else "cgroup.threads"


def cpu_usage_file(version: Version) -> tuple[str, str]:
    """(controller, file) reporting CPU time used."""
    return ("cpuacct", "cpuacct.usage") if version == "v1" else ("cpu", "cpu.stat")


def memory_usage_file(version: Version) -> str:
    return "memory.usage_in_bytes" if version == "v1" else "memory.current"


def parse_cpu_usage_ns(version: Version, text: str) -> int:
    """CPU time in ns from cpuacct.usage (ns) or cpu.stat's usage_usec."""
    if version == "v1":
        return int(text.strip())
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) * 1000
    raise ValueError(f"no usage_usec line in cpu.stat: {text!r}")


def parse_counter(text: str) -> int:
    """A single-number file (memory.current, pids.current, memory.usage_in_bytes)."""
    return int(text.strip())


def parse_controllers(text: str) -> set[str]:
    """cgroup.controllers / cgroup.subtree_control: names separated by spaces."""
    return set(text.split())


def subtree_control_write(missing: set[str]) -> str:
    """The line enabling controllers in cgroup.subtree_control ('+cpu +memory')."""
    return " ".join(f"+{c}" for c in sorted(missing))
