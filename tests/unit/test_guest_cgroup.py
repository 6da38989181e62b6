"""Reading containers' cgroup v2 files in the guest (carapace.guest.cgroup), on a
temporary tree laid out like /sys/fs/cgroup."""

from __future__ import annotations

from pathlib import Path

from carapace.guest import cgroup
from carapace.guest.spec import guest_spec
from carapace.oci.spec import default_spec

# as the guest's 6.1 kernel writes them (captured from a running container)
CPU_STAT = """usage_usec 1064649
user_usec 231116
system_usec 833533
core_sched.force_idle_usec 0
nr_periods 12
nr_throttled 3
throttled_usec 4500
nr_bursts 0
burst_usec 0
"""
MEMORY_STAT = """anon 172032
file 1986560
kernel 286720
kernel_stack 32768
pagetables 61440
sock 0
shmem 4096
file_mapped 1589248
file_dirty 0
file_writeback 0
anon_thp 0
inactive_anon 159744
active_anon 12288
inactive_file 1208320
active_file 774144
unevictable 0
slab_reclaimable 74424
slab_unreclaimable 66792
slab 141216
pgfault 251
pgmajfault 9
"""
MEMORY_EVENTS = "low 0\nhigh 0\nmax 124\noom 1\noom_kill 1\noom_group_kill 0\n"


def make_cgroup(root: Path, cid: str, files: dict[str, str]) -> Path:
    d = Path(cgroup.container_cgroup(cid, str(root)))
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def test_the_container_cgroup_is_the_one_the_spec_names(tmp_path: Path) -> None:
    assert cgroup.cgroups_path("c1") == "/carapace/c1"
    assert cgroup.container_cgroup("c1") == "/sys/fs/cgroup/carapace/c1"
    assert cgroup.container_cgroup("c1", str(tmp_path)) == f"{tmp_path}/carapace/c1"
    spec = guest_spec(default_spec(["true"]), "c1", "/rootfs")
    assert cgroup.CGROUP_ROOT + spec["linux"]["cgroupsPath"] == cgroup.container_cgroup("c1")


def test_flat_keyed_files() -> None:
    cpu = cgroup.parse_flat_keyed(CPU_STAT)
    assert cpu["usage_usec"] == 1064649
    assert cpu["core_sched.force_idle_usec"] == 0
    assert len(cpu) == 9
    assert cgroup.parse_flat_keyed(MEMORY_EVENTS) == {
        "low": 0, "high": 0, "max": 124, "oom": 1, "oom_kill": 1, "oom_group_kill": 0,
    }  # fmt: skip
    assert cgroup.parse_flat_keyed("") == {}


def test_flat_keyed_skips_what_is_not_key_value_and_clamps_to_uint64() -> None:
    text = "good 5\nnested N0=1 N1=2\nword abc\n\nneg -3\nhuge 99999999999999999999999\n  \n"
    assert cgroup.parse_flat_keyed(text) == {"good": 5, "neg": 0, "huge": 2**64 - 1}


def test_single_values() -> None:
    assert cgroup.parse_value("2637824\n") == 2637824
    assert cgroup.parse_value("max\n") == 0
    assert cgroup.parse_value("") == 0
    assert cgroup.parse_value("garbage") == 0


def test_read_stats_of_a_full_cgroup(tmp_path: Path) -> None:
    d = make_cgroup(
        tmp_path,
        "c1",
        {
            "cpu.stat": CPU_STAT,
            "memory.stat": MEMORY_STAT,
            "memory.events": MEMORY_EVENTS,
            "memory.current": "2637824\n",
            "memory.max": "33554432\n",
            "memory.peak": "2711552\n",
            "memory.swap.current": "4096\n",
            "pids.current": "3\n",
            "pids.max": "100\n",
        },
    )
    s = cgroup.read_stats(str(d))
    assert s.cpu_stat["usage_usec"] == 1064649
    assert s.cpu_stat["nr_throttled"] == 3
    assert s.memory_stat["anon"] == 172032
    assert s.memory_stat["inactive_file"] == 1208320
    assert s.memory_events["oom_kill"] == 1
    assert (s.memory_current, s.memory_max, s.memory_peak) == (2637824, 33554432, 2711552)
    assert (s.swap_current, s.pids_current, s.pids_max) == (4096, 3, 100)


def test_read_stats_max_is_zero_and_missing_files_are_zero(tmp_path: Path) -> None:
    d = make_cgroup(
        tmp_path,
        "c1",
        {"memory.current": "8192\n", "memory.max": "max\n", "pids.max": "max\n"},
    )
    s = cgroup.read_stats(str(d))  # no memory.peak (kernel < 5.19), no swap, no cpu.stat
    assert (s.memory_current, s.memory_max, s.memory_peak, s.pids_max) == (8192, 0, 0, 0)
    assert dict(s.cpu_stat) == {} and dict(s.memory_events) == {}


def test_read_stats_of_a_cgroup_that_is_gone(tmp_path: Path) -> None:
    s = cgroup.read_stats(str(tmp_path / "carapace" / "gone"))
    assert s.memory_current == 0 and dict(s.memory_stat) == {}


def test_oom_kills(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path, "c1", {"memory.events": MEMORY_EVENTS})
    assert cgroup.oom_kills(str(d)) == 1
    (d / "memory.events").write_text("oom 0\n")
    assert cgroup.oom_kills(str(d)) == 0
    assert cgroup.oom_kills(str(tmp_path / "nothing")) == 0


def test_list_pids_walks_child_cgroups(tmp_path: Path) -> None:
    d = make_cgroup(tmp_path, "c1", {"cgroup.procs": "81\n83\n"})
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "cgroup.procs").write_text("120\n7\n")
    (d / "sub" / "deeper" / "cgroup.procs").write_text("300\n83\n")
    (d / "empty").mkdir()
    (d / "empty" / "cgroup.procs").write_text("")
    assert cgroup.list_pids(str(d)) == [7, 81, 83, 120, 300]
    assert cgroup.list_pids(str(tmp_path / "gone")) == []


def test_parse_procs() -> None:
    assert cgroup.parse_procs("1\n22\n333\n") == [1, 22, 333]
    assert cgroup.parse_procs("") == []
