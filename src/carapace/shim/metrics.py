"""A container's guest cgroup v2 numbers as containerd's cgroups v1 Metrics (pure).

The guest runs cgroup v2; containerd's CRI and ``ctr task metrics`` read a shim's
Stats answer as ``io.containerd.cgroups.v1.Metrics`` the way runc's shim fills it on
a cgroup v1 host. The mapping follows what containerd and Kata do between v2 and v1:

- CPU: ``usage_usec``/``user_usec``/``system_usec`` (µs) become total/user/kernel
  in ns; ``nr_periods``/``nr_throttled``/``throttled_usec`` the throttling numbers.
  cgroup v2 has no per-CPU usage, so ``per_cpu`` stays empty.
- Memory: ``usage.usage`` is ``memory.current`` and ``usage.max`` ``memory.peak``.
  ``usage.limit`` (and ``hierarchical_memory_limit``) is ``memory.max``; with no
  limit it is what a v1 kernel reports for an unlimited cgroup,
  ``PAGE_COUNTER_MAX * 4096`` = 0x7FFFFFFFFFFFF000, so that consumers computing
  "usage / limit" or "limit - usage" behave as on v1 (never a limit of 0).
  CRI's working set is ``usage.usage - total_inactive_file``, so ``usage.usage`` and
  ``total_inactive_file`` are always filled. ``rss``/``total_rss`` = ``anon``,
  ``cache``/``total_cache`` = ``file``, ``rss_huge`` = ``anon_thp``, ``mapped_file``
  = ``file_mapped``, ``dirty`` = ``file_dirty``, ``writeback`` = ``file_writeback``,
  ``pg_fault``/``pg_maj_fault`` = ``pgfault``/``pgmajfault``; the active/inactive
  LRU sizes and ``unevictable`` keep their names. ``usage.failcnt`` is the
  ``max`` count of ``memory.events`` (times the limit was hit).
- Swap: ``swap.usage`` is ``memory.swap.current`` alone (the swap in use, which is
  what CRI reports as swap from a v1 Metrics), not v1's memory+swap ``memsw``.
- Kernel memory: ``kernel.usage`` is ``memory.stat``'s ``kernel`` (older kernels:
  ``kernel_stack + slab``), ``kernel_tcp.usage`` is ``sock``.
- Pids: ``pids.current`` / ``pids.max``, a limit of 0 meaning none (as v1 reports).
- OOM: ``memory_oom_control.oom_kill`` is ``memory.events``'s ``oom_kill``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from carapace.network.stats import InterfaceStats
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.containerd import metrics_pb2 as m

#: What a cgroup v1 kernel reports as the limit of an unlimited memory cgroup
#: (PAGE_COUNTER_MAX pages of 4 KiB: LONG_MAX rounded down to a page).
V1_UNLIMITED = 0x7FFFFFFFFFFFF000
NS_PER_USEC = 1000
UINT64_MAX = (1 << 64) - 1


def _ns(usec: int) -> int:
    return min(usec * NS_PER_USEC, UINT64_MAX)


def to_v1_metrics(stats: pb.StatsContainerResponse) -> m.Metrics:
    """containerd's v1 Metrics for a container's guest cgroup v2 stats."""
    cpu = stats.cpu_stat
    mem = stats.memory_stat
    events = stats.memory_events
    limit = stats.memory_max or V1_UNLIMITED
    kernel = mem["kernel"] if "kernel" in mem else mem.get("kernel_stack", 0) + mem.get("slab", 0)

    def both(v1_name: str, v2_name: str) -> dict[str, int]:
        value = mem.get(v2_name, 0)
        return {v1_name: value, f"total_{v1_name}": value}

    return m.Metrics(
        pids=m.PidsStat(current=stats.pids_current, limit=stats.pids_max),
        cpu=m.CPUStat(
            usage=m.CPUUsage(
                total=_ns(cpu.get("usage_usec", 0)),
                kernel=_ns(cpu.get("system_usec", 0)),
                user=_ns(cpu.get("user_usec", 0)),
            ),
            throttling=m.Throttle(
                periods=cpu.get("nr_periods", 0),
                throttled_periods=cpu.get("nr_throttled", 0),
                throttled_time=_ns(cpu.get("throttled_usec", 0)),
            ),
        ),
        memory=m.MemoryStat(
            **both("cache", "file"),
            **both("rss", "anon"),
            **both("rss_huge", "anon_thp"),
            **both("mapped_file", "file_mapped"),
            **both("dirty", "file_dirty"),
            **both("writeback", "file_writeback"),
            **both("pg_fault", "pgfault"),
            **both("pg_maj_fault", "pgmajfault"),
            **both("inactive_anon", "inactive_anon"),
            **both("active_anon", "active_anon"),
            **both("inactive_file", "inactive_file"),
            **both("active_file", "active_file"),
            **both("unevictable", "unevictable"),
            hierarchical_memory_limit=limit,
            usage=m.MemoryEntry(
                usage=stats.memory_current,
                limit=limit,
                max=stats.memory_peak,
                failcnt=events.get("max", 0),
            ),
            swap=m.MemoryEntry(usage=stats.swap_current),
            kernel=m.MemoryEntry(usage=kernel),
            kernel_tcp=m.MemoryEntry(usage=mem.get("sock", 0)),
        ),
        memory_oom_control=m.MemoryOomControl(oom_kill=events.get("oom_kill", 0)),
    )


def host_v1_metrics(
    cpu_usage_ns: int | None,
    memory_bytes: int | None,
    pids: int | None,
    network: Sequence[InterfaceStats] = (),
) -> m.Metrics:
    """containerd's v1 Metrics for the sandbox's host cgroup (QEMU, its threads and the
    shim): what the pod really costs the host, and the pod's network traffic per
    interface (counted on its taps, as the guest sees it). Numbers the host lacks
    stay 0."""
    return m.Metrics(
        pids=m.PidsStat(current=pids or 0),
        cpu=m.CPUStat(usage=m.CPUUsage(total=cpu_usage_ns or 0)),
        memory=m.MemoryStat(
            hierarchical_memory_limit=V1_UNLIMITED,
            usage=m.MemoryEntry(usage=memory_bytes or 0, limit=V1_UNLIMITED),
        ),
        network=[m.NetworkStat(**dataclasses.asdict(n)) for n in network],
    )
