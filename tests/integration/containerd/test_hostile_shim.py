"""A hostile guest against the shim, through the test containerd (issue 14, items 7-8).

The agent's test double (carapace.guest.hostile) is switched on by a kernel parameter
the test writes into the rig's carapace configuration ([hypervisor] kernel_params), with
a short [runtime] kill_timeout. It forges OOM events (1,000 ids of no container, 300
of 1 MiB), acknowledges SIGKILL and kills nothing, or floods the agent port with
frames no server sends. The host stays bounded (the shim's memory, containerd's log),
no forged event reaches containerd, and the pod still dies: ``ctr task kill -s 9`` and
CRI's StopPodSandbox end it within the deadline, and everything is released (the
conftests' leak checks run after each test).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cri_api as api

from carapace.guest import hostile
from carapace.hypervisor.console import older

from ..conftest import RUN_ROOT
from .conftest import CtrFn
from .rig import BUSYBOX_IMAGE, CARAPACE, ContainerdRig, CriClient
from .test_cri_network import Pod, wait_for
from .test_shim_ctr import EventLog, task_status, wait_status

KILL_TIMEOUT = 3.0
#: The shim's resident memory may not grow past this (it idles near 60-120 MiB; the
#: forged events are 300 MiB, which an unbounded queue kept).
SHIM_RSS_MAX = 250 << 20


@contextlib.contextmanager
def hostile_guests(containerd: ContainerdRig, modes: str) -> Iterator[None]:
    """Pods booted meanwhile run the hostile agent with ``modes``."""
    config = containerd.carapace_config
    before = config.read_text()
    config.write_text(
        f'[hypervisor]\nkernel_params = "carapace.hostile={modes}"\n'
        f"[runtime]\nkill_timeout = {KILL_TIMEOUT}\n"
    )
    try:
        yield
    finally:
        config.write_text(before)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    return 0


def console_text(pod: str) -> str:
    log = RUN_ROOT / pod / "console.log"
    return "".join(p.read_text(errors="replace") for p in (older(log), log) if p.exists())


class ContainerdLog:
    """The lines containerd (and the shims, whose logs it copies) wrote since now."""

    def __init__(self, containerd: ContainerdRig) -> None:
        self.path = containerd.log_path
        self.start = self.path.stat().st_size

    def lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace").splitlines()

    def shim_lines(self) -> list[str]:
        return [line for line in self.lines() if "runtime=io.containerd.carapace.v2" in line]


def run_detached(containerd: ContainerdRig, cid: str) -> None:
    """``ctr run -d``: ctr hands the shim the rig's carapace configuration as the runtime
    options (CRI does so from containerd's configuration)."""
    containerd.ctr(
        "run",
        "-d",
        "--runtime",
        CARAPACE,
        "--runtime-config-path",
        str(containerd.carapace_config),
        BUSYBOX_IMAGE,
        cid,
        "sleep",
        "3600",
    )


def test_forged_ooms_stay_home_and_an_ignored_sigkill_still_ends_the_pod(
    containerd: ContainerdRig, ctr: CtrFn, tmp_path: Path
) -> None:
    cid = f"hostile-oom-{uuid.uuid4().hex[:8]}"
    events = EventLog(containerd, tmp_path / "events.txt").start()
    log = ContainerdLog(containerd)
    try:
        with hostile_guests(containerd, "oom-flood,ignore-kill"):
            run_detached(containerd, cid)
        (shim,) = containerd.shim_pids()
        peak = rss(shim)
        flood_started = time.monotonic()
        deadline = flood_started + 300
        while hostile.OOM_DONE not in (console := console_text(cid)):
            assert console.count("HOSTILE AGENT") == 1 or time.monotonic() < flood_started + 5
            peak = max(peak, rss(shim))
            assert time.monotonic() < deadline, "the guest did not finish forging"
            time.sleep(0.2)
        time.sleep(1)  # the last forged events reach the shim
        peak = max(peak, rss(shim))
        assert peak < SHIM_RSS_MAX, f"the shim grew to {peak >> 20} MiB"
        oom = [e for e in events.events() if e.topic == "/tasks/oom"]
        assert oom == [], f"forged OOM events reached containerd: {oom[:3]}"
        # a line per kind (the agent client's, the shim's) and 10 s, not one per event
        forged_lines = [line for line in log.shim_lines() if "OOM events" in line]
        allowed = 2 * (2 + (time.monotonic() - flood_started) // 10)
        assert 1 <= len(forged_lines) <= allowed, forged_lines

        # the agent acknowledges SIGKILL and kills nothing: the shim stops the VM
        started = time.monotonic()
        ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_status(ctr, cid, "STOPPED", timeout=KILL_TIMEOUT + 20)
        took = time.monotonic() - started
        assert took >= KILL_TIMEOUT * 0.9, f"stopped in {took:.1f}s: did the guest kill after all?"
        events.wait_for(
            lambda e: (
                e.topic == "/tasks/exit"
                and e.body.get("container_id") == cid
                and e.body.get("exit_status") == 137
            )
        )
        ctr("task", "rm", cid)
        ctr("containers", "rm", cid)
        assert any("stopping the VM from the host" in line for line in log.shim_lines())
    finally:
        events.stop()
        if task_status(ctr, cid):
            ctr("task", "rm", "-f", cid, check=False)
        ctr("containers", "rm", cid, check=False)


def test_a_frame_flood_breaks_the_agent_connection_and_ends_the_pod(
    containerd: ContainerdRig, ctr: CtrFn
) -> None:
    cid = f"hostile-frames-{uuid.uuid4().hex[:8]}"
    log = ContainerdLog(containerd)
    try:
        with hostile_guests(containerd, "frame-flood"):
            run_detached(containerd, cid)
        # the flood starts once the container started: the host closes the connection
        # at the first bad frame and stops the VM; the task ends as lost (255)
        wait_status(ctr, cid, "STOPPED", timeout=60)
        ctr("task", "rm", cid)
        ctr("containers", "rm", cid)
        lines = log.shim_lines()
        assert any("broke the protocol" in line for line in lines), lines[-20:]
        # a line per consequence (the client's, each process lost, the VM stopped, the
        # container removed), not one per frame: the guest sends 500,000
        assert sum("broke the" in line for line in lines) <= 8
        assert len(lines) < 200, lines[-20:]
    finally:
        if task_status(ctr, cid):
            ctr("task", "rm", "-f", cid, check=False)
        ctr("containers", "rm", cid, check=False)


def test_cri_stop_pod_sandbox_ends_a_pod_whose_guest_ignores_kills(
    containerd: ContainerdRig, cri: CriClient, tmp_path: Path
) -> None:
    """What kept a pod Terminating: StopPodSandbox SIGKILLs the containers and the
    pause, the agent acknowledges and kills nothing. It returns within the deadlines
    and RemovePodSandbox releases everything."""
    with hostile_guests(containerd, "ignore-kill"):
        pod = Pod(cri, "hostile-pod", "carapace", tmp_path)
    try:
        pod.container("app", ["sleep", "3600"], pid=api.NamespaceMode.CONTAINER)
        started = time.monotonic()
        cri.runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=120)
        took = time.monotonic() - started
        assert took < 60, f"StopPodSandbox took {took:.0f}s"

        # The shim stopped the VM at the app's deadline, so the pause exited too, and
        # containerd 1.6 handles that exit (deleting the task, then marking the pod
        # NOTREADY) alongside StopPodSandbox, which returns as soon as it finds the
        # task gone. The state follows within the exit handler's time.
        def not_ready() -> bool:
            status = cri.runtime.PodSandboxStatus(
                api.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=30
            ).status
            return bool(status.state == api.PodSandboxState.SANDBOX_NOTREADY)

        wait_for("the pod to be NOTREADY", not_ready, timeout=30)
    finally:
        pod.remove()
