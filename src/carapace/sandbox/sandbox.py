"""The Sandbox: one pod, one VM, one agent connection. This module is its lifecycle.

``start()`` makes the run dir and host cgroups, boots the VM and waits for the agent;
containers come and go; ``destroy()`` stops the VM and releases every resource. A
failure at any step undoes what was made before raising. The parts it leans on each
have a module: ``plan`` (decided once, pure), ``placement`` (host cgroups), ``rootfs``
(containers' root filesystems into the guest), ``resize`` (hotplug), ``stdio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from carapace import hypervisor
from carapace.agent.client import AgentClient
from carapace.config import Config
from carapace.daemons import CAP_MKNOD, drop_capabilities
from carapace.errors import AlreadyExists, CarapaceError, ImageError, StateError
from carapace.hostcgroup import CgroupDriver, driver
from carapace.hypervisor import VM, AccelChoice, Nic, VMSpec
from carapace.image.store import GuestImage, current_image
from carapace.network.stats import InterfaceStats
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import SHARED_FS_VIRTIOFS
from carapace.sandbox.boot import answering_agent, guest_files
from carapace.sandbox.containers import ContainerVerbs, PodContainer
from carapace.sandbox.network import PodNetwork
from carapace.sandbox.placement import SandboxCgroupPlacement
from carapace.sandbox.plan import NIC_SLOTS, HostFacts, SandboxOptions, plan_sandbox, vm_spec
from carapace.sandbox.portforward import PortForwarder
from carapace.sandbox.resize import Resizer
from carapace.sandbox.restore import (
    Restore,
    Taken,
    adopt,
    attempt_restore,
    attempt_take,
    make_it_the_pods,
)
from carapace.sandbox.state import Runstate, SandboxRecord, check_transition, release, requires
from carapace.storage.share import HostMounts, Mounts, PodShare, shared_storage
from carapace.storage.virtiofsd import Virtiofsd
from carapace.storage.volumes import SourceFacts, plan_mounts, probe_source

log = logging.getLogger("carapace.sandbox")


P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class SandboxParts:
    """What a sandbox acts on outside itself; the defaults are the real host's. Unit
    tests give fakes (a VM, an agent, a cgroup tree in a temporary directory)."""

    host: Callable[[], HostFacts] = HostFacts.probe
    new_vm: Callable[[str, VMSpec, bool], VM] = hypervisor.new_vm
    choose_accelerator: Callable[[str, str, Path, Path, Path], AccelChoice] = (
        hypervisor.choose_accelerator
    )
    connect_agent: Callable[[str], Awaitable[AgentClient]] = AgentClient.connect
    cgroup_driver: Callable[[], CgroupDriver] = driver
    mounts: Mounts = field(default_factory=HostMounts)
    probe_source: Callable[[str], SourceFacts] = probe_source
    new_virtiofsd: Callable[[str, Path, Path, Path, bool], Virtiofsd] = Virtiofsd
    image: Callable[[Path], GuestImage | None] = current_image
    command_line: Callable[[str, VMSpec], list[str]] = hypervisor.vm_command_line


class Sandbox(ContainerVerbs):
    def __init__(
        self,
        config: Config,
        options: SandboxOptions | None = None,
        image: GuestImage | None = None,
        parts: SandboxParts | None = None,
    ) -> None:
        """Decide the sandbox (``plan_sandbox``); raises before anything exists."""
        self.config = config
        self.parts = parts or SandboxParts()
        self.host = self.parts.host()
        self.plan = plan_sandbox(config, options or SandboxOptions(), self.host)
        for warning in self.plan.warnings:
            log.warning("sandbox %s: %s", self.plan.id, warning)
        self.id, self.hostname, self.run_dir = self.plan.id, self.plan.hostname, self.plan.run_dir
        self.record = SandboxRecord(id=self.id, run_dir=str(self.run_dir))
        self.placement = SandboxCgroupPlacement(
            self.plan, self.record, config.runtime.container_cgroup_prefix, self.parts.cgroup_driver
        )
        rt = config.runtime
        self.share = PodShare(
            self.run_dir / "shared", self.record, self.parts.mounts, (rt.run_dir, rt.state_dir)
        )
        # the pod's volumes are checked before anything exists
        spec = options.sandbox_spec if options else None
        pod_mounts = self.plan.volumes + (spec.mounts if spec is not None else ())
        plan_mounts(pod_mounts, self.parts.probe_source, self.share.own_dirs)
        self.containers: dict[str, PodContainer] = {}
        self.resizer = Resizer(self.plan, self.record, self.placement, self._pod_resources)
        self.network = PodNetwork(self.plan.network, self.record, self.id)
        self.ports = PortForwarder(self.plan.network, self.id)  # kubectl port-forward
        self._image = image
        self.vm: VM | None = None
        self.agent: AgentClient | None = None
        self.boot_id = ""
        #: The key of the VM template the pod was restored from ("": it booted).
        self.template = ""
        #: Whether the pod's VM was taken from the pool of pre-booted VMs.
        self.pooled = False
        self.virtiofsd: Virtiofsd | None = None
        self._fs_watch: asyncio.Future[None] | None = None
        self._made_run_dir = False
        self._lock = asyncio.Lock()

    # -- what the sandbox is --------------------------------------------------------

    @property
    def state(self) -> Runstate:
        return self.record.state

    def _move(self, new: Runstate) -> None:
        check_transition(self.record.state, new, f"sandbox {self.id}")
        self.record.state = new

    def require(self, what: str, *states: Runstate) -> None:
        if self.record.state not in states:
            raise StateError(
                f"sandbox {self.id}: {what} needs state {' or '.join(states)}; "
                f"it is {self.record.state.value}"
            )

    @property
    def vcpus(self) -> int:
        """vCPUs online in the guest (hotplug changes them)."""
        return self.resizer.vcpus

    @property
    def memory_mib(self) -> int:
        return self.resizer.memory_mib

    @property
    def vm_pid(self) -> int:
        """The VM process's pid on the host (0 before start)."""
        return self.record.qemu_pid

    @property
    def accel(self) -> str:
        """The accelerator the VM runs under ('' before start)."""
        return self.record.accel

    @property
    def shared_dir(self) -> Path:
        return self.share.shared_dir

    async def wait_vm(self) -> int:
        """Wait until the VM process exits; returns its exit status."""
        if self.vm is None:
            raise StateError(f"sandbox {self.id} has no VM (state {self.state.value})")
        return await self.vm.wait()

    def image(self) -> GuestImage:
        if self._image is None:
            img = self.parts.image(Path(self.config.image_dir))
            if img is None:
                raise ImageError(
                    f"no guest image in {self.config.image_dir}; build it with "
                    "`carapace guest build` (or `make run`)"
                )
            self._image = img
        return self._image

    def kernel_initrd(self) -> tuple[Path, Path]:
        """The guest kernel and initrd (the configured ones, else the image's)."""
        return guest_files(self.config.hypervisor, self.image)

    def vm_spec(self, kernel: Path, initrd: Path, accel: str, nics: tuple[Nic, ...]) -> VMSpec:
        """The pod's VM, as it would boot."""
        hv = self.config.hypervisor
        return vm_spec(self.plan, hv, self.shared_dir, kernel, initrd, accel, nics)

    # -- lifecycle ----------------------------------------------------------------------

    @requires(Runstate.CREATED)
    async def start(self) -> None:
        """Make the run dir and host cgroups, boot the VM, wait for the agent, create
        the guest sandbox."""
        kernel, initrd = self.kernel_initrd()
        hv, rt = self.config.hypervisor, self.config.runtime
        accel = self.parts.choose_accelerator(
            hv.accel, hv.path, kernel, initrd, Path(rt.state_dir) / "accel.json"
        )
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.run_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise AlreadyExists(f"sandbox {self.id} exists already ({self.run_dir})") from None
        self._made_run_dir = True
        try:
            self.record.vcpus, self.record.memory_mib = self.vcpus, self.memory_mib
            self.record.accel = accel.accel
            self.record.save()
            self.share.create()
            self.placement.make()
            nics = await self.network.prepare()
            spec = self.vm_spec(kernel, initrd, accel.accel, nics)
            factory = self.config.factory
            taken = await self._take(spec) if factory.vm_cache_number > 0 else None
            restore = await self._restore(spec) if factory.template and not taken else None
            try:
                if taken is not None:
                    spec = taken.spec
                elif restore is not None:
                    spec = restore.vm_spec(spec, NIC_SLOTS)
                if self.plan.shared_fs == SHARED_FS_VIRTIOFS:
                    await self._start_virtiofsd(spec)
                vm = self.vm = self.parts.new_vm(hv.path, spec, rt.kill_vm_with_owner)
                if taken is not None:
                    pid = await adopt(vm, taken, self.record, self.placement, self.plan.files_limit)
                    self.record.qemu_pid = pid
                else:
                    # the VM is in the sandbox's cgroup and has its files limit from
                    # its first instruction on
                    vm.pre_exec.append(self.placement.join_vm())
                    vm.pre_exec.append(drop_capabilities(CAP_MKNOD))
                    if self.plan.files_limit is not None:
                        vm.pre_exec.append(_nofile_setter(self.plan.files_limit))
                    self.record.qemu_pid = await vm.start()
            finally:
                if restore is not None:
                    restore.close()
                if taken is not None:
                    taken.handover.abandon()  # the VM's unless given to it
            self.record.save()
            log.info(
                "sandbox %s: VM pid %d (%s: %s)", self.id, self.vm_pid, accel.accel, accel.reason
            )
            if restore is not None:
                agent = self.agent = await restore.resume(vm, self._connect_agent)
            elif taken is not None:
                agent = self.agent = await make_it_the_pods(
                    vm, taken.nics, lambda v: self._connect_agent(v, taken.connect_agent)
                )
            else:
                agent = self.agent = await self._connect_agent(vm)
            self.network.close_fds()
            await agent.create_sandbox(self.id, self.hostname, shared_storage(self.plan.shared_fs))
            await self.network.configure(agent)
            self.boot_id = (await agent.guest_details()).boot_id
            self.resizer.attach(vm, agent)
            await self.resizer.place_vcpus()
            self._move(Runstate.RUNNING)
            self.record.save()
            self.ports.start(agent)
        except BaseException:
            await self._release()
            raise

    async def _take(self, spec: VMSpec) -> Taken | None:
        """The pod's VM from the pool of pre-booted VMs, or None (logged why)."""
        taken = await attempt_take(self.id, self.config, spec, NIC_SLOTS, self.parts.command_line)
        self.pooled = taken is not None
        return taken

    async def _restore(self, spec: VMSpec) -> Restore | None:
        """The pod's start from a VM template, or None (it boots cold; logged why)."""
        parts = (self.parts.command_line, self.parts.new_vm, self.parts.connect_agent)
        restore = await attempt_restore(self.id, self.config, spec, NIC_SLOTS, parts)
        self.template = restore.template.key if restore is not None else ""
        return restore

    async def _start_virtiofsd(self, spec: VMSpec) -> None:
        """Start the pod's virtio-fs daemon (recorded before it exists); a watch kills
        the VM if it dies, since the guest's files are gone with it."""
        rt = self.config.runtime
        daemon = self.virtiofsd = self.parts.new_virtiofsd(
            self.config.hypervisor.virtiofsd,
            self.shared_dir,
            spec.fs_socket,
            self.run_dir / "virtiofsd.log",
            rt.kill_vm_with_owner,
        )
        daemon.pre_exec.append(self.placement.join_vm())
        self.record.virtiofsd = {"source": str(self.shared_dir), "socket": str(spec.fs_socket)}
        self.record.save()
        self.record.virtiofsd["pid"] = await daemon.start()
        self.record.save()
        self._fs_watch = asyncio.ensure_future(self._watch_virtiofsd(daemon))

    async def _watch_virtiofsd(self, daemon: Virtiofsd) -> None:
        code = await daemon.wait()
        if self._fs_watch is not None and self.vm is not None and not self.vm.exited():
            log.error(
                "sandbox %s: virtiofsd exited (status %d) while the pod ran; stopping the VM: %s",
                self.id,
                code,
                daemon.log_tail(),
            )
            self.vm.kill()

    async def _connect_agent(
        self, vm: VM, connect: Callable[[str], Awaitable[AgentClient]] | None = None
    ) -> AgentClient:
        """Connect to the agent (by ``connect``, else at its socket) and wait for it to
        answer (or the VM to die)."""
        timeout = self.config.hypervisor.boot_timeout

        def keep(agent: AgentClient) -> None:
            self.agent = agent

        how = connect or self.parts.connect_agent
        return await answering_agent(vm, how, keep, timeout, self.id)

    @requires(Runstate.RUNNING)
    async def add_interface(self, netns: str, name: str) -> pb.Interface:
        """Take the interface ``name`` of the network namespace ``netns`` (made or
        attached after the pod started) into the VM; returns it as the guest has it."""
        assert self.vm is not None and self.agent is not None
        return await self.network.add_interface(self.vm, self.agent, netns, name)

    @requires(Runstate.RUNNING)
    async def remove_interface(self, name: str) -> None:
        """Take the interface ``name`` out of the VM and release its tap."""
        assert self.vm is not None and self.agent is not None
        await self.network.remove_interface(self.vm, self.agent, name)

    async def network_stats(self) -> tuple[InterfaceStats, ...]:
        """Each guest interface's traffic, counted on the host (its tap)."""
        return await asyncio.to_thread(self.network.stats)

    async def destroy(self) -> None:
        """Stop the VM (gracefully, then by force) and release everything. Idempotent."""
        async with self._lock:
            if self.state is Runstate.DELETED:
                return
            vm = self.vm
            if self.agent is not None and vm is not None and not vm.exited():
                # the guest ends every container's processes and syncs; their mounts
                # in the share are released with the rest (_release)
                with contextlib.suppress(CarapaceError, OSError):
                    await self.agent.destroy_sandbox(timeout=5)
                    # the guest synced its files and answered: nothing in it is lost
                    # if QEMU ends now rather than after the guest kernel's power-off
                    self._end_vm()
            await self._release()

    def _end_vm(self) -> None:
        """End QEMU at once (its virtio-fs daemon ends with it: not an accident)."""
        watch, self._fs_watch = self._fs_watch, None
        if watch is not None:
            watch.cancel()
        if self.vm is not None:
            self.vm.kill()

    async def _release(self) -> None:
        watch, self._fs_watch = self._fs_watch, None  # the VM stops now: not an accident
        if watch is not None:
            watch.cancel()
        self.resizer.detach()
        self.network.close_fds()
        await self.ports.stop()
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()
            self.agent = None
        if self.vm is not None:
            await self.vm.stop(self.config.hypervisor.shutdown_timeout)
            self._move(Runstate.STOPPED)
        if self.virtiofsd is not None:
            await self.virtiofsd.stop()
        if not self.record.containers:
            self.share.close()
        self.placement.leave()
        problems: list[str] = []
        if self._made_run_dir:  # never another owner's: start refused an existing one
            loop = asyncio.get_running_loop()
            problems = await loop.run_in_executor(
                None, release, self.record, self.config.runtime.run_dir
            )
        self._move(Runstate.DELETED)
        if problems:
            raise StateError(f"sandbox {self.id}: could not release: {'; '.join(problems)}")


def _nofile_setter(n: int) -> Callable[[], None]:
    def set_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return set_nofile
