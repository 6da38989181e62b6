"""Turning the OCI spec the host sends into one crun runs inside the guest (pure)."""

from __future__ import annotations

import copy
import re
from typing import Any

from carapace.guest.cgroup import cgroups_path

#: crun 1.8 rejects specs whose ociVersion is 1.2.0 or newer; this is what it accepts.
GUEST_OCI_VERSION = "1.0.2"
#: Mount types that make sense inside the guest without a host path.
GUEST_MOUNT_TYPES = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}
#: Namespaces the containers share with the VM (the pod's network lives in the VM).
SHARED_NAMESPACES = {"network"}
#: A namespace path of a guest process (the host names the pod's sandbox container's
#: namespaces this way for containers that share them); other paths are the host's.
GUEST_NS_PATH = re.compile(r"^/proc/[0-9]+/ns/[a-z]+$")
#: Bind sources that exist in the guest.
GUEST_BIND_SOURCES = ("/run/carapace/", "/dev/")


def guest_spec(spec: dict[str, Any], container_id: str, rootfs: str) -> dict[str, Any]:
    """The config.json for crun: rootfs path, cgroup path and namespaces for the guest,
    host-only parts (hooks, host bind mounts) removed."""
    out = copy.deepcopy(spec)
    out["ociVersion"] = GUEST_OCI_VERSION
    root = out.setdefault("root", {})
    root["path"] = rootfs
    out.pop("hooks", None)
    linux = out.setdefault("linux", {})
    linux["cgroupsPath"] = cgroups_path(container_id)
    linux["namespaces"] = [
        ns
        for ns in linux.get("namespaces", [])
        if ns.get("type") not in SHARED_NAMESPACES
        and (not ns.get("path") or GUEST_NS_PATH.match(str(ns["path"])))
    ]
    out["mounts"] = [m for m in out.get("mounts", []) if is_guest_mount(m)]
    return out


def is_guest_mount(mount: dict[str, Any]) -> bool:
    """Whether a spec mount can be made inside the guest: a pseudo filesystem, or a
    bind of something the agent placed in the guest (the shared dir, devices)."""
    mtype = mount.get("type") or "bind"
    if mtype == "bind" or "bind" in mount.get("options", []) or "rbind" in mount.get("options", []):
        return str(mount.get("source", "")).startswith(GUEST_BIND_SOURCES)
    return mtype in GUEST_MOUNT_TYPES
