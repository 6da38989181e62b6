"""Onlining hot-added CPUs and memory blocks on a sysfs-like tree (carapace.guest.hotplug)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from carapace.guest import hotplug


def make_tree(root: Path, cpus: dict[int, str | None], blocks: dict[int, str]) -> None:
    """cpus: number -> content of its 'online' file (None: no such file, like cpu0)."""
    (root / "cpu").mkdir(parents=True)
    online = [n for n, v in cpus.items() if v in (None, "1")]
    (root / "cpu" / "online").write_text(",".join(map(str, online)) + "\n")
    for n, v in cpus.items():
        d = root / "cpu" / f"cpu{n}"
        d.mkdir()
        if v is not None:
            (d / "online").write_text(v + "\n")
    (root / "cpu" / "cpufreq").mkdir()  # not a CPU
    (root / "memory").mkdir()
    for n, state in blocks.items():
        d = root / "memory" / f"memory{n}"
        d.mkdir()
        (d / "state").write_text(state + "\n")
    (root / "memory" / "block_size_bytes").write_text("8000000\n")


@pytest.mark.parametrize(
    ("text", "cpus"), [("0\n", [0]), ("0-3\n", [0, 1, 2, 3]), ("0,2-3,7", [0, 2, 3, 7]), ("", [])]
)
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert hotplug.parse_cpu_list(text) == cpus


def test_online_all_onlines_offline_cpus_and_blocks(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {0: None, 1: "1", 2: "0", 10: "0"},
        {0: "online", 8: "offline", 9: "offline", 32: "online"},
    )
    r = hotplug.online_all(str(tmp_path))
    assert r.cpus == [2, 10]  # in numeric order, cpu10 after cpu2
    assert r.memory_blocks == [8, 9]
    assert r.errors == []
    assert (tmp_path / "cpu" / "cpu2" / "online").read_text() == "1"
    assert (tmp_path / "cpu" / "cpu1" / "online").read_text() == "1\n"  # untouched
    assert (tmp_path / "memory" / "memory9" / "state").read_text() == "online"
    assert (tmp_path / "memory" / "memory0" / "state").read_text() == "online\n"
    # nothing left to do the second time
    again = hotplug.online_all(str(tmp_path))
    assert (again.cpus, again.memory_blocks, again.errors) == ([], [], [])


def test_a_failed_write_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, {0: None, 1: "0", 2: "0"}, {4: "offline"})
    real_open = open

    def busy_cpu1(path: str, mode: str = "r", *args: Any, **kw: Any) -> Any:
        if "w" in mode and path.endswith("cpu1/online"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(hotplug, "open", busy_cpu1, raising=False)
    r = hotplug.online_all(str(tmp_path))
    assert r.cpus == [2]  # the others are still onlined
    assert r.memory_blocks == [4]
    assert r.errors == [f"{tmp_path}/cpu/cpu1/online: Device or resource busy"]


def test_online_cpus_and_mem_total(tmp_path: Path) -> None:
    make_tree(tmp_path, {0: None, 1: "1", 2: "0"}, {})
    assert hotplug.online_cpus(str(tmp_path)) == [0, 1]
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        4062884 kB\nMemFree:         3900000 kB\n")
    assert hotplug.mem_total_kb(str(meminfo)) == 4062884
    meminfo.write_text("MemFree: 1 kB\n")
    assert hotplug.mem_total_kb(str(meminfo)) == 0


def test_missing_memory_dir_is_nothing_to_online(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    r = hotplug.online_all(str(tmp_path))
    assert (r.cpus, r.memory_blocks) == ([], [])


def test_max_cpus_onlines_only_up_to_it(tmp_path: Path) -> None:
    make_tree(tmp_path, {0: None, 1: "0", 2: "0", 3: "0"}, {})
    r = hotplug.online_all(str(tmp_path), max_cpus=3)
    assert (r.cpus, r.offlined) == ([1, 2], [])
    assert (tmp_path / "cpu" / "cpu3" / "online").read_text() == "0\n"


def test_max_cpus_offlines_the_highest_surplus_cpus(tmp_path: Path) -> None:
    """Giving vCPUs back where QEMU cannot unplug them: 4 online, 2 wanted."""
    make_tree(tmp_path, {0: None, 1: "1", 2: "1", 3: "1"}, {})
    r = hotplug.online_all(str(tmp_path), max_cpus=2)
    assert (r.cpus, r.offlined, r.errors) == ([], [3, 2], [])
    assert (tmp_path / "cpu" / "cpu2" / "online").read_text() == "0"
    assert (tmp_path / "cpu" / "cpu1" / "online").read_text() == "1\n"
    # wanted again later: onlined again
    (tmp_path / "cpu" / "online").write_text("0-1\n")
    r = hotplug.online_all(str(tmp_path), max_cpus=4)
    assert r.cpus == [2, 3]
