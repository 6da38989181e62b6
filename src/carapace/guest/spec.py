"""Turning the OCI spec the host sends into one crun runs inside the guest (pure)."""

from __future__ import annotations

import copy
import re
from typing import Any

from carapace.guest.cgroup import cgroups_path
from carapace.protocols.contract import GUEST_NS_PREFIX, GUEST_STATE_DIR

#: crun 1.8 rejects specs whose ociVersion is 1.2.0 or newer; this is what it accepts.
GUEST_OCI_VERSION = "1.0.2"
#: Mount types that make sense inside the guest without a host path.
GUEST_MOUNT_TYPES = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}
#: Namespaces the containers share with the VM (the pod's network lives in the VM).
SHARED_NAMESPACES = {"network"}
#: How the host names a namespace of a guest process (the pod's sandbox container's,
#: for containers that share it): ``GUEST_NS_PREFIX`` + ``/proc/<pid>/ns/<type>``. Any
#: other path is the host's and means nothing in the guest: that entry is dropped.
GUEST_NS_PATH = re.compile(r"^/proc/[0-9]+/ns/[a-z]+$")
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
    linux["namespaces"] = [
        ns for ns in map(_guest_namespace, linux.get("namespaces", [])) if ns is not None
    ]
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
    return out


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
