"""The host cgroup drivers (carapace.hostcgroup.driver) on temporary trees laid out
like cgroup v1 and v2. ``KernelLikeFs`` does what the kernel does on cgroupfs: a
new cgroup directory gets its interface files, rmdir refuses a populated cgroup,
cgroup.subtree_control takes '+x -y', device files keep one line per device."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from carapace.config import Config
from carapace.errors import HostError, InvalidArgument
from carapace.hostcgroup import (
    BlkioLimit,
    CgroupFs,
    CgroupHandle,
    CgroupV1,
    CgroupV2,
    Device,
    ResolvedBlkioItem,
    detect,
    driver,
)
from carapace.hostcgroup.driver import parse_proc_cgroup
from carapace.hostcgroup.fs import CgroupGone
from carapace.sandbox.placement import SandboxCgroupPlacement
from carapace.sandbox.plan import HostFacts, SandboxOptions, plan_sandbox
from carapace.sandbox.state import SandboxRecord

V1_HIERARCHIES = ("blkio", "cpu,cpuacct", "cpuset", "memory", "pids", "freezer")
V1_FILES = {
    "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.shares": "1024"},
    "cpuacct": {"cpuacct.usage": "0"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": ""},
    "memory": {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "0"},
    "pids": {"pids.current": "0", "pids.max": "max"},
    "blkio": {
        "blkio.throttle.read_bps_device": "",
        "blkio.throttle.write_bps_device": "",
        "blkio.throttle.read_iops_device": "",
        "blkio.throttle.write_iops_device": "",
    },
    "freezer": {"freezer.state": "THAWED"},
}
V2_FILES = {
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100"},
    "memory": {"memory.max": "max", "memory.current": "0"},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "io": {"io.max": ""},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": ""},
}
V2_KEYED_FILES = ("io.max", "io.weight", "io.bfq.weight")
MEMBER_FILES = ("cgroup.procs", "tasks", "cgroup.threads")


class KernelLikeFs(CgroupFs):
    """cgroupfs semantics on a plain directory tree."""

    def __init__(self, root: Path, version: str, weight_files: dict[str, str] | None = None):
        self.root = root
        self.version = version
        self.weight_files = weight_files or {}
        self.writes: list[tuple[str, str]] = []

    def controllers_of(self, directory: str) -> list[str]:
        if self.version == "v1":
            hierarchy = Path(directory).relative_to(self.root).parts[0]
            return hierarchy.split(",")
        parent = Path(directory).parent
        return (parent / "cgroup.subtree_control").read_text().split()

    def mkdir(self, path: str) -> bool:
        made = super().mkdir(path)
        if made:
            d = Path(path)
            for name in MEMBER_FILES if self.version == "v1" else MEMBER_FILES[::2]:
                (d / name).write_text("")
            if self.version == "v2":
                (d / "cgroup.type").write_text("domain\n")
                (d / "cgroup.controllers").write_text(
                    (d.parent / "cgroup.subtree_control").read_text()
                )
                (d / "cgroup.subtree_control").write_text("")
                (d / "cpu.stat").write_text("usage_usec 0\nuser_usec 0\n")
            table = V1_FILES if self.version == "v1" else V2_FILES
            for c in self.controllers_of(path):
                for name, value in table.get(c, {}).items():
                    (d / name).write_text(value)
                if c in ("blkio", "io"):
                    for name, value in self.weight_files.items():
                        (d / name).write_text(value)
        return made

    def rmdir(self, path: str) -> None:
        d = Path(path)
        if any(p.is_dir() for p in d.iterdir()):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        for name in MEMBER_FILES:
            if (d / name).exists() and (d / name).read_text().strip():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        shutil.rmtree(path)

    def write(self, path: str, value: str) -> None:
        self.writes.append((path, value))
        p = Path(path)
        if not p.exists():
            raise HostError(f"cannot write {value!r} to {path}: No such file or directory")
        old = p.read_text()
        if p.name in MEMBER_FILES:
            lines = old.split()
            new = "\n".join([*lines, value] if value not in lines else lines)
        elif p.name == "cgroup.subtree_control":
            enabled = old.split()
            available = (p.parent / "cgroup.controllers").read_text().split()
            for tok in value.split():
                name = tok[1:]
                if name not in available:
                    raise HostError(f"cannot write {value!r} to {path}: No such file or directory")
                if tok[0] == "+" and name not in enabled:
                    enabled.append(name)
                elif tok[0] == "-" and name in enabled:
                    enabled.remove(name)
            new = " ".join(sorted(enabled))
            for child in (c for c in p.parent.iterdir() if c.is_dir()):  # files appear
                for name in enabled:
                    for f, v in V2_FILES.get(name, {}).items():
                        if not (child / f).exists():
                            (child / f).write_text(v)
        elif p.name.endswith("_device") or p.name in V2_KEYED_FILES:
            key = value.split()[0]
            kept = [line for line in old.splitlines() if line.split()[0] != key]
            new = "\n".join([*kept, value])
        else:
            new = value
        p.write_text(new + "\n")


def v1_tree(tmp_path: Path, weight_files: dict[str, str] | None = None) -> KernelLikeFs:
    for h in V1_HIERARCHIES:
        d = tmp_path / h
        d.mkdir()
        for name in MEMBER_FILES[:2]:
            (d / name).write_text("1\n")
        for c in h.split(","):
            for name, value in V1_FILES[c].items():
                (d / name).write_text(value)
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (tmp_path / "cpuset" / "cpuset.mems").write_text("0\n")
    # as on systemd hosts: the single names are symlinks to the co-mount
    (tmp_path / "cpu").symlink_to("cpu,cpuacct")
    (tmp_path / "cpuacct").symlink_to("cpu,cpuacct")
    return KernelLikeFs(tmp_path, "v1", weight_files)


def v2_tree(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> KernelLikeFs:
    for name, value in {
        "cgroup.controllers": controllers,
        "cgroup.subtree_control": "",
        "cgroup.procs": "1",
        "cgroup.threads": "1",
        "cpu.stat": "usage_usec 5\n",
    }.items():
        (tmp_path / name).write_text(value + "\n")
    return KernelLikeFs(tmp_path, "v2", {"io.weight": "default 100"})


def read(path: Path) -> str:
    return path.read_text().strip()


# ------------------------------------------------------------------ detection


def test_detect_and_driver(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    v1.mkdir()
    v1_tree(v1)
    v2 = tmp_path / "v2"
    v2.mkdir()
    v2_tree(v2)
    assert detect(str(v1)) == "v1"
    assert detect(str(v2)) == "v2"
    assert isinstance(driver(str(v1)), CgroupV1)
    assert isinstance(driver(str(v2)), CgroupV2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "unified").mkdir()
    (empty / "unified" / "cgroup.procs").write_text("")
    with pytest.raises(HostError, match="neither a cgroup v2 mount"):
        detect(str(empty))
    with pytest.raises(HostError, match="cannot read cgroup root"):
        detect(str(tmp_path / "missing"))


# ------------------------------------------------------------------ v1


def test_v1_create_places_each_controller_in_its_hierarchy(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("carapace/sb1", ["blkio", "cpu", "memory", "pids"])
    t = str(tmp_path)
    assert h.dirs == {
        "blkio": f"{t}/blkio/carapace/sb1",
        "cpu": f"{t}/cpu/carapace/sb1",
        "cpuacct": f"{t}/cpu/carapace/sb1",  # co-mounted: the same directory
        "memory": f"{t}/memory/carapace/sb1",
        "pids": f"{t}/pids/carapace/sb1",
    }
    assert h.created == [
        f"{t}/blkio/carapace",
        f"{t}/blkio/carapace/sb1",
        f"{t}/cpu/carapace",
        f"{t}/cpu/carapace/sb1",
        f"{t}/memory/carapace",
        f"{t}/memory/carapace/sb1",
        f"{t}/pids/carapace",
        f"{t}/pids/carapace/sb1",
    ]
    assert h.procs_files() == [
        f"{t}/blkio/carapace/sb1/cgroup.procs",
        f"{t}/cpu/carapace/sb1/cgroup.procs",
        f"{t}/memory/carapace/sb1/cgroup.procs",
        f"{t}/pids/carapace/sb1/cgroup.procs",
    ]
    assert not (tmp_path / "freezer" / "carapace").exists()


def test_v1_separate_cpuacct_mount_joins_cpu(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    (tmp_path / "cpuacct").unlink()
    (tmp_path / "cpuacct").mkdir()
    (tmp_path / "cpuacct" / "cgroup.procs").write_text("")
    h = CgroupV1(str(tmp_path), fs).create("sb", ["cpu"])
    assert h.dirs == {"cpu": f"{tmp_path}/cpu/sb", "cpuacct": f"{tmp_path}/cpuacct/sb"}
    (tmp_path / "cpuacct" / "sb" / "cpuacct.usage").write_text("777\n")
    assert h.stats().cpu_usage_ns == 777


def test_v1_co_mount_found_without_symlinks(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    (tmp_path / "cpu").unlink()
    (tmp_path / "cpuacct").unlink()
    h = CgroupV1(str(tmp_path), fs).create("sb", ["cpuacct", "cpu"])
    assert h.dirs == {"cpu": f"{tmp_path}/cpu,cpuacct/sb", "cpuacct": f"{tmp_path}/cpu,cpuacct/sb"}
    assert h.created == [f"{tmp_path}/cpu,cpuacct/sb"]


def test_v1_cpuset_cgroups_inherit_cpus_and_mems(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("a/b", ["cpuset"])
    assert read(tmp_path / "cpuset" / "a" / "cpuset.cpus") == "0-3"
    assert read(tmp_path / "cpuset" / "a" / "b" / "cpuset.mems") == "0"
    h.add_threads([42])
    assert read(tmp_path / "cpuset" / "a" / "b" / "vcpus" / "cpuset.cpus") == "0-3"
    assert read(tmp_path / "cpuset" / "a" / "b" / "vcpus" / "tasks") == "42"


def test_v1_limits_threads_and_stats(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("carapace/sb", ["cpu", "memory", "pids", "blkio"])
    sb = tmp_path / "cpu" / "carapace" / "sb"
    h.join(1234)
    for f in h.procs_files():
        assert read(Path(f)) == "1234"
    h.add_threads([1300, 1301])
    assert h.children == {"vcpus": {"cpu": str(sb / "vcpus"), "cpuacct": str(sb / "vcpus")}}
    assert read(sb / "vcpus" / "tasks") == "1300\n1301"
    assert not (tmp_path / "memory" / "carapace" / "sb" / "vcpus").exists()
    h.set_cpu_limit(0.5, child="vcpus")
    assert read(sb / "vcpus" / "cpu.cfs_quota_us") == "50000"
    assert read(sb / "vcpus" / "cpu.cfs_period_us") == "100000"
    assert read(sb / "cpu.cfs_quota_us") == "-1"
    h.set_cpu_limit(2, period_us=50_000)
    assert (read(sb / "cpu.cfs_quota_us"), read(sb / "cpu.cfs_period_us")) == ("100000", "50000")
    h.set_cpu_limit(None)
    assert read(sb / "cpu.cfs_quota_us") == "-1"
    h.set_memory_limit(256 << 20)
    assert read(tmp_path / "memory" / "carapace" / "sb" / "memory.limit_in_bytes") == "268435456"
    h.set_memory_limit(None)
    assert read(tmp_path / "memory" / "carapace" / "sb" / "memory.limit_in_bytes") == "-1"
    (sb / "cpuacct.usage").write_text("123456\n")
    (tmp_path / "memory" / "carapace" / "sb" / "memory.usage_in_bytes").write_text("4096\n")
    (tmp_path / "pids" / "carapace" / "sb" / "pids.current").write_text("3\n")
    stats = h.stats()
    assert (stats.cpu_usage_ns, stats.memory_bytes, stats.pids) == (123456, 4096, 3)
    assert h.pids() == {1234}
    with pytest.raises(HostError, match="no thread child 'io'"):
        h.set_cpu_limit(1, child="io")
    with pytest.raises(InvalidArgument):
        h.add_threads([1], child="../x")


def test_v1_stats_report_only_what_exists(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("sb", ["memory"])
    stats = h.stats()
    assert (stats.cpu_usage_ns, stats.memory_bytes, stats.pids) == (None, 0, None)
    with pytest.raises(HostError, match="not created with the cpu controller"):
        h.set_cpu_limit(1)
    with pytest.raises(HostError, match="none of the controllers that place single threads"):
        h.add_threads([1])


def test_v1_blkio_writes_lines_and_reports_missing_weight(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("sb", ["blkio"])
    items = [
        ResolvedBlkioItem(
            "/dev/vda",
            Device(254, 0),
            (BlkioLimit("throttle_read_bps", 400), BlkioLimit("throttle_write_iops", 699)),
        ),
        ResolvedBlkioItem("/dev/sda", Device(8, 0), (BlkioLimit("throttle_read_bps", 1),)),
        ResolvedBlkioItem(None, None, (BlkioLimit("blkio_weight", 78),)),
    ]
    result = h.set_blkio(items, sys_root=str(tmp_path / "nosys"))
    d = tmp_path / "blkio" / "sb"
    assert read(d / "blkio.throttle.read_bps_device") == "254:0 400\n8:0 1"
    assert read(d / "blkio.throttle.write_iops_device") == "254:0 699"
    assert [u.type for u in result.unapplied] == ["blkio_weight"]
    # one device line per write, as the kernel wants
    assert (str(d / "blkio.throttle.read_bps_device"), "8:0 1") in fs.writes


def test_v1_blkio_weight_goes_to_the_file_that_exists(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path, {"blkio.bfq.weight": "100", "blkio.bfq.weight_device": ""})
    h = CgroupV1(str(tmp_path), fs).create("sb", ["blkio"])
    result = h.set_blkio([ResolvedBlkioItem(None, None, (BlkioLimit("blkio_weight", 78),))])
    assert read(tmp_path / "blkio" / "sb" / "blkio.bfq.weight") == "78"
    assert result.unapplied == []


def test_v1_missing_hierarchy_creates_nothing(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    with pytest.raises(HostError, match="no cgroup v1 hierarchy for the hugetlb controller"):
        CgroupV1(str(tmp_path), fs).create("sb", ["cpu", "hugetlb"])
    assert not (tmp_path / "cpu" / "sb").exists()
    with pytest.raises(InvalidArgument, match="unknown cgroup controller"):
        CgroupV1(str(tmp_path), fs).create("sb", ["nope"])


def test_v1_failure_half_way_undoes_what_was_made(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    (tmp_path / "memory" / "sb").write_text("a file in the way")
    with pytest.raises(HostError, match="non-directory is in the way"):
        CgroupV1(str(tmp_path), fs).create("sb/x", ["blkio", "cpu", "memory"])
    assert not (tmp_path / "blkio" / "sb").exists()
    assert not (tmp_path / "cpu" / "sb").exists()


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", "./a", "a/.", "a\nb"])
def test_cgroup_paths_must_be_relative_and_clean(tmp_path: Path, bad: str) -> None:
    fs = v1_tree(tmp_path)
    with pytest.raises(InvalidArgument, match="must be relative"):
        CgroupV1(str(tmp_path), fs).create(bad, ["cpu"])


# ------------------------------------------------------------------ removal


def test_remove_deletes_only_what_it_created(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    drv = CgroupV1(str(tmp_path), fs)
    existing = drv.create("kubepods/pod1", ["cpu", "memory"])  # someone else's parent
    h = drv.create("kubepods/pod1/sb", ["cpu", "memory"])
    assert h.created == [f"{tmp_path}/cpu/kubepods/pod1/sb", f"{tmp_path}/memory/kubepods/pod1/sb"]
    h.add_threads([7])
    (tmp_path / "cpu" / "kubepods" / "pod1" / "sb" / "vcpus" / "tasks").write_text("")
    h.remove()
    assert h.created == []
    assert not (tmp_path / "cpu" / "kubepods" / "pod1" / "sb").exists()
    assert (tmp_path / "cpu" / "kubepods" / "pod1").is_dir()
    assert (tmp_path / "memory" / "kubepods" / "pod1").is_dir()
    h.remove()  # again: nothing to do
    existing.remove()
    assert not (tmp_path / "cpu" / "kubepods").exists()


def test_remove_waits_then_names_the_cgroup_holding_processes(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("carapace/sb", ["cpu", "pids"])
    h.join(4242)
    with pytest.raises(HostError) as info:
        h.remove(timeout=0.05)
    message = str(info.value)
    assert f"{tmp_path}/cpu/carapace/sb still holds processes 4242 (kill them first)" in message
    assert f"{tmp_path}/pids/carapace/sb still holds processes 4242" in message
    # the handle still knows everything it made: remove() can be called again
    assert len(h.created) == 4
    for f in h.procs_files():
        Path(f).write_text("")
    h.remove(timeout=0.05)
    assert h.created == []
    assert not (tmp_path / "cpu" / "carapace").exists()


def test_remove_refuses_a_leaf_holding_foreign_cgroups_but_leaves_shared_parents(
    tmp_path: Path,
) -> None:
    fs = v1_tree(tmp_path)
    drv = CgroupV1(str(tmp_path), fs)
    a = drv.create("carapace/a", ["pids"])  # makes carapace/ too
    b = drv.create("carapace/b", ["pids"])
    assert b.created == [f"{tmp_path}/pids/carapace/b"]
    a.remove()  # carapace/ still holds b: left to b's owner, not an error
    assert (tmp_path / "pids" / "carapace" / "b").is_dir()
    assert a.created == []
    fs.mkdir(str(tmp_path / "pids" / "carapace" / "b" / "foreign"))
    with pytest.raises(HostError, match="holds cgroups it did not create: foreign"):
        b.remove(timeout=0.05)


def test_the_runtimes_own_parent_goes_with_the_last_cgroup_in_it(tmp_path: Path) -> None:
    """carapace/ is carapace's own: whichever sandbox leaves last removes it, whoever
    made it (without own_parents, b would leave it behind)."""
    fs = v1_tree(tmp_path)
    drv = CgroupV1(str(tmp_path), fs)
    a = drv.create("carapace/a", ["pids"], own_parents=1)
    b = drv.create("carapace/b", ["pids"], own_parents=1)
    assert b.created == [f"{tmp_path}/pids/carapace", f"{tmp_path}/pids/carapace/b"]
    a.remove()
    assert (tmp_path / "pids" / "carapace" / "b").is_dir()  # b's still there
    b.remove()
    assert not (tmp_path / "pids" / "carapace").exists()


def test_record_round_trip_lets_another_process_remove(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("carapace/sb", ["cpu", "memory", "blkio"])
    h.add_threads([9])
    (tmp_path / "cpu" / "carapace" / "sb" / "vcpus" / "tasks").write_text("")
    record = json.loads(json.dumps(h.to_record()))
    assert record["version"] == "v1"
    assert record["root"] == str(tmp_path)
    assert record["children"]["vcpus"]["cpu"] == f"{tmp_path}/cpu/carapace/sb/vcpus"
    again = CgroupHandle.from_record(record, fs)
    assert again.to_record() == h.to_record()
    assert again.version == "v1"
    again.set_cpu_limit(1.5, child="vcpus")
    assert read(tmp_path / "cpu" / "carapace" / "sb" / "vcpus" / "cpu.cfs_quota_us") == "150000"
    again.remove()
    for hierarchy in ("cpu", "memory", "blkio"):
        assert not (tmp_path / hierarchy / "carapace").exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": "v3"}, "'version'"),
        ({"root": "relative"}, "'root'"),
        ({"path": "/abs"}, "must be relative"),
        ({"created": ["/etc"]}, "'created' must list directories below"),
        ({"created": ["ROOT/../../etc"]}, "'created' must list directories below"),
        ({"created": ["ROOT"]}, "'created' must list directories below"),
        ({"dirs": {"cpu": "/tmp"}}, "'dirs' must map"),
        ({"children": {"vcpus": {"cpu": "/"}}}, "'children.vcpus' must map"),
        ({"children": []}, "'children' must be an object"),
    ],
)
def test_damaged_records_are_refused(tmp_path: Path, change: dict[str, object], match: str) -> None:
    fs = v1_tree(tmp_path)
    record = CgroupV1(str(tmp_path), fs).create("sb", ["cpu"]).to_record()
    patched = json.loads(json.dumps(change).replace("ROOT", str(tmp_path)))
    record.update(patched)
    with pytest.raises(InvalidArgument, match=match):
        CgroupHandle.from_record(record, fs)
    with pytest.raises(InvalidArgument, match="not an object"):
        CgroupHandle.from_record([], fs)


# ------------------------------------------------------------------ v2


def test_v2_create_enables_controllers_down_the_path(tmp_path: Path) -> None:
    fs = v2_tree(tmp_path)
    h = CgroupV2(str(tmp_path), fs).create("carapace/sb", ["cpu", "cpuacct", "memory", "blkio"])
    leaf = f"{tmp_path}/carapace/sb"
    assert h.dirs == {"cpu": leaf, "io": leaf, "memory": leaf}
    assert h.created == [f"{tmp_path}/carapace", leaf]
    assert read(tmp_path / "cgroup.subtree_control") == "cpu io memory"
    assert read(tmp_path / "carapace" / "cgroup.subtree_control") == "cpu io memory"
    assert read(tmp_path / "carapace" / "sb" / "cgroup.subtree_control") == ""
    assert h.procs_files() == [f"{leaf}/cgroup.procs"]
    # nothing is enabled twice
    CgroupV2(str(tmp_path), fs).create("carapace/sb2", ["memory"])
    assert [v for p, v in fs.writes if p == f"{tmp_path}/cgroup.subtree_control"] == [
        "+cpu +io +memory"
    ]


def test_v2_unavailable_controller_creates_nothing(tmp_path: Path) -> None:
    fs = v2_tree(tmp_path, controllers="cpu memory")
    with pytest.raises(HostError, match=r"controller\(s\) pids not available in"):
        CgroupV2(str(tmp_path), fs).create("carapace/sb", ["cpu", "pids"])
    assert not (tmp_path / "carapace").exists()


def test_v2_limits_threads_stats_and_remove(tmp_path: Path) -> None:
    fs = v2_tree(tmp_path)
    h = CgroupV2(str(tmp_path), fs).create("carapace/sb", ["cpu", "memory", "pids", "io"])
    sb = tmp_path / "carapace" / "sb"
    h.join(500)
    assert read(sb / "cgroup.procs") == "500"
    h.add_threads([501, 502])
    assert read(sb / "vcpus" / "cgroup.type") == "threaded"
    assert read(sb / "vcpus" / "cgroup.threads") == "501\n502"
    assert read(sb / "cgroup.subtree_control") == "cpu pids"  # threaded controllers only
    h.add_threads([503])  # the child exists already
    assert read(sb / "vcpus" / "cgroup.threads") == "501\n502\n503"
    h.set_cpu_limit(0.5, child="vcpus")
    assert read(sb / "vcpus" / "cpu.max") == "50000 100000"
    h.set_cpu_limit(None)
    assert read(sb / "cpu.max") == "max 100000"
    h.set_memory_limit(1 << 30)
    assert read(sb / "memory.max") == "1073741824"
    result = h.set_blkio(
        [
            ResolvedBlkioItem(
                "/dev/vda",
                Device(254, 0),
                (BlkioLimit("throttle_read_bps", 400), BlkioLimit("throttle_write_iops", 699)),
            ),
            ResolvedBlkioItem(None, None, (BlkioLimit("blkio_weight", 78),)),
        ],
        sys_root=str(tmp_path / "nosys"),
    )
    assert read(sb / "io.max") == "254:0 rbps=400 wiops=699"
    assert read(sb / "io.weight") == "default 15"
    assert result.unapplied == [] and result.warnings == []
    (sb / "cpu.stat").write_text("usage_usec 2500\nuser_usec 1\n")
    (sb / "memory.current").write_text("8192\n")
    (sb / "pids.current").write_text("4\n")
    stats = h.stats()
    assert (stats.cpu_usage_ns, stats.memory_bytes, stats.pids) == (2_500_000, 8192, 4)
    with pytest.raises(HostError) as info:
        h.remove(timeout=0.05)
    assert str(info.value) == (
        f"cannot remove cgroup directories: {sb}/vcpus still holds threads 501, 502, 503 "
        "(kill them first)"
    )
    (sb / "vcpus" / "cgroup.threads").write_text("")
    with pytest.raises(HostError, match=f"{sb} still holds processes 500"):
        h.remove(timeout=0.05)
    assert h.created == [f"{tmp_path}/carapace", str(sb)]  # vcpus went
    (sb / "cgroup.procs").write_text("")
    record = json.loads(json.dumps(h.to_record()))
    CgroupHandle.from_record(record, fs).remove(timeout=0.05)
    assert not (tmp_path / "carapace").exists()


def test_v2_without_controllers(tmp_path: Path) -> None:
    fs = v2_tree(tmp_path, controllers="")
    h = CgroupV2(str(tmp_path), fs).create("carapace-x/sb", [])
    assert h.controllers == []
    assert h.leaves() == [f"{tmp_path}/carapace-x/sb"]
    h.add_threads([11])
    assert read(tmp_path / "carapace-x" / "sb" / "vcpus" / "cgroup.threads") == "11"
    stats = h.stats()
    assert (stats.cpu_usage_ns, stats.memory_bytes, stats.pids) == (0, None, None)
    with pytest.raises(HostError, match="not created with the cpu controller"):
        h.set_cpu_limit(1, child="vcpus")
    (tmp_path / "carapace-x" / "sb" / "vcpus" / "cgroup.threads").write_text("")
    h.remove()
    assert not (tmp_path / "carapace-x").exists()


def test_preexec_fn_writes_zero_to_every_procs_file(tmp_path: Path) -> None:
    fs = v1_tree(tmp_path)
    h = CgroupV1(str(tmp_path), fs).create("sb", ["cpu", "memory"])
    h.preexec_fn()()  # on cgroupfs, '0' means the writing process itself
    assert [read(Path(f)) for f in h.procs_files()] == ["0", "0"]


def test_parse_proc_cgroup() -> None:
    text = "9:name=systemd:/\n8:pids:/a\n2:cpu,cpuacct:/k/p\n0::/unified/x\n"
    assert parse_proc_cgroup(text) == {
        "name=systemd": "/",
        "pids": "/a",
        "cpu": "/k/p",
        "cpuacct": "/k/p",
        "": "/unified/x",
    }


def test_member_dirs_name_where_a_process_is_in_each_hierarchy(tmp_path: Path) -> None:
    """What the shim daemon records before it joins the sandbox cgroup, to go back."""
    fs = v1_tree(tmp_path)
    drv = CgroupV1(str(tmp_path), fs)
    where = {"cpu": "/default", "cpuacct": "/default", "memory": "/", "pids": "/x"}
    t = str(tmp_path)
    assert drv.member_dirs(where, ["cpu", "cpuacct", "memory", "pids", "blkio"]) == [
        f"{t}/cpu,cpuacct/default",  # cpu and cpuacct are one co-mount here
        f"{t}/memory",
        f"{t}/pids/x",
    ]
    assert CgroupV2(str(tmp_path), fs).member_dirs({"": "/a/b"}, ["cpu"]) == [f"{t}/a/b"]


# ------------------------------------------------------------------ concurrent owners
# Sandboxes without a cgroupsPath share carapace's own parent (``carapace/``): the last
# one out removes it while others are creating below it. On a real cgroup v2 kernel
# (tests/integration/test_cgroup_v2_guest.py, three processes creating and removing in
# a loop) a fifth of the rounds failed: the parent vanished while controllers were
# being enabled in it (ENOENT, or ENODEV from a cgroup being removed), mkdir found it
# existing and then not ("a non-directory is in the way"), or two owners' rmdirs of it
# crossed (ENOENT).


class RemovedByAnotherOwnerFs(KernelLikeFs):
    """Another owner removes ``victim`` (and what is in it) just before this process
    touches ``trigger`` (a read, write or rmdir of that path), ``times`` times."""

    def __init__(self, root: Path, trigger: str, times: int = 1, errno_: int = errno.ENOENT):
        super().__init__(root, "v2", {})
        self.trigger, self.times, self.errno_ = trigger, times, errno_

    def _race(self, path: str) -> None:
        if path == self.trigger and self.times > 0:
            self.times -= 1
            shutil.rmtree(Path(self.trigger).parent if Path(path).is_file() else path)
            if self.errno_ == errno.ENODEV:  # the kernel's answer mid-removal
                raise CgroupGone(f"cannot read {path}: {os.strerror(errno.ENODEV)}")

    def read(self, path: str) -> str:
        self._race(path)
        return super().read(path)

    def write(self, path: str, value: str) -> None:
        self._race(path)
        super().write(path, value)

    def rmdir(self, path: str) -> None:
        if path == self.trigger and self.times > 0:
            self.times -= 1
            shutil.rmtree(path)
        super().rmdir(path)


def shared_parent_tree(
    tmp_path: Path, trigger: str, times: int = 1, errno_: int = errno.ENOENT
) -> RemovedByAnotherOwnerFs:
    """carapace/ made by another sandbox, which is on its way out."""
    v2_tree(tmp_path)
    fs = RemovedByAnotherOwnerFs(tmp_path, str(tmp_path / trigger), 0, errno_)
    CgroupV2(str(tmp_path), fs).create("carapace/other", ["cpu", "pids"], own_parents=1)
    shutil.rmtree(tmp_path / "carapace" / "other")
    fs.times = times
    return fs


@pytest.mark.parametrize("errno_", [errno.ENOENT, errno.ENODEV])
@pytest.mark.parametrize(
    "trigger", ["carapace/cgroup.controllers", "carapace/cgroup.subtree_control"]
)
def test_v2_create_retries_when_the_shared_parent_is_removed_under_it(
    tmp_path: Path, trigger: str, errno_: int
) -> None:
    fs = shared_parent_tree(tmp_path, trigger, times=2, errno_=errno_)
    h = CgroupV2(str(tmp_path), fs).create("carapace/sb", ["cpu", "pids"], own_parents=1)
    assert fs.times == 0  # removed under it twice
    assert h.created == [f"{tmp_path}/carapace", f"{tmp_path}/carapace/sb"]  # once each
    assert read(tmp_path / "carapace" / "cgroup.subtree_control") == "cpu pids"
    assert (tmp_path / "carapace" / "sb" / "cpu.max").exists()
    h.remove()
    assert not (tmp_path / "carapace").exists()


def test_create_gives_up_when_the_parent_keeps_vanishing(tmp_path: Path) -> None:
    fs = shared_parent_tree(tmp_path, "carapace/cgroup.controllers", times=100)
    with pytest.raises(
        HostError,
        match=r"cannot create cgroup .*/carapace/sb: a parent was removed under us 10 times "
        r"\(by another owner, concurrently\); last: cannot read .*: No such file",
    ):
        CgroupV2(str(tmp_path), fs).create("carapace/sb", ["cpu"], own_parents=1)


def test_remove_of_a_shared_parent_its_other_owner_removed_first(tmp_path: Path) -> None:
    """Two sandboxes end at once: both remove carapace/, one finds it gone (ENOENT)."""
    fs = shared_parent_tree(tmp_path, "carapace", times=0)
    h = CgroupV2(str(tmp_path), fs).create("carapace/sb", ["cpu"], own_parents=1)
    fs.times = 1
    h.remove()
    assert h.created == []
    assert not (tmp_path / "carapace").exists()


def test_mkdir_of_a_directory_removed_after_it_was_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkdir says EEXIST, then the directory is gone (its owner removed it): it is
    made, not reported as "a non-directory in the way"."""
    real_mkdir = os.mkdir
    calls: list[str] = []

    def mkdir(path: str, mode: int = 0o777) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", mkdir)
    target = tmp_path / "carapace"
    assert CgroupFs().mkdir(str(target)) is True
    assert target.is_dir() and len(calls) == 2
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(HostError, match="a non-directory is in the way"):
        CgroupFs().mkdir(str(tmp_path / "file"))


