"""The pod's share: the host directory the VM sees through its shared filesystem
(virtio-fs or 9p) at ``contract.GUEST_SHARED_DIR``, and what is bound into it for each
container: its rootfs (``<run dir>/shared/<container>/rootfs``) and its bind volumes
(``.../volumes/<n>``, as ``storage.volumes`` planned them).

Every mount is recorded in the sandbox's state before it is made, so a dead owner's
mounts are found and released (``state.release``). Every bind is nodev and nosuid,
read-only where asked (the bind for ``ro``, every mount below it too for ``rro``),
private or, for ``rslave``, a slave of the source's mount; a source is opened once without
following symlinks and bound through its file descriptor, so what was checked is what
is bound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from carapace import linux
from carapace.errors import InvalidArgument, NotFound
from carapace.oci.bundle import Mount
from carapace.protocols import agent_pb2 as pb
from carapace.protocols import contract
from carapace.storage.volumes import (
    Ephemeral,
    SourceFacts,
    guest_mounts,
    plan_mounts,
    probe_source,
)

log = logging.getLogger("carapace.storage")


def remove_unmounted(path: Path) -> bool:
    """Remove the tree at ``path`` unless a mount is left in it (removing through a
    bind would delete the host's files); returns whether it is gone."""
    if linux.mounts_under(str(path)):
        log.warning("%s: a mount is left in it; not removed", path)
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def shared_storage(shared_fs: str) -> list[pb.Storage]:
    """What the agent mounts at start: the pod's shared directory."""
    if shared_fs == contract.SHARED_FS_VIRTIOFS:
        return [
            pb.Storage(
                driver="virtiofs",
                source=contract.SHARE_TAG,
                fstype="virtiofs",
                mount_point=contract.GUEST_SHARED_DIR,
            )
        ]
    return [
        pb.Storage(
            driver="9p",
            source=contract.SHARE_TAG,
            fstype="9p",
            mount_point=contract.GUEST_SHARED_DIR,
            options=["trans=virtio", "version=9p2000.L", "cache=mmap", "msize=262144"],
        )
    ]


def ephemeral_storage(eph: Ephemeral) -> pb.Storage:
    """A memory-backed volume the guest makes (once per pod) as a tmpfs."""
    options = [f"mode={eph.mode:o}", "nodev", "nosuid"]
    if eph.size_bytes:
        options.append(f"size={eph.size_bytes}")
    return pb.Storage(
        driver=contract.EPHEMERAL_DRIVER,
        source="tmpfs",
        fstype="tmpfs",
        mount_point=eph.guest_path,
        options=options,
    )


class MountRecord(Protocol):
    """Where the share writes down its mounts and containers before it makes them (a
    sandbox's ``state.json``: ``sandbox.state.SandboxRecord``)."""

    mounts: list[str]
    containers: list[str]

    def save(self) -> None: ...


class Mounts(Protocol):
    """The host mount calls sharing makes (``carapace.linux`` on a real host)."""

    def bind_mount(
        self,
        source: str,
        target: str,
        readonly: bool = False,
        recursive: bool = True,
        readonly_below: bool = True,
        propagation: int = 0,
    ) -> None: ...

    def make_shared(self, target: str) -> None: ...

    def make_slave(self, target: str) -> None: ...

    def umount(self, target: str, lazy: bool = False) -> None: ...

    def is_mountpoint(self, path: str) -> bool: ...


class HostMounts:
    """The real host's mount calls."""

    def bind_mount(
        self,
        source: str,
        target: str,
        readonly: bool = False,
        recursive: bool = True,
        readonly_below: bool = True,
        propagation: int = 0,
    ) -> None:
        linux.bind_mount(source, target, readonly, recursive, readonly_below, propagation)

    def make_shared(self, target: str) -> None:
        linux.make_shared(target)

    def make_slave(self, target: str) -> None:
        linux.make_slave(target)

    def umount(self, target: str, lazy: bool = False) -> None:
        linux.umount(target, lazy=lazy)

    def is_mountpoint(self, path: str) -> bool:
        return linux.is_mountpoint(path)


@dataclass
class PodShare:
    """The pod's share and the binds in it.

    Two views of one directory tree: ``source_dir`` (``<run dir>/mounts``), where the
    host makes directories and binds, and ``shared_dir`` (``<run dir>/shared``), what
    the VM sees: a read-only slave bind of ``source_dir``. Binds made in the source
    propagate to the view (and to a file daemon's copy of it) with their attributes,
    so the guest can write only inside a rootfs or volume that is read-write, and can
    never rename, replace or plant anything in the tree the host walks."""

    shared_dir: Path
    record: MountRecord
    mounts: Mounts = field(default_factory=HostMounts)
    #: Directories no volume may be in or hold (carapace's run and state dirs).
    own_dirs: tuple[str, ...] = ()
    #: container id -> the host mount points made for it
    _made: dict[str, list[str]] = field(default_factory=dict)

    @property
    def source_dir(self) -> Path:
        return self.shared_dir.with_name("mounts")

    def create(self) -> None:
        """Make the two views: the source a shared mount of its own (nodev, nosuid),
        the VM's view a read-only slave bind of it."""
        source, view = str(self.source_dir), str(self.shared_dir)
        self.source_dir.mkdir(mode=0o755)
        self.shared_dir.mkdir(mode=0o755)
        self._record_mount(source)
        self.mounts.bind_mount(source, source, recursive=False)
        self.mounts.make_shared(source)
        self._record_mount(view)
        self.mounts.bind_mount(source, view, readonly=True, recursive=False)
        self.mounts.make_slave(view)

    def close(self) -> None:
        """Undo ``create``'s mounts (the containers' binds are gone by now;
        ``state.release`` unmounts whatever a failure left)."""
        for me in (str(self.shared_dir), str(self.source_dir)):
            if me in self.record.mounts:
                with contextlib.suppress(OSError):
                    if self.mounts.is_mountpoint(me):
                        self.mounts.umount(me, lazy=True)
                self.record.mounts.remove(me)

    def _record_mount(self, target: str) -> None:
        self.record.mounts.append(target)
        self.record.save()

    def share(self, container_id: str, rootfs: Path, readonly: bool) -> str:
        """Bind ``rootfs`` into the share; returns where the guest sees it."""
        if not rootfs.is_dir():
            raise NotFound(f"rootfs {rootfs} is not a directory")
        target = self.source_dir / container_id / "rootfs"
        made = self._made.setdefault(container_id, [])
        target.mkdir(parents=True)
        self.record.containers.append(container_id)
        self._record_mount(str(target))
        made.append(str(target))
        self.mounts.bind_mount(str(rootfs), str(target), readonly=readonly)
        return contract.guest_rootfs_path(container_id)

    def share_volumes(
        self,
        container_id: str,
        mounts: tuple[Mount, ...],
        probe: Callable[[str], SourceFacts] = probe_source,
    ) -> tuple[tuple[Mount, ...], list[pb.Storage]]:
        """Plan the spec's mounts (``volumes.plan_mounts``; raises InvalidArgument before
        anything is made), bind each shared one into the container's part of the share;
        returns the mounts as the guest makes them and the memory-backed volumes the
        guest makes first. On failure, what was made for the container stays recorded
        for ``unshare``."""
        plan = plan_mounts(mounts, probe, self.own_dirs)
        made = self._made.setdefault(container_id, [])
        container_dir = self.source_dir / container_id
        for b in plan.binds:
            target = Path(b.host_target(str(container_dir)))
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(b.source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode) != b.is_dir:
                    raise InvalidArgument(f"volume source {b.source} changed while it was shared")
                if b.is_dir:
                    target.mkdir(mode=0o755)
                else:
                    target.touch(mode=0o644)
                self._record_mount(str(target))
                made.append(str(target))
                self.mounts.bind_mount(
                    f"/proc/self/fd/{fd}",
                    str(target),
                    readonly=b.readonly,
                    recursive=b.recursive,
                    readonly_below=b.readonly_below,
                    propagation=linux.MS_SLAVE if b.follows_host else linux.MS_PRIVATE,
                )
            finally:
                os.close(fd)
        return guest_mounts(plan, container_id), [ephemeral_storage(e) for e in plan.ephemeral]

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
        remove_unmounted(self.source_dir / container_id)
        if save:
            with contextlib.suppress(OSError):
                self.record.save()
