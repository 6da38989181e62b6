"""Where the host processes of a pod live (seed 001, SandboxCgroupOnly): the shim
daemon, QEMU and every one of its threads in <pod cgroup>/carapace-sandbox-<id>, the
pod cgroup being the parent of the sandbox container's cgroupsPath; nothing left after
the pod is deleted."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from carapace.storage.virtiofsd import daemons_of

from ..conftest import host_cgroups, processes
from .conftest import CtrFn
from .rig import BUSYBOX_IMAGE, CARAPACE

CGROUP = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")


def cgroups_of(pid: int, tid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            out[name] = path
    return out


def qemu_of(sandbox: str) -> int:
    found = [
        pid
        for pid, argv in processes()
        if b"qemu-system" in argv[0]
        and any(a.startswith(f"carapace-{sandbox},".encode()) for a in argv)
    ]
    assert len(found) == 1, found
    return found[0]


def shim_of(sandbox: str) -> int:
    found = [
        pid
        for pid, argv in processes()
        if b"containerd-shim-carapace-v2" in b" ".join(argv)
        and sandbox.encode() in argv
        and b"start" not in argv
        and b"delete" not in argv
    ]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def pod_cgroup() -> Iterator[str]:
    """A pod cgroup made the way kubelet makes one (in every hierarchy we use)."""
    name = f"carapace-test-pod-{uuid.uuid4().hex[:8]}"
    for c in CONTROLLERS:
        (CGROUP / c / name).mkdir()
    yield name
    for c in CONTROLLERS:
        (CGROUP / c / name).rmdir()  # fails if the runtime left anything inside


def test_sandbox_cgroup_only_places_shim_qemu_and_every_thread(ctr: CtrFn, pod_cgroup: str) -> None:
    cid = f"cg-{uuid.uuid4().hex[:8]}"
    cgroups_path = f"/{pod_cgroup}/{cid}"
    sandbox_cg = f"/{pod_cgroup}/carapace-sandbox-{cid}"
    ctr(
        "run", "-d", "--runtime", CARAPACE, "--cgroup", cgroups_path,
        BUSYBOX_IMAGE, cid, "sleep", "3600",
    )  # fmt: skip
    try:
        qemu = qemu_of(cid)
        threads = [int(t.name) for t in Path(f"/proc/{qemu}/task").iterdir()]
        assert len(threads) > 3  # main loop, vCPU, RCU, workers...
        for tid in threads:
            where = cgroups_of(qemu, tid)
            for c in CONTROLLERS:
                assert where[c] == sandbox_cg, (tid, c, where[c])
        shim = shim_of(cid)
        for c in CONTROLLERS:
            assert cgroups_of(shim, shim)[c] == sandbox_cg
        procs = (CGROUP / "memory" / sandbox_cg.lstrip("/") / "cgroup.procs").read_text().split()
        # and the pod's virtio-fs daemon (its namespaced child too)
        fsd = daemons_of(Path(f"/run/carapace/{cid}/shared"))
        assert len(fsd) == 2, fsd
        assert sorted(map(int, procs)) == sorted([qemu, shim, *fsd])
        # the pod cgroup sees the sandbox's usage (it is the parent)
        usage = int((CGROUP / "memory" / pod_cgroup / "memory.usage_in_bytes").read_text())
        assert usage > 100 << 20  # QEMU's guest memory and the shim
    finally:
        ctr("task", "delete", "--force", cid, check=False)
        ctr("containers", "rm", cid, check=False)
    for c in CONTROLLERS:
        assert not (CGROUP / c / sandbox_cg.lstrip("/")).exists()
    assert not any(cid in g for g in host_cgroups())


def test_ctr_default_cgroups_path_gives_a_namespace_pod_cgroup(ctr: CtrFn) -> None:
    """ctr's cgroupsPath is /<namespace>/<id>: the sandbox goes to
    /default/carapace-sandbox-<id>, and what carapace created goes with it."""
    cid = f"cg-{uuid.uuid4().hex[:8]}"
    ctr("run", "-d", "--runtime", CARAPACE, BUSYBOX_IMAGE, cid, "sleep", "3600")
    try:
        qemu = qemu_of(cid)
        assert cgroups_of(qemu, qemu)["memory"] == f"/default/carapace-sandbox-{cid}"
    finally:
        ctr("task", "delete", "--force", cid, check=False)
        ctr("containers", "rm", cid, check=False)
    assert not any(cid in g for g in host_cgroups())


def test_pod_stats_are_the_sandboxs_host_cost(ctr: CtrFn) -> None:
    """A pause container's Stats (ctr task metrics) and `carapace stats` read the
    sandbox's host cgroup: QEMU's memory (hundreds of MiB), its threads, CPU time."""
    import json
    import subprocess

    from ..conftest import CARAPACE as CLI

    cid = f"cg-{uuid.uuid4().hex[:8]}"
    ctr(
        "run", "-d", "--runtime", CARAPACE,
        "--annotation", "io.kubernetes.docker.type=podsandbox",
        BUSYBOX_IMAGE, cid, "sleep", "3600",
    )  # fmt: skip
    try:
        out = ctr("task", "metrics", cid).stdout
        table = dict(
            line.split()
            for line in out.splitlines()
            if len(line.split()) == 2 and not line.split()[0].isupper()
        )
        assert int(table["memory.usage_in_bytes"]) > 100 << 20, out
        assert int(table["cpuacct.usage"]) > 0, out
        assert int(table["pids.current"]) > 3, out  # QEMU's threads and the shim's
        r = subprocess.run([CLI, "stats", cid, "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout)
        assert stats["memory_bytes"] > 100 << 20
        assert stats["cpu_usage_ns"] > 0 and stats["pids"] > 3
        assert stats["cgroup"] == f"default/carapace-sandbox-{cid}"
    finally:
        ctr("task", "delete", "--force", cid, check=False)
        ctr("containers", "rm", cid, check=False)


def test_a_memory_limit_on_the_pod_cgroup_bounds_the_whole_sandbox(
    ctr: CtrFn, pod_cgroup: str
) -> None:
    """Kubelet limits the pod cgroup (its containers + the RuntimeClass overhead); with
    everything of the sandbox inside, a guest that fills its 1G cannot take more from
    the host: the kernel enforces the pod's limit on QEMU (the OOM killer ends the VM)."""
    limit = 640 << 20
    memcg = CGROUP / "memory" / pod_cgroup
    (memcg / "memory.limit_in_bytes").write_text(str(limit))
    cid = f"cg-{uuid.uuid4().hex[:8]}"
    ctr(
        "run", "-d", "--runtime", CARAPACE, "--cgroup", f"/{pod_cgroup}/{cid}",
        BUSYBOX_IMAGE, cid, "sleep", "3600",
    )  # fmt: skip
    try:
        # 900 MiB into the guest's memory (the rootfs overlay lives in it): more than
        # the pod may use on the host
        ctr(
            "task", "exec", "--exec-id", "fill", cid,
            "dd", "if=/dev/zero", "of=/tmp/fill", "bs=1M", "count=900",
            check=False, timeout=300,
        )  # fmt: skip
        peak = int((memcg / "memory.max_usage_in_bytes").read_text())
        print(f"pod cgroup peak {peak >> 20} MiB of {limit >> 20} MiB")
        assert peak <= limit
        assert int((memcg / "memory.failcnt").read_text()) > 0  # the limit was hit
    finally:
        ctr("task", "delete", "--force", cid, check=False)
        ctr("containers", "rm", cid, check=False)
    assert not any(cid in g for g in host_cgroups())