@pytest.mark.parametrize("errno_", [errno.ENOENT, errno.ENODEV])
def test_cgroupfs_reports_a_vanished_cgroup_as_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    """ENOENT, and ENODEV (a file or a mkdir in a cgroup the kernel is removing), are
    CgroupGone: the creator retries. Anything else stays a plain HostError."""

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno_, os.strerror(errno_))

    fs = CgroupFs()
    f = tmp_path / "cgroup.controllers"
    f.write_text("cpu\n")
    for call in (
        lambda: fs.read(str(f)),
        lambda: fs.write(str(f), "+cpu"),
        lambda: fs.mkdir(str(tmp_path / "x")),
    ):
        with monkeypatch.context() as m:
            m.setattr("builtins.open", fail)
            m.setattr(os, "open", fail)
            m.setattr(os, "mkdir", fail)
            with pytest.raises(CgroupGone, match=os.strerror(errno_)):
                call()
    with monkeypatch.context() as m:
        m.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "no")))
        with pytest.raises(HostError) as info:
            fs.write(str(f), "+cpu")
        assert not isinstance(info.value, CgroupGone)


# ------------------------------------------------------------------ the sandbox's placement


class GoneThreadFs(KernelLikeFs):
    """cgroup.threads refuses thread ``gone`` (it exited: ESRCH), and ``on_mkdir`` sees
    every directory just before it is made."""

    def __init__(self, root: Path, gone: int, on_mkdir: Callable[[str], None]):
        super().__init__(root, "v2", {})
        self.gone, self.on_mkdir = gone, on_mkdir

    def mkdir(self, path: str) -> bool:
        self.on_mkdir(path)
        return super().mkdir(path)

    def write(self, path: str, value: str) -> None:
        if path.endswith("/cgroup.threads") and value == str(self.gone):
            raise HostError(f"cannot write {value!r} to {path}: No such process")
        super().write(path, value)


