"""What the agent knows of its pod: the containers, their processes, and the lookups
every verb starts with (which answer NOT_FOUND or FAILED_PRECONDITION)."""

from __future__ import annotations

import asyncio
import contextlib
import os

from carapace import linux
from carapace.guest.crun import Crun
from carapace.guest.oom import OOMWatcher
from carapace.guest.reaper import Reaper
from carapace.guest.storage import mount_ephemeral
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import GUEST_STATE_DIR
from carapace.ttrpc import Code, TtrpcError

#: A container's bundle (config.json, pid files, console sockets, overlay dirs).
CONTAINERS_DIR = f"{GUEST_STATE_DIR}/containers"


class Process:
    """A process the agent started: a container's init or an exec.

    (Plain classes here and below, not dataclasses: a dataclass compiles its methods
    when its module is imported, which costs the guest's start milliseconds each.)"""

    def __init__(self, container_id: str, exec_id: str, terminal: bool, pid: int = 0) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.terminal = terminal
        self.pid = pid
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self.master_fd = -1
        self.exit: asyncio.Future[int] | None = None
        self.fds_to_close: list[int] = []

    def close_child_ends(self) -> None:
        for fd in self.fds_to_close:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds_to_close.clear()


class Container:
    def __init__(self, id: str, bundle: str, rootfs: str, mounts: list[str], init: Process) -> None:
        self.id = id
        self.bundle = bundle
        self.rootfs = rootfs
        self.mounts = mounts  # guest mount points to undo on removal, innermost last
        self.init = init
        self.execs: dict[str, Process] = {}
        self.started = False


class Pod:
    """The agent's state: one per VM, shared by the services of every verb."""

    def __init__(self) -> None:
        self.reaper = Reaper()
        self.oom = OOMWatcher()
        self.containers: dict[str, Container] = {}
        self.sandbox_id = ""
        self.sandbox_mounts: list[str] = []
        #: memory-backed volumes (guest tmpfs mount point) -> the containers using them
        self.ephemeral: dict[str, set[str]] = {}
        self._crun: Crun | None = None

    def use_ephemeral(self, st: pb.Storage, cid: str) -> None:
        """Mount a memory-backed volume of the pod the first time a container asks."""
        if st.mount_point not in self.ephemeral:
            mount_ephemeral(st)
            self.ephemeral[st.mount_point] = set()
        self.ephemeral[st.mount_point].add(cid)

    def release_ephemeral(self, cid: str) -> None:
        """Unmount the pod's memory-backed volumes no container uses any more."""
        for point, users in list(self.ephemeral.items()):
            users.discard(cid)
            if not users:
                with contextlib.suppress(OSError):
                    linux.umount(point, lazy=True)
                with contextlib.suppress(OSError):
                    os.rmdir(point)
                del self.ephemeral[point]

    @property
    def crun(self) -> Crun:
        """crun, made on first use (it creates its log directory)."""
        if self._crun is None:
            self._crun = Crun(self.reaper)
        return self._crun

    def container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {cid!r} not found in the sandbox")
        return c

    def process(self, cid: str, exec_id: str) -> Process:
        """The init (no ``exec_id``) or an exec of a container."""
        c = self.container(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise TtrpcError(Code.NOT_FOUND, f"exec {exec_id!r} not found in container {cid!r}")
        return p

    def running(self, cid: str) -> Container:
        """A container that was started and whose init has not exited."""
        c = self.container(cid)
        if not c.started or c.init.exit is None or c.init.exit.done():
            state = "exited" if c.init.exit is not None and c.init.exit.done() else "not started"
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"container {cid!r} is not running ({state})"
            )
        return c
