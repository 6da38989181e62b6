"""carapace pods through containerd's CRI (what the kubelet does), a runc pod beside
them on the same containerd, and the shim's fault paths (shim or QEMU killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cri_api as api
import pytest

from carapace.shim.command import socket_path

from ..conftest import RUN_ROOT, host_kernel
from ..procs import processes, qemu_of
from .conftest import CtrFn
from .rig import BUSYBOX_IMAGE, CARAPACE, ContainerdRig, CriClient
from .test_cri_network import Pod, wait_for

BOOT_ID = ["cat", "/proc/sys/kernel/random/boot_id"]
#: A container's own pid namespace: what the kubelet asks by default.
OWN_PID = api.NamespaceMode.CONTAINER


def shim_socket(containerd: ContainerdRig, namespace: str, pod: str) -> Path:
    return Path(socket_path(str(containerd.socket), namespace, pod))


def exec_sync(cri: CriClient, cid: str, cmd: list[str]) -> tuple[int, str, str]:
    r = cri.runtime.ExecSync(api.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=60))
    return r.exit_code, r.stdout.decode(), r.stderr.decode()


@pytest.fixture
def pods(cri: CriClient, tmp_path: Path) -> Iterator[list[Pod]]:
    made: list[Pod] = []
    yield made
    for pod in made:
        pod.remove()


def test_cri_pod_is_one_vm_and_a_second_pod_gets_its_own(
    containerd: ContainerdRig, cri: CriClient, pods: list[Pod], tmp_path: Path
) -> None:
    pod = Pod(cri, "carapace-pod", "carapace", tmp_path)
    pods.append(pod)
    assert shim_socket(containerd, "k8s.io", pod.id).exists()
    status = cri.runtime.PodSandboxStatus(
        api.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=30
    ).status
    assert status.state == api.PodSandboxState.SANDBOX_READY
    assert status.runtime_handler == "carapace"
    # the pause container booted the pod's VM
    assert len(qemu_of(pod.id)) == 1

    a = pod.container("a", ["sh", "-c", "echo from-a > /tmp/mark; sleep 3600"], pid=OWN_PID)
    b = pod.container("b", ["sleep", "3600"], pid=OWN_PID)
    # both run in the one VM of the pod: one QEMU, the same guest boot id and kernel
    assert len(qemu_of(pod.id)) == 1
    code_a, boot_a, _ = exec_sync(cri, a, BOOT_ID)
    code_b, boot_b, _ = exec_sync(cri, b, BOOT_ID)
    assert code_a == code_b == 0
    assert boot_a == boot_b and boot_a.strip()
    code, kernel, _ = exec_sync(cri, a, ["uname", "-r"])
    assert code == 0 and kernel.strip() != host_kernel()
    # separate root filesystems
    assert exec_sync(cri, a, ["cat", "/tmp/mark"])[:2] == (0, "from-a\n")
    assert exec_sync(cri, b, ["cat", "/tmp/mark"])[0] != 0
    # exit codes of ExecSync
    assert exec_sync(cri, b, ["sh", "-c", "echo out; echo err >&2; exit 4"]) == (
        4,
        "out\n",
        "err\n",
    )

    stats = cri.runtime.ContainerStats(api.ContainerStatsRequest(container_id=a), timeout=60).stats
    assert stats.attributes.id == a
    assert stats.memory.working_set_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0

    # UpdateContainerResources reaches the container's cgroup in the guest
    cri.runtime.UpdateContainerResources(
        api.UpdateContainerResourcesRequest(
            container_id=a, linux=api.LinuxContainerResources(memory_limit_in_bytes=96 << 20)
        ),
        timeout=60,
    )
    code, limit, err = exec_sync(cri, a, ["cat", "/sys/fs/cgroup/memory.max"])
    assert (code, limit) == (0, f"{96 << 20}\n"), err

    listed = cri.runtime.ListContainers(
        api.ListContainersRequest(filter=api.ContainerFilter(pod_sandbox_id=pod.id)), timeout=30
    ).containers
    assert {c.id for c in listed} == {a, b}
    assert all(c.state == api.ContainerState.CONTAINER_RUNNING for c in listed)

    # a second pod: its own VM
    other = Pod(cri, "carapace-pod-2", "carapace", tmp_path)
    pods.append(other)
    c = other.container("c", ["sleep", "3600"], pid=OWN_PID)
    assert len(qemu_of(other.id)) == 1
    assert qemu_of(other.id) != qemu_of(pod.id)
    assert exec_sync(cri, c, BOOT_ID)[1] != boot_a

    # each container has its own pid namespace (the kubelet's default): its command is PID 1
    assert exec_sync(cri, b, ["cat", "/proc/1/cmdline"])[1] == "sleep\x003600\x00"
    # shareProcessNamespace: the container joins the pod's pid namespace, whose PID 1 is
    # the pause process; the containers with their own namespace are not in it
    shared = pod.container("shared", ["sleep", "3601"], pid=api.NamespaceMode.POD)
    code, ps, _ = exec_sync(cri, shared, ["ps", "-o", "pid,args"])
    assert code == 0
    assert "/pause" in ps.splitlines()[1], ps
    assert "sleep 3601" in ps and "sleep 3600" not in ps, ps
    # the pod's containers share the sandbox's uts (hostname) and ipc namespaces
    assert exec_sync(cri, a, ["hostname"])[1] == "carapace-pod\n"
    ipc = {exec_sync(cri, x, ["readlink", "/proc/self/ns/ipc"])[1] for x in (a, b, shared)}
    assert len(ipc) == 1, ipc
    # stopping a container: its exit is seen, the pod lives on
    cri.runtime.StopContainer(api.StopContainerRequest(container_id=b, timeout=2), timeout=120)
    st = cri.runtime.ContainerStatus(api.ContainerStatusRequest(container_id=b), timeout=30).status
    assert st.state == api.ContainerState.CONTAINER_EXITED
    assert st.exit_code == 137  # sleep as PID 1 ignores SIGTERM: killed after the grace time
    assert exec_sync(cri, a, ["true"])[0] == 0

    for p in list(pods):
        p.remove()
        pods.remove(p)
        wait_for(f"pod {p.id}'s VM to end", lambda p=p: not qemu_of(p.id), 30)
        assert not (RUN_ROOT / p.id).exists()
        assert not shim_socket(containerd, "k8s.io", p.id).exists()


def test_mixed_node_runc_and_carapace_pods(cri: CriClient, pods: list[Pod], tmp_path: Path) -> None:
    vm_pod = Pod(cri, "vm-pod", "carapace", tmp_path)
    pods.append(vm_pod)
    runc_pod = Pod(cri, "runc-pod", "runc", tmp_path)
    pods.append(runc_pod)
    in_vm = vm_pod.container("k", ["sleep", "3600"], pid=OWN_PID)
    on_host = runc_pod.container("k", ["sleep", "3600"], pid=OWN_PID)
    assert exec_sync(cri, on_host, ["uname", "-r"])[1].strip() == host_kernel()
    assert exec_sync(cri, in_vm, ["uname", "-r"])[1].strip() != host_kernel()
    handlers = {
        p.id: p.runtime_handler
        for p in cri.runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30).items
    }
    assert handlers == {vm_pod.id: "carapace", runc_pod.id: "runc"}
    assert len(qemu_of(vm_pod.id)) == 1 and not qemu_of(runc_pod.id)


def _run_detached(ctr: CtrFn, cid: str) -> None:
    ctr("run", "-d", "--runtime", CARAPACE, BUSYBOX_IMAGE, cid, "sleep", "3600", timeout=180)


def _task_status(ctr: CtrFn, cid: str) -> str:
    for line in ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return ""


def _remove(ctr: CtrFn, cid: str) -> None:
    ctr("tasks", "delete", cid, check=False)
    ctr("containers", "delete", cid)


def test_shim_killed_containerd_cleans_up(containerd: ContainerdRig, ctr: CtrFn) -> None:
    cid = f"shimkill-{uuid.uuid4().hex[:6]}"
    _run_detached(ctr, cid)
    try:
        [qemu] = qemu_of(cid)
        ours = set(containerd.shim_pids())
        shims = [p for p, argv in processes() if p in ours and cid.encode() in argv]
        assert len(shims) == 1, shims
        os.kill(shims[0], signal.SIGKILL)
        # the VM dies with its shim; containerd runs `shim delete`, which releases the
        # rest, and drops the task (containerd 1.6 forgets a task whose shim died)
        wait_for("the task to end", lambda: _task_status(ctr, cid) in ("", "STOPPED"), 60)
        wait_for("QEMU to end", lambda: not qemu_of(cid), 30)
        wait_for("the run dir to go", lambda: not (RUN_ROOT / cid).exists(), 30)
        assert qemu not in qemu_of(cid)
    finally:
        _remove(ctr, cid)
    assert not shim_socket(containerd, "default", cid).exists()


def test_qemu_killed_tasks_exit_with_an_error(containerd: ContainerdRig, ctr: CtrFn) -> None:
    cid = f"qemukill-{uuid.uuid4().hex[:6]}"
    _run_detached(ctr, cid)
    events = subprocess.Popen(
        ["ctr", "-a", str(containerd.socket), "events"],
        stdout=subprocess.PIPE,
        text=True,
        env=containerd.environment(),
    )
    try:
        time.sleep(0.5)
        [qemu] = qemu_of(cid)
        os.kill(qemu, signal.SIGKILL)
        wait_for("the task to stop", lambda: _task_status(ctr, cid) == "STOPPED", 60)
        r = ctr("tasks", "delete", cid)
        wait_for("the run dir to go", lambda: not (RUN_ROOT / cid).exists(), 30)
    finally:
        _remove(ctr, cid)
        events.terminate()
    out, _ = events.communicate(timeout=10)
    exits = [line for line in out.splitlines() if "/tasks/exit" in line and cid in line]
    assert exits and '"exit_status":255' in exits[0], out
    assert r.returncode == 0
    wait_for("the shim to exit", lambda: not shim_socket(containerd, "default", cid).exists(), 30)