def test_legacy_mode_places_only_the_vcpu_threads_in_the_pod_cgroup(
    ctr: CtrFn, pod_cgroup: str, tmp_path: Path
) -> None:
    """sandbox_cgroup_only = false: exactly the vCPU threads in the pod cgroup, limited
    by the sum of the containers' limits; QEMU and its other threads in
    carapace/<id> (memory and the rest); the shim in <pod>/carapace_<id>."""
    config = tmp_path / "configuration.toml"
    config.write_text("[runtime]\nsandbox_cgroup_only = false\n")
    cid = f"cg-{uuid.uuid4().hex[:8]}"
    ctr(
        "run", "-d", "--runtime", CARAPACE, "--runtime-config-path", str(config),
        "--cgroup", f"/{pod_cgroup}/{cid}", "--cpus", "1", "--memory-limit", str(512 << 20),
        BUSYBOX_IMAGE, cid, "sleep", "3600",
    )  # fmt: skip
    try:
        qemu = qemu_of(cid)
        tids = [int(t.name) for t in Path(f"/proc/{qemu}/task").iterdir()]
        vcpus = {
            t for t in tids if Path(f"/proc/{qemu}/task/{t}/comm").read_text().startswith("CPU ")
        }
        assert len(vcpus) == 1 and len(tids) > 2
        pod_tasks = {int(x) for x in (CGROUP / "cpu" / pod_cgroup / "tasks").read_text().split()}
        assert pod_tasks == vcpus
        for t in tids:
            where = cgroups_of(qemu, t)
            assert where["memory"] == f"/carapace/{cid}", (t, where)
            if t not in vcpus:
                assert where["cpu"] == f"/carapace/{cid}", (t, where)
        shim = shim_of(cid)
        assert cgroups_of(shim, shim)["cpu"] == f"/{pod_cgroup}/carapace_{cid}"
        cpu = CGROUP / "cpu" / pod_cgroup
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "100000"  # --cpus 1
        memory = (CGROUP / "memory" / pod_cgroup / "memory.limit_in_bytes").read_text()
        assert int(memory) == 512 << 20
    finally:
        ctr("task", "delete", "--force", cid, check=False)
        ctr("containers", "rm", cid, check=False)
    assert not any(cid in g for g in host_cgroups())
