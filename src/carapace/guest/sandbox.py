"""The verbs about the whole pod VM: CreateSandbox, DestroySandbox, OnlineCPUMem,
GetGuestDetails, Check and Version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from carapace.guest import hotplug, sysinit
from carapace.guest.cgroup import CGROUP_ROOT, CONTAINERS_PARENT
from carapace.guest.containers import ContainerService
from carapace.guest.pod import Pod
from carapace.guest.storage import mount_storage
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError

AGENT_VERSION = "0.1.0"
ONLINE_TIMEOUT_MS = 10_000  # OnlineCPUMem's default wait for the expected CPUs
log = logging.getLogger("carapace.agent")


class SandboxService:
    def __init__(self, pod: Pod, containers: ContainerService) -> None:
        self.pod = pod
        self.containers = containers

    async def create_sandbox(self, req: pb.CreateSandboxRequest) -> pb.Empty:
        pod = self.pod
        if pod.sandbox_id:
            raise TtrpcError(Code.ALREADY_EXISTS, f"sandbox {pod.sandbox_id} exists already")
        for st in req.storages:
            mount_storage(st)
            pod.sandbox_mounts.append(st.mount_point)
        if req.hostname:
            with open("/proc/sys/kernel/hostname", "w") as f:
                f.write(req.hostname)
        pod.sandbox_id = req.sandbox_id
        log.info("sandbox %s created", req.sandbox_id)
        return pb.Empty()

    async def destroy_sandbox(self, req: pb.DestroySandboxRequest) -> pb.Empty:
        """End every container's processes at once, wait (1 s at most) until the agent
        reaped those it started, sync the files and power off. Removing each container
        (crun delete, its mounts, its bundle) is left out, as the power-off undoes it:
        it cost a run of crun per container. Without cgroup.kill, each is removed."""
        kill = os.path.join(CGROUP_ROOT, CONTAINERS_PARENT, "cgroup.kill")
        try:
            if self.pod.containers:
                with open(kill, "w") as f:
                    f.write("1")
        except OSError as e:
            log.warning("%s: %s; removing each container", kill, e)
            for cid in list(self.pod.containers):
                with contextlib.suppress(Exception):
                    await self.containers.remove(cid, 1)
        exits = [
            asyncio.shield(p.exit)
            for c in self.pod.containers.values()
            for p in (c.init, *c.execs.values())
            if p.exit is not None and not p.exit.done()
        ]
        if exits:
            await asyncio.wait(exits, timeout=1)
        os.sync()
        log.info("sandbox %s destroyed; powering off", self.pod.sandbox_id)
        if os.getpid() == 1:
            asyncio.get_running_loop().call_later(0.05, sysinit.power_off)
        return pb.Empty()

    async def online_cpu_mem(self, req: pb.OnlineCPUMemRequest) -> pb.OnlineCPUMemResponse:
        """Online hot-added CPUs and memory blocks, retrying until ``expected_cpus``
        CPUs are online (ACPI adds and ejects them asynchronously) or the time is up."""
        timeout = (req.timeout_ms or ONLINE_TIMEOUT_MS) / 1000
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        while True:
            r = hotplug.online_all(max_cpus=req.max_online_cpus)
            if r.cpus or r.memory_blocks or r.offlined:
                log.info(
                    "onlined CPUs %s, memory blocks %s; offlined CPUs %s",
                    r.cpus,
                    r.memory_blocks,
                    r.offlined,
                )
            errors = r.errors
            cpus = hotplug.online_cpus()
            if not req.expected_cpus or len(cpus) == req.expected_cpus:
                break
            if time.monotonic() >= deadline:
                raise TtrpcError(
                    Code.DEADLINE_EXCEEDED,
                    f"expected {req.expected_cpus} online CPUs, saw {len(cpus)} "
                    f"({','.join(map(str, cpus))}) after {timeout:g}s"
                    + (f"; failed writes: {'; '.join(errors)}" if errors else ""),
                )
            await asyncio.sleep(0.05)
        if errors:
            log.warning("onlining: %s", "; ".join(errors))
        return pb.OnlineCPUMemResponse(online_cpus=len(cpus), mem_total_kb=hotplug.mem_total_kb())

    async def get_guest_details(self, req: pb.GuestDetailsRequest) -> pb.GuestDetailsResponse:
        mem = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return pb.GuestDetailsResponse(
            kernel_release=os.uname().release,
            online_cpus=len(os.sched_getaffinity(0)),
            mem_total_bytes=mem,
            boot_id=boot_id,
            agent_version=AGENT_VERSION,
            crun_version=await self.pod.crun.version(),
        )

    async def check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def version(self, req: pb.CheckRequest) -> pb.VersionCheckResponse:
        return pb.VersionCheckResponse(grpc_version="ttrpc-1", agent_version=AGENT_VERSION)
