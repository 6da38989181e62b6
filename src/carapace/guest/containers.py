"""The container verbs: CreateContainer, StartContainer, RemoveContainer,
PauseContainer, ResumeContainer, UpdateContainer, StatsContainer and GetOOMEvent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal

from carapace import linux
from carapace.guest import cgroup
from carapace.guest.crun import CrunError, process_command
from carapace.guest.pod import CONTAINERS_DIR, Container, Pod, Process
from carapace.guest.spec import GuestSpecError, guest_spec, keep_readonly_path_flags
from carapace.guest.stdio import close_process_streams, spawn
from carapace.guest.storage import FSTYPE_MODULES, mount_storage
from carapace.guest.sysinit import need_modules
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import EPHEMERAL_DRIVER
from carapace.ttrpc import Code, TtrpcError

log = logging.getLogger("carapace.agent")


def remove_tree(path: str) -> None:
    """Remove the directory ``path`` with everything under it, never following a
    symbolic link; what cannot be removed stays (as ``shutil.rmtree(path, True)``,
    whose import costs the guest more than removing a bundle does)."""
    try:
        for _root, dirs, files, fd in os.fwalk(path, topdown=False, follow_symlinks=False):
            for name in files:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
            for name in dirs:  # emptied by now; a link to a directory is a file
                try:
                    os.rmdir(name, dir_fd=fd)
                except NotADirectoryError:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=fd)
                except OSError:
                    pass
        os.rmdir(path)
    except OSError:
        pass  # gone already, or not all of it could go


#: The x_tables modules iptables-legacy loads itself (with a modprobe of its own, in
#: the container) before it asks the kernel for a table: the kernel never requests
#: them, so the agent loads them for a container that may administer the network.
LEGACY_TABLES = ("ip_tables", "ip6_tables")


def may_admin_network(config: dict[str, object]) -> bool:
    """Whether the spec's process keeps CAP_NET_ADMIN (in its bounding set)."""
    process = config.get("process")
    caps = process.get("capabilities") if isinstance(process, dict) else None
    bounding = caps.get("bounding") if isinstance(caps, dict) else None
    return isinstance(bounding, list) and "CAP_NET_ADMIN" in bounding


