"""Turning the OCI spec the host sends into one crun runs inside the guest (pure), and
what the guest does after crun so that the container is as runc would make it.

crun 1.8 applies the spec as runc does but for one thing (seen by
tests/integration/test_spec_parity.py): a readonlyPaths entry becomes a read-only bind
that drops the nosuid/nodev/noexec of the mount it lies on (runc keeps them: e.g.
/proc/sys of a nosuid,nodev,noexec /proc). ``readonly_remounts`` finds those binds in
the container's mount table and ``keep_readonly_path_flags`` puts the flags back before
the container starts.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from typing import Any

from carapace import linux
from carapace.guest.cgroup import cgroups_path
from carapace.guest.reaper import Reaper
from carapace.protocols.contract import GUEST_NS_PREFIX, GUEST_STATE_DIR

#: crun 1.8 rejects specs whose ociVersion is 1.2.0 or newer; this is what it accepts.
GUEST_OCI_VERSION = "1.0.2"
#: Mount types that make sense inside the guest without a host path.
GUEST_MOUNT_TYPES = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}
#: Namespaces the containers share with the VM (the pod's network lives in the VM):
#: the container joins the agent's (PID 1's), so crun applies the spec's net.*
#: sysctls there (it refuses them for a container without a network namespace of its
#: own or named by path), as runc applies them in the container's network namespace.
SHARED_NAMESPACES = {"network": "/proc/1/ns/net"}
#: How the host names a namespace of a guest process (the pod's sandbox container's,
#: for containers that share it): ``GUEST_NS_PREFIX`` + ``/proc/<pid>/ns/<type>``. Any
#: other path is the host's and means nothing in the guest: that entry is dropped.
GUEST_NS_PATH = re.compile(r"^/proc/[0-9]+/ns/[a-z]+$")
#: MS_NODIRATIME (carapace.linux has the flags it uses itself).
MS_NODIRATIME = 2048
#: Bind sources that exist in the guest.
GUEST_BIND_SOURCES = (f"{GUEST_STATE_DIR}/", "/dev/")


class GuestSpecError(ValueError):
    """A spec the guest cannot run as given (the host should have made it fit)."""


def guest_spec(spec: dict[str, Any], container_id: str, rootfs: str) -> dict[str, Any]:
    """The config.json for crun: rootfs path, cgroup path and namespaces for the guest,
    host-only parts (hooks) removed. A mount the guest cannot make (a host path the
    host did not share) raises GuestSpecError naming it: a mount is never dropped."""
    out = copy.deepcopy(spec)
    out["ociVersion"] = GUEST_OCI_VERSION
    root = out.setdefault("root", {})
    root["path"] = rootfs
    out.pop("hooks", None)
    linux = out.setdefault("linux", {})
    linux["cgroupsPath"] = cgroups_path(container_id)
    namespaces = [
        ns
        for ns in map(_guest_namespace, linux.get("namespaces", []))
        if ns is not None and ns["type"] not in SHARED_NAMESPACES
    ]
    # the VM's: whatever the spec says (a spec without one shares its host's)
    namespaces += [{"type": t, "path": p} for t, p in SHARED_NAMESPACES.items()]
    linux["namespaces"] = namespaces
    # the guest is cgroup v2: as on a v2 host, a container sees its own cgroup as the
    # root of /sys/fs/cgroup, not its neighbours'
    if not any(ns.get("type") == "cgroup" for ns in linux["namespaces"]):
        linux["namespaces"].append({"type": "cgroup"})
    for m in out.get("mounts", []):
        if not is_guest_mount(m):
            raise GuestSpecError(
                f"mount at {m.get('destination')} (source {m.get('source')}, type "
                f"{m.get('type')}) is not in the guest; accepted: "
                f"{', '.join(sorted(GUEST_MOUNT_TYPES))} and binds of "
                f"{', '.join(GUEST_BIND_SOURCES)}"
            )
    out.setdefault("mounts", [])
    for i, dev in enumerate(linux.get("devices") or []):
        check_device(i, dev)
    return out


#: Character device majors whose numbers the kernel fixes (Documentation/admin-guide/
#: devices.txt), so a node means the same device in the guest as on the host: memory
#: devices (null, zero, full, random, urandom, kmsg), ttys, misc (fuse, tun, ...), ptys.
GUEST_CHAR_MAJORS = frozenset({1, 4, 5, 10, *range(136, 144)})


def check_device(index: int, dev: object) -> None:
    """Raise GuestSpecError unless linux.devices[index] names a device the guest has
    under the same numbers: a host's disk or a driver's dynamic major is not in the
    VM (a node for it would be another device, or none), and is refused, not dropped."""
    if not isinstance(dev, dict):
        raise GuestSpecError(f"linux.devices[{index}] is {dev!r}; accepted: a device object")
    kind, major = dev.get("type"), dev.get("major")
    if kind == "p" or (kind in ("c", "u") and major in GUEST_CHAR_MAJORS):
        return
    raise GuestSpecError(
        f"linux.devices[{index}] {dev.get('path')} ({kind} {major}:{dev.get('minor')}) is "
        "a host device, which a pod VM does not have; accepted: fifos (p) and character "
        "devices of the kernel's fixed numbering (majors 1 mem, 4 and 5 tty, 10 misc, "
        "136-143 pts)"
    )


def _guest_namespace(ns: dict[str, Any]) -> dict[str, Any] | None:
    if ns.get("type") in SHARED_NAMESPACES:
        return None
    path = str(ns.get("path") or "")
    if not path:
        return ns
    guest_path = path.removeprefix(GUEST_NS_PREFIX)
    if guest_path != path and GUEST_NS_PATH.match(guest_path):
        return {**ns, "path": guest_path}
    return None


def is_guest_mount(mount: dict[str, Any]) -> bool:
    """Whether a spec mount can be made inside the guest: a pseudo filesystem, or a
    bind of something the agent placed in the guest (the shared dir, devices)."""
    mtype = mount.get("type") or "bind"
    if mtype == "bind" or "bind" in mount.get("options", []) or "rbind" in mount.get("options", []):
        return str(mount.get("source", "")).startswith(GUEST_BIND_SOURCES)
    return mtype in GUEST_MOUNT_TYPES


#: Per-mount options runc carries over to a read-only path's bind (it reads them with
#: statfs(2) from the mount the path lies on), and their mount(2) flags.
KEPT_MOUNT_FLAGS = {
    "nosuid": linux.MS_NOSUID,
    "nodev": linux.MS_NODEV,
    "noexec": linux.MS_NOEXEC,
    "noatime": linux.MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": linux.MS_RELATIME,
}


def readonly_remounts(mountinfo: str, readonly_paths: Sequence[str]) -> list[tuple[str, int]]:
    """The remounts (path, mount flags) that give each read-only path's bind the
    nosuid/nodev/noexec/atime options of the mount beneath it, as runc does; only for
    a bind that lacks one of them. ``mountinfo``: the container's mount table (paths
    relative to its root); a path with no mount of its own (crun skips a missing one)
    is left alone."""
    by_id: dict[str, tuple[str, set[str]]] = {}
    top: dict[str, tuple[str, set[str]]] = {}  # mount point -> (parent id, options)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        mount_id, parent, point, options = (
            fields[0],
            fields[1],
            fields[4],
            set(fields[5].split(",")),
        )
        point = linux.unescape_mountinfo(point)
        by_id[mount_id] = (point, options)
        top[point] = (parent, options)
    out = []
    for path in readonly_paths:
        path = "/" + path.strip("/")
        if path not in top or top[path][0] not in by_id:
            continue
        parent, options = top[path]
        wanted = {"ro"} | (by_id[parent][1] & KEPT_MOUNT_FLAGS.keys())
        if wanted <= options:
            continue
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
        for name in wanted - {"ro"}:
            flags |= KEPT_MOUNT_FLAGS[name]
        out.append((path, flags))
    return out


async def keep_readonly_path_flags(reaper: Reaper, pid: int, readonly_paths: Sequence[str]) -> None:
    """Remount the read-only paths of the created container ``pid`` (waiting for its
    start) with the options of the mounts they lie on (``readonly_remounts``), from a
    child in the container's mount namespace and root. Raises GuestSpecError naming
    linux.readonlyPaths if that fails: the container is never left unlike runc's."""
    with open(f"/proc/{pid}/mountinfo") as f:
        remounts = readonly_remounts(f.read(), readonly_paths)
    if not remounts:
        return
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only makes system calls, then exits
        status = 0
        try:
            os.close(r)
            root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
            linux.setns_path(f"/proc/{pid}/ns/mnt", linux.CLONE_NEWNS)
            os.fchdir(root)
            os.chroot(".")
            for path, flags in remounts:
                linux.mount("", path, None, flags)
        except BaseException as e:
            os.write(w, str(e).encode(errors="replace")[:1000])
            status = 1
        os._exit(status)
    os.close(w)
    try:
        status = await reaper.wait(child)
        with os.fdopen(r, "rb") as f:
            error = f.read().decode(errors="replace")
    except BaseException:
        os.close(r)
        raise
    if status != 0:
        raise GuestSpecError(
            f"linux.readonlyPaths: cannot keep the mount options of "
            f"{', '.join(p for p, _ in remounts)} as runc does: {error or f'status {status}'}"
        )