def test_the_vcpus_child_is_recorded_before_it_is_made_and_released_after_a_failure(
    tmp_path: Path,
) -> None:
    """On the guest's cgroup v2 kernel, placing a vCPU thread that had exited failed
    half-way (ESRCH) after the vcpus child was made; the record did not list it, so
    release could not remove the sandbox cgroup ("holds cgroups it did not create:
    vcpus") and left it, its parents and the run dir behind."""
    root = tmp_path / "cgroup"
    root.mkdir()
    v2_tree(root)
    run_dir = tmp_path / "run" / "sb1"
    run_dir.mkdir(parents=True)
    child = f"{root}/carapace/sb1/vcpus"
    listed_at_mkdir: list[bool] = []

    def on_mkdir(path: str) -> None:
        if path == child:  # what a crash right now would leave on disk for release
            saved = SandboxRecord.load(run_dir).cgroup
            listed_at_mkdir.append(child in saved["created"])

    fs = GoneThreadFs(root, gone=666, on_mkdir=on_mkdir)
    plan = plan_sandbox(
        Config(),
        SandboxOptions(cpus=0.5, sandbox_id="sb1"),
        HostFacts(usable_cpus=4, memory_total=8 << 30, file_max=1 << 20, nofile_cap=1 << 20),
    )
    record = SandboxRecord(id="sb1", run_dir=str(run_dir))
    placement = SandboxCgroupPlacement(plan, record, "carapace_", lambda: CgroupV2(str(root), fs))
    placement.make()
    with pytest.raises(HostError, match="No such process"):
        placement.place_vcpus({0: 10, 1: 666}, 0.5)
    assert listed_at_mkdir == [True]
    assert child in SandboxRecord.load(run_dir).cgroup["created"]
    # the VM is gone: release's view of the record removes everything
    (root / "carapace" / "sb1" / "vcpus" / "cgroup.threads").write_text("")
    CgroupHandle.from_record(SandboxRecord.load(run_dir).cgroup, fs).remove(timeout=0.05)
    assert not (root / "carapace").exists()


