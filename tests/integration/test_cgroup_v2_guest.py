"""The host cgroup code on a real cgroup v2 kernel: the guest's (issue 14, item 12).

This machine's host is cgroup v1, most hosts people run are v2. A carapace guest mounts
cgroup2 with every controller, so one pod VM serves as a v2 "host": a container in the
guest's root cgroup namespace, with cgroup2 mounted read-write, runs
``cgroup_v2_probe.py`` with the repository's ``src/`` as a read-only volume. The probe
drives the real v2 driver, ``SandboxCgroupPlacement`` and ``state.release`` through a
sandbox's life with a multi-threaded stand-in for QEMU and prints what the kernel
showed; the tests below assert on that report.

The container's rootfs is a bare Python copied from the one running the tests (the
interpreter, its standard library, the shared libraries ``ldd`` names, protobuf), made
once per session. One sandbox and one probe run serve the whole module (~35 s under
TCG, boot included).

What the first v2 run found (both fixed, with unit tests in test_hostcgroup_driver.py):
concurrent sandboxes sharing the runtime's own parent cgroup failed a fifth of their
creates (the parent removed by the last one out while another enabled controllers in
it: ENOENT/ENODEV, or "a non-directory is in the way"); and a vCPU placement failing
half-way (a thread gone: ESRCH) left the unrecorded ``vcpus`` child, so release could
not remove the sandbox cgroup, its parents or the run dir.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import carapace
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.protocols.contract import VCPU_CGROUP
from carapace.sandbox import ProcessIO

from .conftest import REPO

PROBE = Path(__file__).with_name("cgroup_v2_probe.py")
#: Where the container sees the repository's src/ and the copied protobuf.
SRC_IN_GUEST = "/opt/carapace/src"
PYLIB_IN_GUEST = "/opt/pylib"
PROBE_IN_GUEST = "/opt/probe/cgroup_v2_probe.py"
#: Parts of the standard library the probe never imports (the rootfs stays small).
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data"}
PROBE_TIMEOUT_S = 300


# -- the container's rootfs: a bare Python ------------------------------------------------


def _copy_file(src: str, rootfs: Path) -> None:
    """``src`` (symlinks followed) at the same absolute path inside ``rootfs``."""
    dest = rootfs / src.lstrip("/")
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), dest)


def _libraries(binaries: list[str]) -> set[str]:
    """The shared libraries (and the dynamic loader) ``binaries`` need, per ldd."""
    out = subprocess.run(["ldd", *binaries], capture_output=True, text=True).stdout
    return set(re.findall(r"(?:=>\s*)?(/\S+\.so[.\d]*)\s+\(0x", out))


def build_python_rootfs(rootfs: Path) -> dict[str, str]:
    """A rootfs holding this interpreter, its stdlib, protobuf and the probe; returns
    the environment it runs with."""
    exe = os.path.realpath(sys.executable)
    stdlib = sysconfig.get_path("stdlib")
    ignore = shutil.ignore_patterns(*STDLIB_SKIP, "config-*", "site-packages", "dist-packages")
    shutil.copytree(stdlib, rootfs / stdlib.lstrip("/"), symlinks=True, ignore=ignore)
    json_spec = importlib.util.find_spec("_json")
    assert json_spec is not None and json_spec.origin is not None
    dynload = os.path.dirname(json_spec.origin)
    if not (rootfs / dynload.lstrip("/")).is_dir():
        shutil.copytree(dynload, rootfs / dynload.lstrip("/"))
    protobuf = importlib.util.find_spec("google.protobuf")
    assert protobuf is not None and protobuf.origin is not None
    google = Path(protobuf.origin).parents[1]
    shutil.copytree(google, rootfs / PYLIB_IN_GUEST.lstrip("/") / "google")
    _copy_file(exe, rootfs)
    shared = [exe, *map(str, Path(dynload).glob("*.so")), *map(str, google.rglob("*.so"))]
    libs = _libraries(shared)
    for lib in libs:
        _copy_file(lib, rootfs)
    probe = rootfs / PROBE_IN_GUEST.lstrip("/")
    probe.parent.mkdir(parents=True)
    shutil.copy2(PROBE, probe)
    for d in ("proc", "sys", "dev", "tmp", SRC_IN_GUEST.lstrip("/")):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    return {
        "exe": exe,
        "PYTHONPATH": f"{SRC_IN_GUEST}:{PYLIB_IN_GUEST}",
        "LD_LIBRARY_PATH": ":".join(sorted({os.path.dirname(lib) for lib in libs})),
    }


# -- one probe run in one sandbox ---------------------------------------------------------


def probe_spec(env: dict[str, str]) -> dict[str, Any]:
    """The probe's container: the guest's root cgroup namespace (PID 1's), cgroup2
    mounted read-write, src/ read-only."""
    spec = default_spec(
        [env["exe"], "-S", "-B", PROBE_IN_GUEST],
        env=[f"PYTHONPATH={env['PYTHONPATH']}", f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}"],
    )
    for m in spec["mounts"]:
        if m["destination"] == "/sys/fs/cgroup":
            m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]
    spec["mounts"].append(
        {
            "destination": SRC_IN_GUEST,
            "type": "bind",
            "source": str(REPO / "src"),
            "options": ["rbind", "ro"],
        }
    )
    spec["linux"]["namespaces"] = [
        {"type": "cgroup", "path": "guest:/proc/1/ns/cgroup"} if ns["type"] == "cgroup" else ns
        for ns in spec["linux"]["namespaces"]
    ]
    return spec


@pytest.fixture(scope="session")
def python_rootfs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    rootfs = tmp_path_factory.mktemp("python-rootfs")
    return rootfs, build_python_rootfs(rootfs)


@pytest.fixture(scope="module")
def report(python_rootfs: tuple[Path, dict[str, str]]) -> Iterator[dict[str, Any]]:
    rootfs, env = python_rootfs
    out: list[bytes] = []
    err: list[bytes] = []
    spec = Spec.from_dict(probe_spec(env))
    with carapace.Sandbox(cpus=1, memory="1G") as sb:
        code = sb.call_async(
            lambda s: asyncio.wait_for(
                s.run(
                    spec=spec,
                    rootfs=rootfs,
                    io=ProcessIO(stdout=out.append, stderr=err.append),
                ),
                PROBE_TIMEOUT_S,
            )
        )
    stdout, stderr = b"".join(out).decode(), b"".join(err).decode()
    assert code == 0 and stdout.strip(), f"probe exited {code}\n{stdout}\n{stderr}"
    data: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    assert "error" not in data, f"the probe failed:\n{data['error']}\nreport: {data}\n{stderr}"
    yield data


# -- what the kernel showed ---------------------------------------------------------------


def test_the_guest_is_a_cgroup_v2_host(report: dict[str, Any]) -> None:
    assert (report["version"], report["driver"]) == ("v2", "CgroupV2")


def test_legacy_mode_is_refused_on_v2_before_anything_is_made(report: dict[str, Any]) -> None:
    assert "needs cgroup v1; this host has cgroup v2" in report["legacy_error"]
    assert report["legacy_made"] == []


def test_the_sandbox_cgroup_is_made_below_the_pod_cgroup_and_the_owner_joins(
    report: dict[str, Any],
) -> None:
    made, path = report["made"], report["plan"]["cgroup_path"]
    assert path.startswith("kubepods/burstable/pod") and "/carapace-sandbox-probe-" in path
    assert made["leaves"] == [f"/sys/fs/cgroup/{path}"]
    assert made["type"] == "domain"
    assert {"cpu", "io", "memory", "pids"} <= set(made["controllers"])
    # each cgroup on the way down hands the controllers on to its children
    for parent, enabled in made["parents_subtree_control"].items():
        assert {"cpu", "io", "memory", "pids"} <= set(enabled), parent
    # recorded: kubepods/, burstable/, the pod cgroup and the sandbox cgroup
    assert made["record"]["created"] == made["created"]
    assert len(made["created"]) == 4
    assert made["owner_cgroup"] == f"/{path}"
    assert report["owner_origin"].startswith("/carapace/")  # the probe's container


def test_the_vm_joins_the_sandbox_cgroup_before_exec(report: dict[str, Any]) -> None:
    assert report["standin"]["cgroup"] == "/" + report["plan"]["cgroup_path"]


def test_vcpu_threads_go_to_a_threaded_child_capped_by_cpu_max(report: dict[str, Any]) -> None:
    placed, standin = report["placed"], report["standin"]
    path = "/" + report["plan"]["cgroup_path"]
    vcpus, io = standin["vcpus"], standin["io"]
    assert (placed["leaf_type"], placed["child_type"]) == ("domain threaded", "threaded")
    # only threaded controllers below a threaded root: cpu (cpu.max) and pids
    assert placed["leaf_subtree_control"] == ["cpu", "pids"]
    assert placed["child_controllers"] == ["cpu", "pids"]
    assert placed["child_threads"] == sorted(vcpus[:2])
    assert not set(vcpus[:2]) & set(placed["leaf_threads"])
    assert {vcpus[2], io} <= set(placed["leaf_threads"])  # the rest of the VM stays
    assert standin["pid"] in placed["leaf_procs"]
    assert placed["thread_cgroups"] == {
        str(vcpus[0]): f"{path}/{VCPU_CGROUP}",
        str(vcpus[1]): f"{path}/{VCPU_CGROUP}",
        str(vcpus[2]): path,
        str(io): path,
    }
    assert placed["cpu_max"] == "50000 100000"  # 0.5 CPUs per the contract's period
    assert set(placed["record_children"][VCPU_CGROUP]) == {"cpu", "pids"}
    # the handle's process list skips the threaded child's cgroup.procs (EOPNOTSUPP)
    assert standin["pid"] in placed["handle_pids"]


def test_the_cap_throttles_the_spinning_vcpus(report: dict[str, Any]) -> None:
    t = report["throttle"]
    window_us = t["elapsed_s"] * 1e6
    assert t["nr_throttled"] > 0 and t["nr_periods"] > 0, t
    # two spinning threads, at most half a CPU between them (plus at most one period's
    # quota of slack); that they ran at all is the lower bound
    assert 0.1 * window_us < t["usage_usec"] < 0.65 * window_us, t


def test_stats_are_the_kernels_counters(report: dict[str, Any]) -> None:
    st = report["stats"]
    # stats() read first, the files right after: the counters only grow meanwhile
    assert 0 < st["cpu_usage_ns"] <= st["file_usage_usec"] * 1000
    assert st["file_usage_usec"] * 1000 - st["cpu_usage_ns"] < 1e9
    assert abs(st["memory_bytes"] - st["file_memory_current"]) < 4 << 20
    assert st["memory_bytes"] > 1 << 20
    # tasks, threads included: the owner (2 threads) and the VM (main, 3 vCPUs, I/O)
    assert st["pids"] == st["file_pids_current"] >= 7


def test_hotplug_places_the_new_thread_and_moves_the_cap(report: dict[str, Any]) -> None:
    hp, vcpus = report["hotplugged"], report["standin"]["vcpus"]
    assert hp["child_threads"] == sorted(vcpus)
    assert hp["cpu_max"] == "max 100000"  # 3 CPUs for 3 vCPUs: no cap
    assert hp["cpu_max_again"] == "50000 100000"


def test_removing_a_sandbox_cgroup_in_use_names_the_threads_and_keeps_it(
    report: dict[str, Any],
) -> None:
    vcpus = report["standin"]["vcpus"]
    assert report["busy_remove"].endswith(
        f"/{VCPU_CGROUP} still holds threads {', '.join(map(str, sorted(vcpus)))} (kill them first)"
    )
    assert report["busy_left"]["child"] and report["busy_left"]["leaf"]
    assert len(report["busy_left"]["created"]) == 5  # all of it, for the next try


def test_release_kills_the_vm_and_removes_every_cgroup(report: dict[str, Any]) -> None:
    end = report["end"]
    assert end["release_problems"] == []
    assert end["vm_exit"] == -9  # killed by release: its -name is the sandbox's
    assert end["owner_after_leave"] == report["owner_origin"]
    assert end["record_after"] == {"cgroup": {}, "more": []}
    assert not end["run_dir_left"]
    assert end["left"] == []


def test_a_vcpu_placement_that_fails_half_way_is_still_released(report: dict[str, Any]) -> None:
    """A vCPU thread gone before it is moved (ESRCH) fails the placement after the vcpus
    child was made; it was recorded first, so release removes it with the rest (before
    the fix: "holds cgroups it did not create: vcpus", five cgroups and the run dir left)."""
    fp = report["failed_place"]
    assert "No such process" in fp["error"]
    assert any(d.endswith(f"/{VCPU_CGROUP}") for d in fp["record_created"])
    assert fp["end"]["release_problems"] == []
    assert fp["end"]["left"] == [] and not fp["end"]["run_dir_left"]


def test_concurrent_sandboxes_sharing_the_runtimes_parent_never_fail(
    report: dict[str, Any],
) -> None:
    """Three processes create and remove carapace-race/<own> in a loop; the last one
    out removes carapace-race/ while the others come down through it. Before the fix a
    fifth of the rounds failed (ENOENT/ENODEV enabling controllers in the vanishing
    parent, "a non-directory is in the way")."""
    race = report["race"]
    assert all(r["rounds"] >= 10 for r in race), race
    assert [r["failed"] for r in race] == [0] * len(race), race


def test_nothing_is_left_in_the_guest_hierarchy(report: dict[str, Any]) -> None:
    assert report["after"] == report["before"]
