"""The container verbs of a sandbox: what the pod's containers do in its VM.

``ContainerVerbs`` is a part of ``Sandbox`` (which adds the lifecycle): each verb asks
the sandbox's state first (``requires``), checks the container's resources against the
VM, shares its rootfs and talks to the agent.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carapace import resources
from carapace.agent.client import AgentClient
from carapace.errors import AlreadyExists, CarapaceError, InvalidArgument, NotFound, StateError
from carapace.hostcgroup import CgroupStats
from carapace.hypervisor import VM
from carapace.image.store import GuestImage
from carapace.oci.bundle import Spec
from carapace.protocols import agent_pb2 as pb
from carapace.sandbox import stdio
from carapace.sandbox.placement import SandboxCgroupPlacement
from carapace.sandbox.plan import HostFacts, SandboxPlan, check_id
from carapace.sandbox.resize import Resizer
from carapace.sandbox.state import Runstate, requires
from carapace.sandbox.stdio import ProcessIO
from carapace.storage.share import PodShare


def check_no_hooks(spec: Spec, container_id: str) -> None:
    """Hooks are host programs run around the container's life: carapace's runc
    command line runs them (``carapace.ocirt``); anywhere else they are refused, never
    dropped."""
    hooks = spec.to_dict().get("hooks") or {}
    kinds = sorted(k for k, v in hooks.items() if v) if isinstance(hooks, dict) else ["?"]
    if kinds:
        raise InvalidArgument(
            f"container {container_id}: hooks.{', hooks.'.join(kinds)} cannot run here; "
            "accepted: no hooks (carapace-runtime, the runc command line, runs host hooks)"
        )


@dataclass
class PodContainer:
    """A container of the pod, as the host knows it."""

    id: str
    started: bool = False
    resources: resources.ContainerResources = field(
        default_factory=lambda: resources.ContainerResources()
    )


class ContainerVerbs:
    """The pod's containers in the VM (the sandbox's parts it uses are declared here)."""

    id: str
    plan: SandboxPlan
    host: HostFacts
    agent: AgentClient | None
    vm: VM | None
    containers: dict[str, PodContainer]
    share: PodShare
    resizer: Resizer
    placement: SandboxCgroupPlacement
    hostname: str

    @property
    def state(self) -> Runstate:
        raise NotImplementedError

    def require(self, what: str, *states: Runstate) -> None:
        raise NotImplementedError

    def image(self) -> GuestImage:
        raise NotImplementedError

    def _running_agent(self, what: str) -> AgentClient:
        self.require(what, Runstate.RUNNING)
        assert self.agent is not None
        return self.agent

    def _container(self, container_id: str) -> PodContainer:
        c = self.containers.get(container_id)
        if c is None:
            raise NotFound(f"container {container_id} not found in sandbox {self.id}")
        return c

    def _pod_resources(self) -> list[resources.ContainerResources]:
        return [c.resources for c in self.containers.values()]

    @requires(Runstate.RUNNING)
    async def create_container(
        self, container_id: str, spec: Spec, rootfs: Path, overlay: bool = True
    ) -> None:
        """Share ``rootfs`` into the guest and create the container there.
        ``overlay``: the guest writes to an in-memory layer, never to ``rootfs``."""
        agent = self._running_agent("create_container")
        check_id(container_id, "container id")
        if container_id in self.containers:
            raise AlreadyExists(f"container {container_id} exists already in sandbox {self.id}")
        if not rootfs.is_dir():
            raise NotFound(f"rootfs {rootfs} is not a directory")
        resources.check_namespaces(spec.namespaces, container_id, self.host.is_host_namespace)
        check_no_hooks(spec, container_id)
        resources.check_sandbox_only(spec.annotations, container_id, self.plan.annotations)
        res = resources.container_resources(spec.resources, container_id)
        others = self._pod_resources()
        await self.resizer.fit(container_id, res, others)
        self.containers[container_id] = PodContainer(container_id, resources=res)
        try:
            mounts, storages = self.share.share_volumes(container_id, spec.mounts)
            guest_root = self.share.share(container_id, rootfs, readonly=overlay)
            await agent.create_container(
                container_id, spec.with_mounts(mounts).to_dict(), guest_root, overlay, storages
            )
        except BaseException:
            self.share.unshare(container_id, save=self.state is not Runstate.DELETED)
            self.containers.pop(container_id, None)
            await self.resizer.refit(self.state is Runstate.RUNNING)
            raise
        self.placement.apply_pod_limits(self._pod_resources())

    @requires(Runstate.RUNNING)
    async def start_container(self, container_id: str) -> int:
        c = self._container(container_id)
        pid = await self._running_agent("start_container").start_container(container_id)
        c.started = True
        return pid

    async def remove_container(self, container_id: str) -> None:
        self._container(container_id)
        try:
            await self._running_agent("remove_container").remove_container(container_id)
        finally:
            self.share.unshare(container_id, save=self.state is not Runstate.DELETED)
            self.containers.pop(container_id, None)
        await self.resizer.refit(self.state is Runstate.RUNNING)

    @requires(Runstate.RUNNING)
    async def kill(
        self,
        container_id: str,
        sig: int = signal.SIGTERM,
        exec_id: str = "",
        all_processes: bool = False,
    ) -> None:
        self._container(container_id)
        agent = self._running_agent("kill")
        await agent.signal_process(container_id, exec_id, int(sig), all_processes)

    async def wait(self, container_id: str, exec_id: str = "") -> int:
        return await self._running_agent("wait").wait_process(container_id, exec_id)

    async def relay(
        self, container_id: str, exec_id: str, io: ProcessIO, started: Awaitable[Any]
    ) -> int:
        """Relay ``io`` for a created process, await ``started`` (what starts it), and
        return its exit status once it exited and its output was drained."""
        agent = self._running_agent("relay")
        return await stdio.relay(agent, container_id, exec_id, io, started)

    async def run(
        self,
        args: list[str] | None = None,
        *,
        spec: Spec | None = None,
        rootfs: Path | None = None,
        overlay: bool = True,
        io: ProcessIO | None = None,
        container_id: str | None = None,
        env: list[str] | None = None,
        cwd: str = "/",
        terminal: bool = False,
    ) -> int:
        """Run one container to completion and remove it; returns its exit status."""
        from carapace.oci.spec import default_spec

        if spec is None:
            if args is None:
                raise InvalidArgument("run: give a command or a spec")
            spec = Spec.from_dict(
                default_spec(args, env=env, cwd=cwd, terminal=terminal, hostname=self.hostname)
            )
            spec = spec.with_mounts(spec.mounts + self.plan.volumes)
        cid = container_id or f"c-{secrets.token_hex(4)}"
        await self.create_container(cid, spec, rootfs or self.image().rootfs, overlay=overlay)
        try:
            return await self.relay(cid, "", io or ProcessIO(), self.start_container(cid))
        finally:
            with contextlib.suppress(CarapaceError):
                await self.remove_container(cid)

    async def exec(
        self, container_id: str, exec_id: str, process: dict[str, Any], io: ProcessIO | None = None
    ) -> int:
        """Run an extra process in a running container; returns its exit status."""
        agent = self._running_agent("exec")
        self._container(container_id)
        check_id(exec_id, "exec id")
        try:
            return await self.relay(
                container_id,
                exec_id,
                io or ProcessIO(),
                agent.exec_process(container_id, exec_id, process),
            )
        finally:
            with contextlib.suppress(CarapaceError):
                await agent.remove_process(container_id, exec_id)

    async def start_exec(self, container_id: str, exec_id: str, process: dict[str, Any]) -> int:
        """Start an extra process in a container (its streams wait in the guest)."""
        self._container(container_id)
        check_id(exec_id, "exec id")
        return await self._running_agent("start_exec").exec_process(container_id, exec_id, process)

    async def remove_exec(self, container_id: str, exec_id: str) -> None:
        """Forget an exited exec'd process in the guest, so its id may be used again."""
        self._container(container_id)
        await self._running_agent("remove_exec").remove_process(container_id, exec_id)

    async def guest_details(self) -> pb.GuestDetailsResponse:
        return await self._running_agent("guest_details").guest_details()

    async def pause(self, container_id: str) -> None:
        self._container(container_id)
        await self._running_agent("pause").pause_container(container_id)

    async def resume(self, container_id: str) -> None:
        self._container(container_id)
        await self._running_agent("resume").resume_container(container_id)

    async def processes(self, container_id: str) -> list[int]:
        """Guest pids of every process in the container."""
        self._container(container_id)
        return await self._running_agent("processes").list_processes(container_id)

    async def stats(self, container_id: str) -> pb.StatsContainerResponse:
        self._container(container_id)
        return await self._running_agent("stats").stats_container(container_id)

    def host_stats(self) -> CgroupStats:
        """The sandbox's host cost: CPU time, memory and processes of its host cgroup
        (the VM and all its threads, and the shim daemon serving the pod)."""
        if self.placement.cgroup is None:
            raise StateError(f"sandbox {self.id} has no host cgroup (state {self.state.value})")
        return self.placement.stats()

    async def update(self, container_id: str, new: dict[str, Any]) -> None:
        """Apply OCI linux.resources to the container's cgroup in the guest, after
        checking them against the VM and resizing it (hotplug) to fit the pod."""
        c = self._container(container_id)
        agent = self._running_agent("update")
        new = resources.for_guest(new, container_id)
        merged = resources.merge(c.resources, resources.container_resources(new, container_id))
        others = [o.resources for o in self.containers.values() if o.id != container_id]
        await self.resizer.fit(container_id, merged, others)
        try:
            await agent.update_container(container_id, new)
        except BaseException:
            await self.resizer.refit(self.state is Runstate.RUNNING)
            raise
        c.resources = merged
        await self.resizer.refit(self.state is Runstate.RUNNING)

    def kill_vm(self) -> None:
        """Stop the VM now, from the host (SIGKILL to its process): for a guest that
        does not do what it is asked. ``destroy`` still releases the rest."""
        if self.vm is not None:
            self.vm.kill()

    async def agent_closed(self) -> str:
        """Wait until the agent's connection is gone; returns how the guest broke the
        protocol if it did, else ""."""
        agent = self._running_agent("agent_closed")
        await agent.wait_closed()
        return agent.violation

    async def oom_event(self) -> str:
        """Wait for the next OOM kill in any container; returns the container's id."""
        while True:
            cid = await self._running_agent("oom_event").get_oom_event()
            if cid:
                return cid

    @requires(Runstate.RUNNING)
    async def set_size(self, vcpus: int, memory_mib: int) -> None:
        """Resize the running VM (see ``Resizer.set_size``)."""
        await self.resizer.set_size(vcpus, memory_mib)