class ContainerService:
    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self._legacy_tables: asyncio.Task[int] | None = None
        #: Removed containers whose crun state and bundle are still being deleted
        #: (``remove``): a container created again with one of these ids waits for it.
        self._deleting: dict[str, asyncio.Task[None]] = {}

    async def load_legacy_tables(self) -> None:
        """Load LEGACY_TABLES once per pod (a failure is logged: iptables-nft needs
        none of them)."""
        if self._legacy_tables is None:
            from carapace.guest import modprobe

            argv = ["-q", "-a", *LEGACY_TABLES]
            self._legacy_tables = asyncio.ensure_future(asyncio.to_thread(modprobe.main, argv))
        status = await asyncio.shield(self._legacy_tables)
        if status:
            log.warning("loading %s for iptables-legacy: modprobe exit %d", LEGACY_TABLES, status)

    async def create_container(self, req: pb.CreateContainerRequest) -> pb.Empty:
        pod = self.pod
        cid = req.container_id
        if not cid or "/" in cid or cid.startswith("."):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid container id {cid!r}")
        await self.deleted(cid)  # a removed container of this id: crun's delete first
        if cid in pod.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {cid!r} exists already")
        try:
            spec = json.loads(req.oci_spec)
        except ValueError as e:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"OCI spec is not JSON: {e}") from e
        if not os.path.isdir(req.rootfs):
            raise TtrpcError(
                Code.NOT_FOUND, f"container rootfs {req.rootfs!r} does not exist in the guest"
            )
        bundle = os.path.join(CONTAINERS_DIR, cid)
        os.makedirs(bundle)
        mounts: list[str] = []
        try:
            rootfs = req.rootfs
            if req.rootfs_overlay:
                for d in ("upper", "work", "rootfs"):
                    os.makedirs(os.path.join(bundle, d))
                merged = os.path.join(bundle, "rootfs")
                need_modules(FSTYPE_MODULES["overlay"])
                linux.mount(
                    "overlay",
                    merged,
                    "overlay",
                    0,
                    f"lowerdir={req.rootfs},upperdir={bundle}/upper,workdir={bundle}/work",
                )
                mounts.append(merged)
                rootfs = merged
            for st in req.storages:
                if st.driver == EPHEMERAL_DRIVER:
                    pod.use_ephemeral(st, cid)
                    continue
                mount_storage(st)
                mounts.append(st.mount_point)
            try:
                config = guest_spec(spec, cid, rootfs)
            except GuestSpecError as e:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"container {cid!r}: {e}") from e
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
            if may_admin_network(config):
                await self.load_legacy_tables()
            terminal = bool(config.get("process", {}).get("terminal"))
            command = process_command(config.get("process"))
            proc = Process(container_id=cid, exec_id="", terminal=terminal)
            container = Container(id=cid, bundle=bundle, rootfs=rootfs, mounts=mounts, init=proc)
            pid_file = os.path.join(bundle, "init.pid")
            readonly_paths = list(config.get("linux", {}).get("readonlyPaths") or [])

            async def create(stdio: tuple[int, int, int] | None, sock: str | None) -> None:
                await pod.crun.create(cid, bundle, pid_file, stdio, sock, command)
                try:
                    with open(pid_file) as f:
                        pid = int(f.read().strip())
                    await keep_readonly_path_flags(pod.reaper, pid, readonly_paths)
                except BaseException:
                    with contextlib.suppress(CrunError):
                        await pod.crun.delete(cid)
                    raise

            try:
                await spawn(proc, bundle, create, pod.reaper)
            except GuestSpecError as e:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"container {cid!r}: {e}") from e
        except BaseException:
            for m in reversed(mounts):
                with contextlib.suppress(OSError):
                    linux.umount(m, lazy=True)
            pod.release_ephemeral(cid)
            remove_tree(bundle)
            raise
        pod.containers[cid] = container
        watch = pod.oom.watch(cid, cgroup.container_cgroup(cid))
        if proc.exit is not None:
            # a kill just before init's exit is counted already: read it once more
            proc.exit.add_done_callback(lambda _: pod.oom.forget(cid, watch))
        log.info("container %s created (pid %d)", cid, proc.pid)
        return pb.Empty()

    async def start_container(self, req: pb.StartContainerRequest) -> pb.StartContainerResponse:
        c = self.pod.container(req.container_id)
        if c.started:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.id!r} is already started")
        await self.pod.crun.start(c.id)
        c.started = True
        return pb.StartContainerResponse(pid=c.init.pid)

    async def remove_container(self, req: pb.RemoveContainerRequest) -> pb.Empty:
        self.pod.container(req.container_id)
        await self.remove(req.container_id, req.timeout_seconds or 10)
        return pb.Empty()

    async def remove(self, cid: str, timeout: float) -> None:
        """Kill the container's processes, wait up to ``timeout`` seconds for each, undo
        its mounts and forget it; then, after the answer, delete it with crun and remove
        its bundle (``deleted`` waits for that). A crun delete costs a process under
        the pod's vCPU, which the host need not wait for: the container's processes
        are gone before this returns."""
        pod = self.pod
        c = pod.containers[cid]
        procs = [c.init, *c.execs.values()]
        for p in procs:
            if p.exit is not None and not p.exit.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            if p.exit is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(p.exit), timeout)
        pod.oom.forget(cid)
        for p in procs:
            close_process_streams(p)
        for m in reversed(c.mounts):
            with contextlib.suppress(OSError):
                linux.umount(m, lazy=True)
        pod.release_ephemeral(cid)
        del pod.containers[cid]
        task = asyncio.ensure_future(self._delete(cid, c.bundle))
        self._deleting[cid] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._deleting.get(cid) is task:
                del self._deleting[cid]

        task.add_done_callback(done)
        log.info("container %s removed", cid)

    async def _delete(self, cid: str, bundle: str) -> None:
        """crun's state of the removed container ``cid``, then its bundle. Never raises:
        a failure is logged (nobody waits for the answer any more)."""
        try:
            await self.pod.crun.delete(cid)
        except CrunError as e:
            log.warning("%s", e)
        except Exception:
            log.exception("container %s: crun delete", cid)
        remove_tree(bundle)

    async def deleted(self, cid: str) -> None:
        """Return once the crun state and bundle of a removed container ``cid`` are gone
        (at once if none is being deleted)."""
        task = self._deleting.get(cid)
        if task is not None:
            await asyncio.shield(task)

    async def pause_container(self, req: pb.PauseContainerRequest) -> pb.Empty:
        c = self.pod.running(req.container_id)
        await self.pod.crun.pause(c.id)
        log.info("container %s paused", c.id)
        return pb.Empty()

    async def resume_container(self, req: pb.ResumeContainerRequest) -> pb.Empty:
        c = self.pod.running(req.container_id)
        await self.pod.crun.resume(c.id)
        log.info("container %s resumed", c.id)
        return pb.Empty()

    async def update_container(self, req: pb.UpdateContainerRequest) -> pb.Empty:
        c = self.pod.container(req.container_id)
        try:
            resources = json.loads(req.resources)
        except ValueError as e:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"resources of container {c.id!r} are not JSON: {e}"
            ) from e
        if not isinstance(resources, dict):
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"resources of container {c.id!r} must be an OCI LinuxResources object, "
                f"got {type(resources).__name__}",
            )
        import tempfile  # here: not imported at the agent's start (the image has it)

        fd, path = tempfile.mkstemp(prefix="resources-", suffix=".json", dir=c.bundle)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(resources, f)
            await self.pod.crun.update(c.id, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        log.info("container %s updated: %s", c.id, json.dumps(resources))
        return pb.Empty()

    async def stats_container(self, req: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        c = self.pod.container(req.container_id)
        return cgroup.read_stats(cgroup.container_cgroup(c.id))

    async def get_oom_event(self, req: pb.GetOOMEventRequest) -> pb.OOMEvent:
        return pb.OOMEvent(container_id=await self.pod.oom.next_event())
