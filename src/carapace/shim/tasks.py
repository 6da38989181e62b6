"""The shim's tasks: a container of the pod (its spec, its rootfs mounts in the bundle)
and its processes (the init and the exec'd ones), as containerd's Task API sees them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from carapace import linux
from carapace.errors import CarapaceError, InvalidArgument, NotFound, StateError
from carapace.oci import Spec
from carapace.protocols.containerd import task_types_pb2 as tt
from carapace.sandbox import ProcessIO
from carapace.shim.interfaces import SandboxLike
from carapace.shim.params import mount_options
from carapace.shim.stdio import ProcessStdio
from carapace.ttrpc import TtrpcError

log = logging.getLogger("carapace.shim")

#: Exit status reported for processes that were lost with their VM.
VM_LOST_STATUS = 255


def now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass
class Proc:
    """A container's init process (exec_id "") or one of its exec'd processes."""

    container_id: str
    exec_id: str
    stdio: ProcessStdio
    spec: dict[str, Any] | None = None  # the OCI process of an exec
    status: int = tt.CREATED
    pid: int = 0  # in the guest
    exit_status: int = 0
    exited_at: Timestamp | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    relay: asyncio.Task[None] | None = None
    resize: Callable[[int, int], Awaitable[None]] | None = None

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    async def launch(
        self,
        sb: SandboxLike,
        start: Awaitable[int],
        on_exit: Callable[[Proc, int], None],
    ) -> int:
        """Start the process by awaiting ``start`` while ``sb`` relays its stdio;
        returns its guest pid once it started. ``on_exit`` is called with its exit
        status (``VM_LOST_STATUS`` if the VM was lost while it ran)."""
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def starter() -> int:
            pid = await start
            started.set_result(pid)
            return pid

        def on_started(resize: Callable[[int, int], Awaitable[None]]) -> None:
            self.resize = resize

        stdio = self.stdio
        io = ProcessIO(
            stdin=stdio.stdin.chunks() if stdio.stdin is not None else None,
            stdout=stdio.stdout.write if stdio.stdout is not None else None,
            stderr=stdio.stderr.write if stdio.stderr is not None else None,
            on_started=on_started,
        )

        async def relay() -> None:
            try:
                status = await sb.relay(self.container_id, self.exec_id, io, starter())
            except (CarapaceError, TtrpcError, OSError) as e:
                if not started.done():
                    raise
                log.error("%s/%s: lost: %s", self.container_id, self.exec_id or "init", e)
                status = VM_LOST_STATUS
            finally:
                stdio.close()
            on_exit(self, status)

        self.relay = asyncio.ensure_future(relay())
        waiters: set[asyncio.Future[Any]] = {started, self.relay}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            self.relay.result()  # raises why the start failed
            raise StateError(f"{self.id}: did not start")
        self.pid = started.result()
        self.status = tt.RUNNING
        return self.pid

    def finish(self, status: int) -> bool:
        if self.exited.is_set():
            return False
        self.status = tt.STOPPED
        self.exit_status = status
        self.exited_at = now()
        self.exited.set()
        return True


@dataclass
class Container:
    id: str
    bundle: str
    spec: Spec
    rootfs: Path  # where the rootfs is mounted (the bundle's root.path)
    init: Proc
    rootfs_mounts: list[str] = field(default_factory=list)
    execs: dict[str, Proc] = field(default_factory=dict)

    @property
    def procs(self) -> list[Proc]:
        return [self.init, *self.execs.values()]

    def mount_rootfs(self, mounts: Iterable[Any]) -> Path:
        """Mount containerd's rootfs mounts (``containerd.types.Mount``) at the rootfs;
        what was mounted is recorded at once, so ``unmount_rootfs`` undoes it."""
        for m in mounts:
            flags, data = mount_options(list(m.options))
            fstype = None if m.type in ("bind", "rbind") else m.type
            try:
                linux.mount(m.source, str(self.rootfs), fstype, flags, data)
            except OSError as e:
                raise InvalidArgument(
                    f"container {self.id}: cannot mount its rootfs ({m.type} {m.source}): {e}"
                ) from e
            self.rootfs_mounts.append(str(self.rootfs))
        if not self.rootfs.is_dir():
            raise NotFound(f"container {self.id}: rootfs {self.rootfs} is not a directory")
        return self.rootfs

    def unmount_rootfs(self) -> None:
        for m in reversed(self.rootfs_mounts):
            with contextlib.suppress(OSError):
                linux.umount(m, lazy=True)
        self.rootfs_mounts.clear()
