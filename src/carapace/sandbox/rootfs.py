"""Containers' root filesystems into the guest: a bind mount of each rootfs into the
pod's shared directory (``<run dir>/shared/<container>/rootfs``), which the VM sees
through its shared filesystem at ``contract.GUEST_SHARED_DIR``.

Every mount is recorded in the sandbox's state before it is made, so a dead owner's
mounts are found and released (``state.release``). Volumes go beside this, in
``carapace.storage``, when they come.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from carapace import linux
from carapace.errors import InvalidArgument, NotFound
from carapace.oci.bundle import Mount
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


#: The files an engine gives every container of a pod (CRI makes them per pod): copied
#: into the share, since the guest cannot see the host's path.
POD_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")
#: The most bytes such a file may have.
POD_FILE_MAX = 1 << 20


def read_pod_file(source: str, destination: str) -> bytes:
    """A pod file's bytes: a regular file, opened without following a symlink."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidArgument(
            f"mount of {source} at {destination}: cannot open it: {e.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > POD_FILE_MAX:
            raise InvalidArgument(
                f"mount of {source} at {destination}: accepted: a regular file of at most "
                f"{POD_FILE_MAX} bytes"
            )
        chunks = []
        while chunk := os.read(fd, POD_FILE_MAX):
            chunks.append(chunk)
        return b"".join(chunks)[:POD_FILE_MAX]
    finally:
        os.close(fd)


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

    def share_pod_files(self, container_id: str, mounts: tuple[Mount, ...]) -> tuple[Mount, ...]:
        """The spec's mounts with each pod file (``POD_FILES``, bound from the host)
        copied into the container's part of the share and bound from there in the
        guest, read-only as the spec asks."""
        out = []
        for m in mounts:
            if m.destination not in POD_FILES or not m.is_bind or not m.source.startswith("/"):
                out.append(m)
                continue
            data = read_pod_file(m.source, m.destination)
            name = m.destination.rsplit("/", 1)[1]
            files = self.shared_dir / container_id / "files"
            files.mkdir(mode=0o755, parents=True, exist_ok=True)
            (files / name).write_bytes(data)
            (files / name).chmod(0o644)
            guest = f"{contract.guest_container_dir(container_id)}/files/{name}"
            options = tuple(o for o in m.options if o not in ("bind", "rbind"))
            out.append(Mount(m.destination, "bind", guest, ("rbind", *options)))
        return tuple(out)

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
