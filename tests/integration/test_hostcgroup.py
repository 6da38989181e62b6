"""The host cgroup layer on this host's real cgroups (carapace.hostcgroup).

cgroup v1 for everything: placement through the preexec path, blkio throttles read
back from the kernel, a CPU limit on a thread child that the kernel enforces, stats,
removal, and removal from a record left by a killed owner. cgroup v2 on the
controller-less cgroup2 mount at /sys/fs/cgroup/unified: placement, threaded child,
removal (no controller can be enabled there, so no v2 limit is written for real).
No VM is started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from carapace.errors import HostError
from carapace.hostcgroup import (
    CgroupHandle,
    CgroupV1,
    CgroupV2,
    detect,
    driver,
    parse_blkio_cgroup,
    resolve_devices,
)

ROOT = Path("/sys/fs/cgroup")
UNIFIED = ROOT / "unified"
V1_CONTROLLERS = ("blkio", "cpu", "cpuacct", "memory", "pids")
# The seed's shape with workable numbers: its 400 bytes/s would throttle the page-ins of
# every process in the cgroup (and of anyone waiting on the same pages) to a crawl.
MIB400 = 400 << 20
SEED_FOR_VDA = json.dumps(
    {
        "blkiocgroup": [
            {
                "path": "/dev/vda",
                "limits": [
                    {"type": "throttle_read_bps", "value": MIB400},
                    {"type": "throttle_write_bps", "value": MIB400},
                    {"type": "throttle_read_iops", "value": 70000},
                    {"type": "throttle_write_iops", "value": 69999},
                ],
            },
            {"limits": [{"type": "blkio_weight", "value": 78}]},
        ]
    }
)
# A process with a second thread that spins; prints that thread's id, then waits.
SPINNER = (
    "import sys, threading\n"
    "def spin():\n"
    "    while True:\n"
    "        pass\n"
    "t = threading.Thread(target=spin, daemon=True)\n"
    "t.start()\n"
    "print(t.native_id, flush=True)\n"
    "sys.stdin.read()\n"
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are written as root")
needs_v1 = pytest.mark.skipif(
    not (ROOT / "blkio").is_dir() or (ROOT / "cgroup.controllers").exists(),
    reason="needs a cgroup v1 host",
)


def cgroup_lines(pid: int, tid: int | None = None) -> dict[str, str]:
    """/proc/<pid>/cgroup (or a thread's) as controller → path."""
    where = f"/proc/{pid}/task/{tid}/cgroup" if tid else f"/proc/{pid}/cgroup"
    out: dict[str, str] = {}
    for line in Path(where).read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def leftovers(name: str) -> list[str]:
    return sorted(str(p) for p in ROOT.glob(f"*/{name}"))


@pytest.fixture
def test_name() -> Iterator[str]:
    name = f"carapace-test-{uuid.uuid4().hex[:10]}"
    yield name
    assert leftovers(name) == [], f"cgroup directories left behind: {leftovers(name)}"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def start_spinner(handle: CgroupHandle, started: list[subprocess.Popen[str]]) -> tuple[int, int]:
    p = subprocess.Popen(
        [sys.executable, "-c", SPINNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=handle.preexec_fn(),
    )
    started.append(p)
    assert p.stdout is not None
    return p.pid, int(p.stdout.readline())


@needs_root
@needs_v1
def test_v1_placement_limits_stats_and_removal(
    test_name: str, procs: list[subprocess.Popen[str]]
) -> None:
    drv = driver()
    assert isinstance(drv, CgroupV1) and detect() == "v1"
    h = drv.create(f"{test_name}/sb", ["blkio", "cpu", "memory", "pids"])
    try:
        sleeper = subprocess.Popen(["sleep", "300"], preexec_fn=h.preexec_fn())
        procs.append(sleeper)  # type: ignore[arg-type]
        placed = cgroup_lines(sleeper.pid)
        for c in V1_CONTROLLERS:
            assert placed[c] == f"/{test_name}/sb", (c, placed)
        assert placed["freezer"] == "/"  # not asked for

        # blkio: the seed's throttles on this host's disk, read back from the kernel
        st = os.stat("/dev/vda")
        assert stat.S_ISBLK(st.st_mode)
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        result = h.set_blkio(resolve_devices(parse_blkio_cgroup(SEED_FOR_VDA)))
        blkio = ROOT / "blkio" / test_name / "sb"
        for name, value in (
            ("read_bps", MIB400),
            ("write_bps", MIB400),
            ("read_iops", 70000),
            ("write_iops", 69999),
        ):
            assert (blkio / f"blkio.throttle.{name}_device").read_text() == f"{dev} {value}\n"
        # the weight is either applied (and read back), or reported: never lost
        weights = [w for w in result.applied if "weight" in w.file]
        if weights:
            assert (blkio / weights[0].file).read_text().strip() == "78"
            schedulers = {
                p.parent.parent.name: p.read_text()
                for p in Path("/sys/block").glob("*/queue/scheduler")
            }
            if not any("[bfq]" in s for s in schedulers.values()):
                assert result.warnings, "a BFQ weight with no BFQ device must be reported"
        else:
            assert [u.type for u in result.unapplied] == ["blkio_weight"]

        # cpu: a thread of another process into the vcpus child, limited to half a CPU
        pid, tid = start_spinner(h, procs)
        h.add_threads([tid])
        h.set_cpu_limit(0.5, child="vcpus")
        vcpus = ROOT / "cpu" / test_name / "sb" / "vcpus"
        assert (vcpus / "cpu.cfs_quota_us").read_text() == "50000\n"
        assert (vcpus / "cpu.cfs_period_us").read_text() == "100000\n"
        assert cgroup_lines(pid, tid)["cpu"] == f"/{test_name}/sb/vcpus"
        assert cgroup_lines(pid, tid)["memory"] == f"/{test_name}/sb"
        assert cgroup_lines(pid)["cpu"] == f"/{test_name}/sb"  # the main thread stays
        # the kernel enforces it: the spinning thread gets at most ~half a CPU
        usage = ROOT / "cpuacct" / test_name / "sb" / "vcpus" / "cpuacct.usage"
        before, t0 = int(usage.read_text()), time.monotonic()
        time.sleep(1.0)
        used = (int(usage.read_text()) - before) / 1e9 / (time.monotonic() - t0)
        assert 0.01 < used < 0.7, f"spinning thread used {used:.2f} CPUs under a 0.5 limit"

        h.set_memory_limit(256 << 20)
        memory = ROOT / "memory" / test_name / "sb"
        assert (memory / "memory.limit_in_bytes").read_text() == f"{256 << 20}\n"

        stats = h.stats()
        assert stats.cpu_usage_ns is not None and stats.cpu_usage_ns > 0
        assert stats.memory_bytes is not None and stats.memory_bytes > 0
        assert stats.pids == 3  # sleep + the spinner's two threads
        assert h.pids() == {sleeper.pid, pid}

        with pytest.raises(
            HostError,
            match=re.escape(f"{ROOT}/cpu/{test_name}/sb/vcpus still holds processes {pid}"),
        ):
            h.remove(timeout=0.2)
        assert len(leftovers(test_name)) == 5
    finally:
        for p in procs:
            p.kill()
            p.wait()
        h.remove()
    assert h.created == []


@needs_root
@needs_v1
def test_v1_join_and_removal_by_another_process_after_a_crash(test_name: str) -> None:
    """The owner records its cgroup, puts itself inside and is killed; this process
    removes the cgroup from the record (garbage collection)."""
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, os, sys, time\n"
            "from carapace.hostcgroup import driver\n"
            f"h = driver().create('{test_name}/sb', ['cpu', 'memory', 'pids'])\n"
            "print(json.dumps(h.to_record()), flush=True)\n"
            "h.join(os.getpid())\n"
            "print('joined', flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        record = json.loads(owner.stdout.readline())
        assert owner.stdout.readline() == "joined\n"
        assert cgroup_lines(owner.pid)["memory"] == f"/{test_name}/sb"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    handle = CgroupHandle.from_record(record)
    assert handle.created and all(d.startswith(str(ROOT)) for d in handle.created)
    handle.remove()


@needs_root
def test_v2_on_the_unified_mount(test_name: str, procs: list[subprocess.Popen[str]]) -> None:
    if not (UNIFIED / "cgroup.controllers").exists():
        pytest.skip("no cgroup2 mount at /sys/fs/cgroup/unified")
    drv = driver(str(UNIFIED))
    assert isinstance(drv, CgroupV2) and detect(str(UNIFIED)) == "v2"
    available = (UNIFIED / "cgroup.controllers").read_text().split()
    if "cpu" not in available:
        with pytest.raises(HostError, match=r"controller.* cpu not available"):
            drv.create(f"{test_name}/sb", ["cpu"])
        assert not (UNIFIED / test_name).exists()
    h = drv.create(f"{test_name}/sb", [])
    try:
        assert h.created == [f"{UNIFIED}/{test_name}", f"{UNIFIED}/{test_name}/sb"]
        pid, tid = start_spinner(h, procs)
        assert cgroup_lines(pid)[""] == f"/{test_name}/sb"
        h.add_threads([tid])
        sb = UNIFIED / test_name / "sb"
        assert (sb / "vcpus" / "cgroup.type").read_text() == "threaded\n"
        assert (sb / "cgroup.type").read_text() == "domain threaded\n"
        assert cgroup_lines(pid, tid)[""] == f"/{test_name}/sb/vcpus"
        assert cgroup_lines(pid)[""] == f"/{test_name}/sb"
        assert (sb / "vcpus" / "cgroup.threads").read_text().split() == [str(tid)]
        stats = h.stats()
        assert stats.cpu_usage_ns is not None and stats.cpu_usage_ns > 0
        assert (stats.memory_bytes, stats.pids) == (None, None)  # no controllers here
        with pytest.raises(HostError, match="not created with the cpu controller"):
            h.set_cpu_limit(0.5, child="vcpus")
        record = json.loads(json.dumps(h.to_record()))
        with pytest.raises(HostError, match=re.escape(f"{sb}/vcpus still holds threads {tid}")):
            h.remove(timeout=0.2)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    CgroupHandle.from_record(record).remove()
    assert not (UNIFIED / test_name).exists()