def test_thread_child_dirs_name_what_add_threads_makes(tmp_path: Path) -> None:
    v2 = CgroupV2(str(tmp_path / "v2"), v2_tree(_mkdir(tmp_path / "v2"))).create("a/sb", ["cpu"])
    assert v2.thread_child_dirs() == [f"{tmp_path}/v2/a/sb/vcpus"]
    assert v2.thread_child_dirs("x/y") == [f"{tmp_path}/v2/a/sb/x", f"{tmp_path}/v2/a/sb/x/y"]
    v2.add_threads([1], child="x/y")
    assert [d for d in v2.created if "/x" in d] == v2.thread_child_dirs("x/y")
    v1 = CgroupV1(str(tmp_path / "v1"), v1_tree(_mkdir(tmp_path / "v1")))
    h = v1.create("sb", ["cpu", "cpuacct", "memory", "cpuset"])
    assert h.thread_child_dirs() == [
        f"{tmp_path}/v1/cpu/sb/vcpus",
        f"{tmp_path}/v1/cpuset/sb/vcpus",
    ]
    h.add_threads([1])
    assert sorted(d for d in h.created if d.endswith("/vcpus")) == h.thread_child_dirs()
    with pytest.raises(InvalidArgument, match="child name"):
        h.thread_child_dirs("../x")


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
