"""Containers' root filesystems into the guest: a bind mount of each rootfs into the
pod's shared directory (``<run dir>/shared/<container>/rootfs``), which the VM sees
through its shared filesystem at ``contract.GUEST_SHARED_DIR``.

Every mount is recorded in the sandbox's state before it is made, so a dead owner's
mounts are found and released (``state.release``). Volumes go beside this, in
``carapace.storage``, when they come.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from carapace import linux
from carapace.errors import NotFound
from carapace.protocols import agent_pb2 as pb
from carapace.protocols import contract
from carapace.sandbox.state import SandboxRecord


class Mounts(Protocol):
    """The host mount calls rootfs sharing makes (``carapace.linux`` on a real host)."""

    def bind_mount(self, source: str, target: str, readonly: bool = False) -> None: ...

    def umount(self, target: str, lazy: bool = False) -> None: ...

    def is_mountpoint(self, path: str) -> bool: ...


class HostMounts:
    """The real host's mount calls."""

    def bind_mount(self, source: str, target: str, readonly: bool = False) -> None:
        linux.bind_mount(source, target, readonly=readonly)

    def umount(self, target: str, lazy: bool = False) -> None:
        linux.umount(target, lazy=lazy)

    def is_mountpoint(self, path: str) -> bool:
        return linux.is_mountpoint(path)


def shared_storage() -> list[pb.Storage]:
    """What the agent mounts at start: the pod's shared directory (9p)."""
    return [
        pb.Storage(
            driver="9p",
            source=contract.SHARE_TAG,
            fstype="9p",
            mount_point=contract.GUEST_SHARED_DIR,
            options=["trans=virtio", "version=9p2000.L", "cache=mmap", "msize=262144"],
        )
    ]


@dataclass
class RootfsShare:
    """The pod's shared directory and the rootfs binds in it."""

    shared_dir: Path
    record: SandboxRecord
    mounts: Mounts = field(default_factory=HostMounts)
    #: container id -> the host mount points made for it
    _made: dict[str, list[str]] = field(default_factory=dict)

    def create(self) -> None:
        self.shared_dir.mkdir()

    def share(self, container_id: str, rootfs: Path, readonly: bool) -> str:
        """Bind ``rootfs`` into the share; returns where the guest sees it."""
        if not rootfs.is_dir():
            raise NotFound(f"rootfs {rootfs} is not a directory")
        target = self.shared_dir / container_id / "rootfs"
        made = self._made.setdefault(container_id, [])
        target.mkdir(parents=True)
        self.record.mounts.append(str(target))
        self.record.containers.append(container_id)
        self.record.save()
        made.append(str(target))
        self.mounts.bind_mount(str(rootfs), str(target), readonly=readonly)
        return contract.guest_rootfs_path(container_id)

    def unshare(self, container_id: str, save: bool = True) -> None:
        """Unmount what was shared for the container and forget it."""
        for m in reversed(self._made.pop(container_id, [])):
            with contextlib.suppress(OSError):
                if self.mounts.is_mountpoint(m):
                    self.mounts.umount(m, lazy=True)
            if m in self.record.mounts:
                self.record.mounts.remove(m)
        if container_id in self.record.containers:
            self.record.containers.remove(container_id)
        shutil.rmtree(self.shared_dir / container_id, ignore_errors=True)
        if save:
            with contextlib.suppress(OSError):
                self.record.save()
