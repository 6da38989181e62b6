"""Mounting what the host describes as ``Storage``: the pod's share (virtio-fs or
9p), and the pod's memory-backed volumes (tmpfs) under ``GUEST_EPHEMERAL_DIR``."""

from __future__ import annotations

import os
import time

from carapace import linux
from carapace.guest.sysinit import need_modules
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import GUEST_EPHEMERAL_DIR
from carapace.ttrpc import Code, TtrpcError

#: Storage options that are mount flags, not filesystem data.
MOUNT_FLAGS = {
    "ro": linux.MS_RDONLY,
    "nodev": linux.MS_NODEV,
    "nosuid": linux.MS_NOSUID,
    "noexec": linux.MS_NOEXEC,
}


def mount_ephemeral(st: pb.Storage) -> None:
    """Mount a pod's memory-backed volume (a tmpfs) at its place under
    ``GUEST_EPHEMERAL_DIR``."""
    if os.path.dirname(st.mount_point) != GUEST_EPHEMERAL_DIR or st.fstype != "tmpfs":
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"ephemeral storage must be a tmpfs in {GUEST_EPHEMERAL_DIR}, got "
            f"{st.fstype!r} at {st.mount_point!r}",
        )
    mount_storage(st)


#: The on-demand kernel module group (image/builder.ON_DEMAND_MODULES) a filesystem
#: type needs, loaded before the first mount of that type.
FSTYPE_MODULES = {"virtiofs": "virtiofs", "9p": "9p", "overlay": "overlay"}

#: Where the guest lists the virtio-fs devices its driver bound, and how long a mount
#: waits for one (a VM restored from a template gets its device hot-added just before).
VIRTIOFS_DEVICES = "/sys/bus/virtio/drivers/virtiofs"
VIRTIOFS_WAIT = 10.0


def wait_virtiofs_device(timeout: float = VIRTIOFS_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(n.startswith("virtio") for n in os.listdir(VIRTIOFS_DEVICES)):
                return
        except OSError:
            pass  # the driver is not loaded yet
        if time.monotonic() >= deadline:
            raise TtrpcError(
                Code.NOT_FOUND,
                f"no virtio-fs device appeared in {VIRTIOFS_DEVICES} within {timeout:g}s",
            )
        time.sleep(0.02)


def mount_storage(st: pb.Storage) -> None:
    """Mount a storage the host describes (the pod's shared directory, a volume)."""
    if not st.mount_point.startswith("/"):
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"storage mount point must be absolute, got {st.mount_point!r}",
        )
    fstype = st.fstype or st.driver
    flags = 0
    data = []
    for o in st.options:
        if o in MOUNT_FLAGS:
            flags |= MOUNT_FLAGS[o]
        elif o != "rw":
            data.append(o)
    try:
        if fstype in FSTYPE_MODULES:
            need_modules(FSTYPE_MODULES[fstype])
        elif st.source.startswith("/dev/vd"):
            need_modules("blk")
    except OSError as e:
        raise TtrpcError(Code.INTERNAL, f"cannot mount {fstype} at {st.mount_point}: {e}") from e
    if fstype == "virtiofs":
        wait_virtiofs_device()
    try:
        linux.mount(st.source, st.mount_point, fstype, flags, ",".join(data))
    except OSError as e:
        raise TtrpcError(Code.INTERNAL, str(e)) from e
