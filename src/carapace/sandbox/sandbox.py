"""The Sandbox: one pod, one VM, one agent connection.

Lifecycle: ``start()`` creates the run dir, boots the VM and waits for the agent;
containers come and go; ``destroy()`` stops the VM and releases every resource.
A failure at any step undoes what was made before raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carapace import hostinfo, linux, resources, sizing
from carapace.agent.client import AgentClient
from carapace.config import Config
from carapace.errors import (
    AgentError,
    AlreadyExists,
    CarapaceError,
    HostError,
    HypervisorError,
    ImageError,
    InvalidArgument,
    NotFound,
    StateError,
)
from carapace.hostcgroup import (
    CgroupHandle,
    CgroupStats,
    driver,
    parse_blkio_cgroup,
    resolve_devices,
)
from carapace.hostcgroup.blkio import ResolvedBlkioItem
from carapace.hostcgroup.cgroupspath import own_parents, pod_cgroup_path, sandbox_cgroup_path
from carapace.hypervisor import VMSpec
from carapace.hypervisor.qemu import hotplug
from carapace.hypervisor.qemu.accel import AccelChoice, choose_accelerator
from carapace.hypervisor.qemu.cmdline import SHARE_TAG
from carapace.hypervisor.qemu.vm import QemuVM, tail
from carapace.image.builder import GuestImage, ImageBuilder
from carapace.protocols import agent_pb2 as pb
from carapace.sandbox.state import SandboxRecord, release

log = logging.getLogger("carapace.sandbox")

GUEST_SHARED_DIR = "/run/carapace/shared"
#: containerd's identifiers are at most 76 characters; so are ours.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$")
OUTPUT_DRAIN_TIMEOUT = 5.0  # after exit, how long to wait for output streams to close
RESIZE_TIMEOUT = 30.0  # how long the guest may take to online or eject what set_size changed

Sink = Callable[[bytes], Awaitable[None] | None]


def check_id(value: str, what: str) -> str:
    if not ID_RE.match(value):
        raise InvalidArgument(
            f"{what} {value!r} is not valid; accepted: 1-76 characters of letters, digits, "
            "'_', '.', '-', starting with a letter or digit"
        )
    return value


HOST_CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")
#: The pod cgroup's controllers when it holds the vCPU threads (sandbox_cgroup_only =
#: false).
POD_CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory")
#: The child cgroup of the sandbox's that holds the vCPU threads.
VCPU_CGROUP = "vcpus"


@dataclass
class SandboxOptions:
    """What the user asked for; validated by ``Sandbox.__init__`` before anything exists."""

    cpus: float | str | None = None
    memory: str | int | None = None  # docker-style size; None: the configured default
    sandbox_id: str | None = None
    hostname: str = "carapace"
    #: The pod's annotations (its sandbox container's): VM size, blkio, files limit.
    annotations: dict[str, str] = field(default_factory=dict)
    #: The pod's sandbox container's OCI spec, checked before anything is made (host
    #: namespaces, its resources) and read for linux.resources.files.limit.
    sandbox_spec: dict[str, Any] | None = None
    #: The owner process (the shim daemon serving the pod) joins the sandbox's host
    #: cgroup too, and leaves it for where it was before the cgroup is removed.
    join_owner: bool = False


@dataclass
class ProcessIO:
    """Where a process's streams come from and go to (all optional)."""

    stdin: AsyncIterator[bytes] | None = None
    stdout: Sink | None = None
    stderr: Sink | None = None
    #: called once the process started, with a resize function (terminal use)
    on_started: Callable[[Callable[[int, int], Awaitable[None]]], None] | None = None


@dataclass
class _Container:
    id: str
    mounts: list[str] = field(default_factory=list)
    started: bool = False
    resources: resources.ContainerResources = field(
        default_factory=lambda: resources.ContainerResources()
    )


