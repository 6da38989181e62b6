"""Guest cgroup v2 stats as containerd's cgroups v1 Metrics (carapace.shim.metrics)."""

from __future__ import annotations

from carapace.protocols import agent_pb2 as pb
from carapace.protocols.containerd import metrics_pb2
from carapace.shim.metrics import V1_UNLIMITED, to_v1_metrics

# a busybox shell loop with two sleeps in a guest 6.1 kernel, as StatsContainer said
CPU_STAT = {
    "usage_usec": 1064649,
    "user_usec": 231116,
    "system_usec": 833533,
    "nr_periods": 40,
    "nr_throttled": 7,
    "throttled_usec": 91234,
    "nr_bursts": 0,
    "burst_usec": 0,
}
MEMORY_STAT = {
    "anon": 172032,
    "file": 1986560,
    "kernel": 286720,
    "kernel_stack": 32768,
    "pagetables": 61440,
    "sock": 8192,
    "shmem": 4096,
    "file_mapped": 1589248,
    "file_dirty": 12288,
    "file_writeback": 4096,
    "anon_thp": 2097152,
    "inactive_anon": 159744,
    "active_anon": 12288,
    "inactive_file": 1208320,
    "active_file": 774144,
    "unevictable": 16384,
    "slab_reclaimable": 74424,
    "slab_unreclaimable": 66792,
    "slab": 141216,
    "pgfault": 251,
    "pgmajfault": 9,
    "workingset_refault_file": 0,
}
MEMORY_EVENTS = {"low": 0, "high": 0, "max": 124, "oom": 2, "oom_kill": 1, "oom_group_kill": 0}


def stats(**overrides: int) -> pb.StatsContainerResponse:
    values = {
        "memory_current": 2637824,
        "memory_max": 33554432,
        "memory_peak": 2711552,
        "swap_current": 65536,
        "pids_current": 3,
        "pids_max": 100,
        **overrides,
    }
    return pb.StatsContainerResponse(
        cpu_stat=CPU_STAT, memory_stat=MEMORY_STAT, memory_events=MEMORY_EVENTS, **values
    )


def test_cpu_is_in_nanoseconds() -> None:
    cpu = to_v1_metrics(stats()).cpu
    assert cpu.usage.total == 1064649000
    assert cpu.usage.kernel == 833533000
    assert cpu.usage.user == 231116000
    assert list(cpu.usage.per_cpu) == []  # cgroup v2 has no per-CPU usage
    assert cpu.throttling.periods == 40
    assert cpu.throttling.throttled_periods == 7
    assert cpu.throttling.throttled_time == 91234000


def test_memory_usage_limit_and_peak() -> None:
    mem = to_v1_metrics(stats()).memory
    assert mem.usage.usage == 2637824
    assert mem.usage.limit == 33554432
    assert mem.hierarchical_memory_limit == 33554432
    assert mem.usage.max == 2711552
    assert mem.usage.failcnt == 124


def test_no_memory_limit_reads_as_a_v1_unlimited_cgroup() -> None:
    mem = to_v1_metrics(stats(memory_max=0)).memory
    assert mem.usage.limit == V1_UNLIMITED == 9223372036854771712
    assert mem.usage.limit % 4096 == 0
    assert mem.hierarchical_memory_limit == V1_UNLIMITED


def test_memory_stat_names() -> None:
    mem = to_v1_metrics(stats()).memory
    expected = {
        "rss": 172032,
        "cache": 1986560,
        "rss_huge": 2097152,
        "mapped_file": 1589248,
        "dirty": 12288,
        "writeback": 4096,
        "pg_fault": 251,
        "pg_maj_fault": 9,
        "inactive_anon": 159744,
        "active_anon": 12288,
        "inactive_file": 1208320,
        "active_file": 774144,
        "unevictable": 16384,
    }
    for name, value in expected.items():
        assert getattr(mem, name) == value, name
        assert getattr(mem, f"total_{name}") == value, f"total_{name}"
    assert mem.swap.usage == 65536
    assert mem.kernel.usage == 286720
    assert mem.kernel_tcp.usage == 8192


def test_cri_working_set() -> None:
    # containerd's CRI: working set = usage - total_inactive_file (when smaller)
    mem = to_v1_metrics(stats()).memory
    assert mem.usage.usage - mem.total_inactive_file == 2637824 - 1208320


def test_kernel_memory_without_the_kernel_key() -> None:
    s = stats()
    del s.memory_stat["kernel"]
    assert to_v1_metrics(s).memory.kernel.usage == 32768 + 141216


def test_pids_and_oom_kills() -> None:
    m = to_v1_metrics(stats())
    assert (m.pids.current, m.pids.limit) == (3, 100)
    assert m.memory_oom_control.oom_kill == 1
    assert to_v1_metrics(stats(pids_max=0)).pids.limit == 0  # no limit, as v1 says


def test_empty_stats_give_zeros_not_errors() -> None:
    m = to_v1_metrics(pb.StatsContainerResponse())
    assert m.cpu.usage.total == 0
    assert m.memory.usage.usage == 0
    assert m.memory.usage.limit == V1_UNLIMITED
    assert m.memory_oom_control.oom_kill == 0


def test_the_result_is_the_wire_type_containerd_reads() -> None:
    m = to_v1_metrics(stats())
    assert m.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    again = metrics_pb2.Metrics.FromString(m.SerializeToString())
    assert again == m


def test_huge_microsecond_counts_do_not_overflow() -> None:
    s = stats()
    s.cpu_stat["usage_usec"] = 2**64 - 1
    assert to_v1_metrics(s).cpu.usage.total == 2**64 - 1