class Sandbox:
    def __init__(
        self, config: Config, options: SandboxOptions | None = None, image: GuestImage | None = None
    ) -> None:
        opts = options or SandboxOptions()
        hv = config.hypervisor
        self.config = config
        self.id = check_id(opts.sandbox_id or secrets.token_hex(6), "sandbox id")
        self.hostname = opts.hostname
        self.annotations = dict(opts.annotations)
        host_cpus = hostinfo.usable_cpus()
        self.size = resources.sandbox_size(
            self.annotations,
            default_cpus=hv.default_vcpus,
            default_memory_mib=hv.default_memory,
            host_cpus=host_cpus,
            cpus=opts.cpus,
            memory=opts.memory,
        )
        #: vCPUs the guest uses (online) and its memory; they change with hotplug
        self.vcpus, self.memory_mib = self.size.vcpus, self.size.memory_mib
        self.hotplug = hv.enable_cpu_memory_hotplug
        # the most the VM can grow to while it runs (hotplug headroom)
        self.max_vcpus, self.max_memory_mib = self.vcpus, self.memory_mib
        if self.hotplug:
            self.max_vcpus = max(self.vcpus, min(hv.default_maxvcpus or host_cpus, host_cpus))
            # by default the host's memory, at most the largest VM (256G)
            host_mib = min(hostinfo.memory_total(), resources.MAX_MEMORY) // sizing.MiB
            self.max_memory_mib = max(self.memory_mib, hv.default_maxmemory or host_mib)
        spec = opts.sandbox_spec or {}
        if opts.sandbox_spec is not None:
            resources.check_namespaces(spec, self.id, hostinfo.is_host_namespace)
            self._check_fit(self.id, _spec_resources(spec, self.id), [])
        self.files_limit, warning = resources.files_limit(
            resources.files_limit_value(spec, self.annotations),
            hostinfo.file_max(),
            hostinfo.nofile_cap(),
        )
        if warning:
            log.warning("sandbox %s: %s", self.id, warning)
        self.blkio: list[ResolvedBlkioItem] = []
        if resources.BLKIO_CGROUP in self.annotations:
            self.blkio = resolve_devices(
                parse_blkio_cgroup(self.annotations[resources.BLKIO_CGROUP])
            )
        self.cgroup: CgroupHandle | None = None
        self.join_owner = opts.join_owner
        self._owner_origin: list[str] = []
        self._owner_cgroup: CgroupHandle | None = None
        #: sandbox_cgroup_only = false: the pod cgroup that holds the vCPU threads
        self.pod_cgroup: CgroupHandle | None = None
        # where the host cgroups go (worked out here, so a bad cgroupsPath is refused
        # before anything exists): the pod cgroup is the parent of the sandbox
        # container's; legacy mode puts QEMU in carapace/<id>
        rt = config.runtime
        cgroups_path = str((spec.get("linux") or {}).get("cgroupsPath") or "")
        self.cgroup_path = sandbox_cgroup_path(
            cgroups_path if rt.sandbox_cgroup_only else None, self.id, rt.sandbox_cgroup_prefix
        )
        self.pod_cgroup_path = (
            None if rt.sandbox_cgroup_only else pod_cgroup_path(cgroups_path, self.id)
        )
        self._resize_lock = asyncio.Lock()
        #: the vCPUs the pod's containers last needed (hotplug follows its changes)
        self._pod_vcpus = self.vcpus
        self.run_dir = Path(config.runtime.run_dir) / self.id
        self._image = image
        self.vm: QemuVM | None = None
        self.agent: AgentClient | None = None
        self.record = SandboxRecord(id=self.id, run_dir=str(self.run_dir))
        self.containers: dict[str, _Container] = {}
        self.accel: AccelChoice | None = None
        self.boot_id = ""
        self._lock = asyncio.Lock()

    # -- the guest image --------------------------------------------------------

    def image(self) -> GuestImage:
        if self._image is None:
            img = ImageBuilder(self.config.image_dir).current()
            if img is None:
                raise ImageError(
                    f"no guest image in {self.config.image_dir}; build it with "
                    "`carapace guest build` (or `make run`)"
                )
            self._image = img
        return self._image

    def _kernel_initrd(self) -> tuple[Path, Path]:
        hv = self.config.hypervisor
        if hv.kernel and hv.initrd:
            kernel, initrd = Path(hv.kernel), Path(hv.initrd)
        else:
            img = self.image()
            kernel = Path(hv.kernel) if hv.kernel else img.kernel
            initrd = Path(hv.initrd) if hv.initrd else img.initrd
        for what, p in (("kernel", kernel), ("initrd", initrd)):
            if not p.is_file():
                raise NotFound(f"guest {what} {p} does not exist")
        return kernel, initrd

    @property
    def shared_dir(self) -> Path:
        return self.run_dir / "shared"

    @property
    def vm_pid(self) -> int:
        """The VM process's pid on the host (0 before start)."""
        return self.record.qemu_pid

    async def wait_vm(self) -> int:
        """Wait until the VM process exits; returns its exit status."""
        assert self.vm is not None
        return await self.vm.wait()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Create the run dir, boot the VM, wait for the agent, create the guest sandbox."""
        kernel, initrd = self._kernel_initrd()
        hv = self.config.hypervisor
        self.accel = choose_accelerator(
            hv.accel, hv.path, kernel, initrd, Path(self.config.runtime.state_dir) / "accel.json"
        )
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.run_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise AlreadyExists(f"sandbox {self.id} exists already ({self.run_dir})") from None
        try:
            self.record.vcpus, self.record.memory_mib = self.vcpus, self.memory_mib
            self.record.accel = self.accel.accel
            self.record.save()
            self.shared_dir.mkdir()
            self._make_cgroup()
            spec = VMSpec(
                name=self.id,
                run_dir=self.run_dir,
                kernel=kernel,
                initrd=initrd,
                vcpus=self.vcpus,
                memory_mib=self.memory_mib,
                accel=self.accel.accel,
                shared_dir=self.shared_dir,
                kernel_params=hv.kernel_params,
                max_vcpus=self.max_vcpus,
                max_memory_mib=self.max_memory_mib,
            )
            self.vm = QemuVM(hv.path, spec, die_with_owner=self.config.runtime.kill_vm_with_owner)
            # QEMU is in the sandbox's cgroup and has its files limit from its first
            # instruction on
            assert self.cgroup is not None
            self.vm.pre_exec.append(self.cgroup.preexec_fn())
            if self.files_limit is not None:
                self.vm.pre_exec.append(_nofile_setter(self.files_limit))
            self.record.qemu_pid = await self.vm.start()
            self.record.save()
            log.info(
                "sandbox %s: QEMU pid %d (%s: %s)",
                self.id,
                self.record.qemu_pid,
                self.accel.accel,
                self.accel.reason,
            )
            await self._connect_agent()
            assert self.agent is not None
            await self.agent.create_sandbox(
                self.id,
                self.hostname,
                [
                    pb.Storage(
                        driver="9p",
                        source=SHARE_TAG,
                        fstype="9p",
                        mount_point=GUEST_SHARED_DIR,
                        options=["trans=virtio", "version=9p2000.L", "cache=mmap", "msize=262144"],
                    )
                ],
            )
            self.boot_id = (await self.agent.guest_details()).boot_id
            await self._place_vcpus()
            self.record.state = "running"
            self.record.save()
        except BaseException:
            await self._release()
            raise

    def _make_cgroup(self) -> None:
        """The sandbox's host cgroups, with its block I/O limits. sandbox_cgroup_only:
        one, <pod>/carapace-sandbox-<id>, for QEMU, its threads and the owner (shim).
        Otherwise (legacy): QEMU in carapace/<id>, its vCPU threads later in the pod
        cgroup, the owner in the sandbox container's <pod>/carapace_<id>."""
        drv = driver()
        pod = self.pod_cgroup_path
        if pod is not None and drv.version != "v1":
            raise HostError(
                "sandbox_cgroup_only = false places single vCPU threads in the pod "
                "cgroup, which needs cgroup v1; this host has cgroup v2"
            )
        path = self.cgroup_path
        self.cgroup = drv.create(path, HOST_CGROUP_CONTROLLERS, own_parents(path))
        self.record.cgroup = self.cgroup.to_record()
        self.record.save()
        owner_cgroup = self.cgroup
        if pod is not None:
            self.pod_cgroup = drv.create(pod, POD_CGROUP_CONTROLLERS, own_parents(pod))
            self.record.more_cgroups.insert(0, self.pod_cgroup.to_record())
            self.record.save()
            if self.join_owner:
                prefix = self.config.runtime.container_cgroup_prefix
                owner_cgroup = drv.create(f"{pod}/{prefix}{self.id}", HOST_CGROUP_CONTROLLERS)
                self.record.more_cgroups.insert(0, owner_cgroup.to_record())
                self.record.save()
        if self.join_owner:
            self._owner_origin = owner_cgroup.origin(os.getpid())
            self._owner_cgroup = owner_cgroup
            owner_cgroup.join(os.getpid(), move_memory=True)
        if self.blkio:
            result = self.cgroup.set_blkio(self.blkio)
            for u in result.unapplied:
                log.warning(
                    "sandbox %s: %s %s=%d not applied: %s",
                    self.id,
                    u.path or "(all devices)",
                    u.type,
                    u.value,
                    u.reason,
                )
            for w in result.warnings:
                log.warning("sandbox %s: %s", self.id, w)

    async def _place_vcpus(self) -> None:
        """Place the vCPU threads (again after hotplug). Legacy (sandbox_cgroup_only =
        false): all of them in the pod cgroup. Otherwise only for a fractional CPU
        amount, which caps their host CPU time: they move to the sandbox cgroup's
        ``vcpus`` child, limited to the pod's CPUs (never below the boot amount)."""
        if self.vm is None or self.cgroup is None:
            return
        if self.pod_cgroup is not None:
            # legacy placement: every vCPU thread in the pod cgroup, whose limits are
            # the sum of the containers'
            threads = await self.vm.vcpu_threads()
            self.pod_cgroup.place_threads(threads.values())
            self._apply_pod_limits()
            return
        if self.size.cpu_cap is None:
            return
        cpus = max(
            self.size.cpus,
            sum(c.resources.cpus or 0.0 for c in self.containers.values()),
        )
        threads = await self.vm.vcpu_threads()
        self.cgroup.add_threads(threads.values(), child=VCPU_CGROUP)
        self.record.cgroup = self.cgroup.to_record()
        self.record.save()
        cap = None if cpus >= len(threads) else cpus
        self.cgroup.set_cpu_limit(cap, child=VCPU_CGROUP)
        log.info("sandbox %s: %d vCPU threads capped to %s CPUs", self.id, len(threads), cap)

    async def _connect_agent(self) -> None:
        assert self.vm is not None
        self.agent = await AgentClient.connect(str(self.vm.spec.agent_socket))
        timeout = self.config.hypervisor.boot_timeout
        check = asyncio.ensure_future(self.agent.check(timeout))
        exit_wait = asyncio.ensure_future(self.vm.wait())
        try:
            done, _ = await asyncio.wait(
                {check, exit_wait}, timeout=timeout + 1, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exit_wait.cancel()
        if check in done and check.exception() is None:
            return
        check.cancel()
        console = tail(self.vm.spec.console_log, 15) or "(the console printed nothing)"
        if exit_wait in done or self.vm.exited():
            why = f"QEMU exited with status {self.vm.proc.returncode if self.vm.proc else '?'}"
        elif check.done() and check.exception() is not None:
            why = f"the agent failed: {check.exception()}"
        else:
            why = f"the agent did not answer within {timeout:g}s"
        raise HypervisorError(
            f"sandbox {self.id}: the VM failed to boot ({why}). Console log tail:\n{console}"
        )

    async def destroy(self) -> None:
        """Stop the VM (gracefully, then by force) and release everything. Idempotent."""
        async with self._lock:
            if self.record.state == "deleted":
                return
            if self.agent is not None and self.vm is not None and not self.vm.exited():
                for cid in list(self.containers):
                    with contextlib.suppress(CarapaceError):
                        await self.remove_container(cid)
                with contextlib.suppress(CarapaceError, OSError):
                    await self.agent.destroy_sandbox(timeout=5)
            await self._release()

    async def _release(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()
            self.agent = None
        if self.vm is not None:
            await self.vm.stop(self.config.hypervisor.shutdown_timeout)
            self.record.state = "stopped"
        if self._owner_origin and self._owner_cgroup is not None:
            try:
                self._owner_cgroup.move_to(os.getpid(), self._owner_origin)
                self._owner_origin = []
            except CarapaceError as e:
                log.warning("sandbox %s: cannot leave its cgroup: %s", self.id, e)
        problems = await asyncio.get_running_loop().run_in_executor(None, release, self.record)
        self.record.state = "deleted"
        if problems:
            raise StateError(f"sandbox {self.id}: could not release: {'; '.join(problems)}")

    # -- containers ---------------------------------------------------------------

    def _agent(self) -> AgentClient:
        if self.agent is None or self.record.state != "running":
            raise StateError(f"sandbox {self.id} is not running (state {self.record.state})")
        return self.agent

    async def create_container(
        self, container_id: str, spec: dict[str, Any], rootfs: Path, overlay: bool = True
    ) -> None:
        """Share ``rootfs`` into the guest and create the container there.
        ``overlay``: the guest writes to an in-memory layer, never to ``rootfs``."""
        agent = self._agent()
        check_id(container_id, "container id")
        if container_id in self.containers:
            raise AlreadyExists(f"container {container_id} exists already in sandbox {self.id}")
        if not rootfs.is_dir():
            raise NotFound(f"rootfs {rootfs} is not a directory")
        resources.check_namespaces(spec, container_id, hostinfo.is_host_namespace)
        resources.check_sandbox_only(spec.get("annotations") or {}, container_id, self.annotations)
        res = _spec_resources(spec, container_id)
        c = _Container(container_id, resources=res)
        target = self.shared_dir / container_id / "rootfs"
        await self._fit(container_id, res)
        self.containers[container_id] = c
        try:
            target.mkdir(parents=True)
            self.record.mounts.append(str(target))
            self.record.containers.append(container_id)
            self.record.save()
            c.mounts.append(str(target))
            linux.bind_mount(str(rootfs), str(target), readonly=overlay)
            await agent.create_container(
                container_id, spec, f"{GUEST_SHARED_DIR}/{container_id}/rootfs", overlay
            )
        except BaseException:
            await self._unshare(c)
            await self._refit()
            raise
        self._apply_pod_limits()

    async def _unshare(self, c: _Container) -> None:
        for m in reversed(c.mounts):
            with contextlib.suppress(OSError):
                if linux.is_mountpoint(m):
                    linux.umount(m, lazy=True)
            if m in self.record.mounts:
                self.record.mounts.remove(m)
        if c.id in self.record.containers:
            self.record.containers.remove(c.id)
        shutil.rmtree(self.shared_dir / c.id, ignore_errors=True)
        self.containers.pop(c.id, None)
        if self.record.state != "deleted":
            with contextlib.suppress(OSError):
                self.record.save()

    async def start_container(self, container_id: str) -> int:
        c = self._container(container_id)
        pid = await self._agent().start_container(container_id)
        c.started = True
        return pid

    def _container(self, container_id: str) -> _Container:
        c = self.containers.get(container_id)
        if c is None:
            raise NotFound(f"container {container_id} not found in sandbox {self.id}")
        return c

    async def remove_container(self, container_id: str) -> None:
        c = self._container(container_id)
        try:
            await self._agent().remove_container(container_id)
        finally:
            await self._unshare(c)
        await self._refit()

    async def kill(
        self,
        container_id: str,
        sig: int = signal.SIGTERM,
        exec_id: str = "",
        all_processes: bool = False,
    ) -> None:
        self._container(container_id)
        await self._agent().signal_process(container_id, exec_id, int(sig), all_processes)

    async def wait(self, container_id: str, exec_id: str = "") -> int:
        return await self._agent().wait_process(container_id, exec_id)

    async def relay(
        self, container_id: str, exec_id: str, io: ProcessIO, started: Awaitable[Any]
    ) -> int:
        """Relay ``io`` for a created process, await ``started`` (what starts it), and
        return its exit status once it exited and its output was drained."""
        agent = self._agent()
        # the process exists once ``started`` returns; its output waits in the guest
        await started
        tasks = [
            asyncio.ensure_future(_pump_out(agent, "stdout", container_id, exec_id, io.stdout)),
            asyncio.ensure_future(_pump_out(agent, "stderr", container_id, exec_id, io.stderr)),
        ]
        stdin_task = None
        try:
            if io.on_started is not None:
                io.on_started(
                    lambda rows, cols: agent.tty_win_resize(container_id, exec_id, rows, cols)
                )
            if io.stdin is not None:
                stdin_task = asyncio.ensure_future(_pump_in(agent, container_id, exec_id, io.stdin))
            else:
                await agent.close_stdin(container_id, exec_id)
            status = await agent.wait_process(container_id, exec_id)
            await asyncio.wait(tasks, timeout=OUTPUT_DRAIN_TIMEOUT)
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            return status
        finally:
            for t in [*tasks, *([stdin_task] if stdin_task else [])]:
                t.cancel()
            await asyncio.gather(
                *tasks, *([stdin_task] if stdin_task else []), return_exceptions=True
            )

    async def run(
        self,
        args: list[str] | None = None,
        *,
        spec: dict[str, Any] | None = None,
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
            spec = default_spec(args, env=env, cwd=cwd, terminal=terminal, hostname=self.hostname)
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
        agent = self._agent()
        self._container(container_id)
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
        return await self._agent().exec_process(container_id, exec_id, process)

    async def remove_exec(self, container_id: str, exec_id: str) -> None:
        """Forget an exited exec'd process in the guest, so its id may be used again."""
        self._container(container_id)
        await self._agent().remove_process(container_id, exec_id)

    async def guest_details(self) -> pb.GuestDetailsResponse:
        return await self._agent().guest_details()

    async def pause(self, container_id: str) -> None:
        self._container(container_id)
        await self._agent().pause_container(container_id)

    async def resume(self, container_id: str) -> None:
        self._container(container_id)
        await self._agent().resume_container(container_id)

    async def processes(self, container_id: str) -> list[int]:
        """Guest pids of every process in the container."""
        self._container(container_id)
        return await self._agent().list_processes(container_id)

    async def stats(self, container_id: str) -> pb.StatsContainerResponse:
        self._container(container_id)
        return await self._agent().stats_container(container_id)

    def host_stats(self) -> CgroupStats:
        """The sandbox's host cost: CPU time, memory and processes of its host cgroup
        (QEMU and all its threads, and the shim daemon serving the pod)."""
        if self.cgroup is None:
            raise StateError(f"sandbox {self.id} has no host cgroup (state {self.record.state})")
        return self.cgroup.stats()

    async def update(self, container_id: str, new: dict[str, Any]) -> None:
        """Apply OCI linux.resources to the container's cgroup in the guest, after
        checking them against the VM and resizing it (hotplug) to fit the pod."""
        c = self._container(container_id)
        given = resources.container_resources(new, container_id)
        merged = resources.merge(c.resources, given)
        await self._fit(container_id, merged)
        try:
            await self._agent().update_container(container_id, new)
        except BaseException:
            await self._refit()
            raise
        c.resources = merged
        await self._refit()

    # -- resources ----------------------------------------------------------------

    def _check_fit(
        self,
        container_id: str,
        res: resources.ContainerResources,
        others: list[resources.ContainerResources],
    ) -> tuple[int, int]:
        """Check a container's resources against the VM; returns the vCPUs and memory
        (MiB) the VM must have for the pod with it (its current size without hotplug)."""
        if not self.hotplug:
            resources.check_container(
                res,
                container_id,
                vm_vcpus=self.vcpus,
                vm_memory=self.memory_mib * sizing.MiB,
                hotplug=False,
            )
            return self.vcpus, self.memory_mib
        pod = [*others, res]
        vcpus = resources.pod_vcpus(self.size.vcpus, pod)
        if vcpus > self.max_vcpus:
            raise InvalidArgument(
                f"container {container_id}: the pod's containers need {vcpus} vCPUs "
                f"(--cpus {res.cpus or 0:g} for this one); the pod VM can grow to at most "
                f"{self.max_vcpus} (default_maxvcpus, the host's usable CPUs)"
            )
        resources.check_container(
            res,
            container_id,
            vm_vcpus=vcpus,
            vm_memory=self.max_memory_mib * sizing.MiB,
            hotplug=True,
        )
        memory = resources.pod_memory(self.size.memory, self.memory_mib * sizing.MiB, pod)
        if memory > self.max_memory_mib * sizing.MiB:
            raise InvalidArgument(
                f"container {container_id}: the pod's containers need "
                f"{sizing.format_size(memory)} of memory; the pod VM can grow to at most "
                f"{sizing.format_size(self.max_memory_mib * sizing.MiB)} (default_maxmemory)"
            )
        return vcpus, memory // sizing.MiB

    async def _fit(self, container_id: str, res: resources.ContainerResources) -> None:
        """Check a container's resources and hot-plug what the pod needs with them."""
        others = [c.resources for c in self.containers.values() if c.id != container_id]
        vcpus, memory_mib = self._check_fit(container_id, res, others)
        if self.hotplug and (vcpus > self.vcpus or memory_mib > self.memory_mib):
            await self.set_size(max(vcpus, self.vcpus), memory_mib)
            self._pod_vcpus = max(self._pod_vcpus, vcpus)

    def _apply_pod_limits(self) -> None:
        """sandbox_cgroup_only = false: the pod cgroup (the vCPU threads) is limited by
        the sum of the containers' CPU and memory limits."""
        if self.pod_cgroup is None:
            return
        cpus, memory = resources.pod_limits(c.resources for c in self.containers.values())
        try:
            self.pod_cgroup.set_cpu_limit(cpus)
            self.pod_cgroup.set_memory_limit(memory)
        except CarapaceError as e:
            log.warning("sandbox %s: cannot limit the pod cgroup: %s", self.id, e)

    async def _refit(self) -> None:
        """After a container came, left or changed: the pod cgroup's limits follow, and
        vCPUs the pod no longer needs are given back (memory stays: it is only ever
        hot-added)."""
        self._apply_pod_limits()
        if not self.hotplug or self.record.state != "running":
            return
        pod = [c.resources for c in self.containers.values()]
        vcpus = resources.pod_vcpus(self.size.vcpus, pod)
        # only a change of what the pod needs resizes (a size set by hand stays)
        changed, self._pod_vcpus = vcpus != self._pod_vcpus, vcpus
        if changed and vcpus != self.vcpus:
            try:
                await self.set_size(vcpus, self.memory_mib)
            except CarapaceError as e:
                log.warning("sandbox %s: could not give back vCPUs: %s", self.id, e)
        else:
            await self._place_vcpus()

    async def oom_event(self) -> str:
        """Wait for the next OOM kill in any container; returns the container's id."""
        while True:
            cid = await self._agent().get_oom_event()
            if cid:
                return cid

    async def set_size(self, vcpus: int, memory_mib: int) -> None:
        """Resize the running VM: hot-add or hot-remove vCPUs to exactly ``vcpus``, and
        hot-add memory up to ``memory_mib`` (memory is never removed: a smaller size
        keeps the current one); the guest onlines what was added."""
        async with self._resize_lock:
            agent = self._agent()
            assert self.vm is not None
            if not self.config.hypervisor.enable_cpu_memory_hotplug:
                raise InvalidArgument(
                    f"sandbox {self.id}: cannot resize to {vcpus} vCPUs / {memory_mib} MiB: CPU "
                    "and memory hotplug is disabled; set [hypervisor] "
                    "enable_cpu_memory_hotplug = true in configuration.toml"
                )
            boot_vcpus, boot_mib = self.vm.spec.vcpus, self.vm.spec.memory_mib
            if not boot_vcpus <= vcpus <= self.max_vcpus:
                raise InvalidArgument(
                    f"sandbox {self.id}: vCPUs {vcpus} is out of range; accepted: {boot_vcpus} "
                    f"(the boot vCPUs) to {self.max_vcpus} (max vCPUs)"
                )
            max_mib = boot_mib + hotplug.memory_headroom_mib(boot_mib, self.max_memory_mib)
            if not boot_mib <= memory_mib <= max_mib:
                raise InvalidArgument(
                    f"sandbox {self.id}: memory {memory_mib} MiB is out of range; accepted: "
                    f"{boot_mib} MiB (the boot memory) to {max_mib} MiB (max memory)"
                )
            plugged = sum(slot.plugged for slot in await self.vm.cpu_slots())
            # where QEMU cannot unplug vCPUs (TCG), surplus ones stay plugged and the
            # guest takes them offline: it runs on exactly ``vcpus`` either way
            plug = vcpus if self.vm.can_unplug_vcpus else max(vcpus, plugged)
            await self.vm.vcpu_plan(plug)  # refuses before anything changed
            _, mem_before_kb = await agent.online_cpu_mem(0, RESIZE_TIMEOUT, max_online=plugged)
            added = 0
            if memory_mib > self.memory_mib:
                added = await self.vm.add_memory(memory_mib - self.memory_mib)
                self.memory_mib += added
                self.record.memory_mib = self.memory_mib
                self.record.save()
            try:
                await self.vm.set_vcpus(plug)
            finally:
                # what QEMU has, even when a hot-add or hot-remove failed half-way
                with contextlib.suppress(Exception):
                    plugged = sum(slot.plugged for slot in await self.vm.cpu_slots())
            # ACPI adds the memory to the guest asynchronously: online until it is there
            deadline = asyncio.get_running_loop().time() + RESIZE_TIMEOUT
            want = min(vcpus, plugged)
            while True:
                cpus, mem_kb = await agent.online_cpu_mem(want, RESIZE_TIMEOUT, max_online=want)
                if mem_kb >= mem_before_kb + added * 1024:
                    break
                if asyncio.get_running_loop().time() >= deadline:
                    raise HypervisorError(
                        f"sandbox {self.id}: the guest's MemTotal is {mem_kb} KiB "
                        f"{RESIZE_TIMEOUT:g}s after adding {added} MiB to its {mem_before_kb} "
                        f"KiB; expected at least {mem_before_kb + added * 1024} KiB"
                    )
                await asyncio.sleep(0.1)
            self.vcpus = cpus
            self.record.vcpus = self.vcpus
            self.record.save()
            await self._place_vcpus()
            if cpus != vcpus:
                raise HypervisorError(
                    f"sandbox {self.id}: the guest has {cpus} online CPUs; expected {vcpus}"
                )
            log.info(
                "sandbox %s: resized to %d vCPUs (%d plugged), %d MiB",
                self.id,
                vcpus,
                plugged,
                self.memory_mib,
            )


def _spec_resources(spec: dict[str, Any], container_id: str) -> resources.ContainerResources:
    linux_section = spec.get("linux") or {}
    return resources.container_resources(linux_section.get("resources"), container_id)


def _nofile_setter(n: int) -> Callable[[], None]:
    def set_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return set_nofile


async def _pump_out(
    agent: AgentClient, stream: str, cid: str, exec_id: str, sink: Sink | None
) -> None:
    while True:
        try:
            data, eof = await agent.read_stream(stream, cid, exec_id)
        except AgentError:
            return
        if eof:
            return
        if sink is not None:
            r = sink(data)
            if r is not None:
                await r


async def _pump_in(
    agent: AgentClient, cid: str, exec_id: str, source: AsyncIterator[bytes]
) -> None:
    try:
        async for chunk in source:
            if chunk:
                await agent.write_stdin(cid, exec_id, chunk)
    except AgentError:
        return
    with contextlib.suppress(AgentError):
        await agent.close_stdin(cid, exec_id)
