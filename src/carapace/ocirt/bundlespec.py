"""What the OCI runtime CLI makes of an engine's bundle (pure functions).

An engine (Docker through containerd's runc shim, Podman through conmon) hands the
runtime a bundle whose spec describes a container on the host: namespaces by host
path, hooks run on the host, a rootfs anywhere. The pod's sandbox service takes a
bundle as containerd's shims do; ``service_spec`` rewrites the engine's spec into it:

- ``root.path`` is ``rootfs`` (the service binds the engine's rootfs there);
- hooks are run by the CLI on the host (``HOST_HOOKS``), never by the service or the
  guest; the ones that would run inside the container's namespaces, which live in the
  guest, are refused (``check_hooks``);
- the pod's network namespace is the one the container's host process holds
  (``/proc/<pid>/ns/net``): the interfaces an engine puts there are the VM's;
- a Podman pod member (CRI-O's annotations) is marked with CRI's, so the service
  joins it to its pod's VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from carapace.errors import InvalidArgument
from carapace.oci import Spec
from carapace.protocols import contract

#: CRI-O's spelling of a pod member, which Podman uses for the containers of a pod.
CRIO_CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX_ID = "io.kubernetes.cri-o.SandboxID"
#: Hooks the CLI runs on the host, and when: create (prestart, createRuntime), after
#: start (poststart), after delete (poststop).
HOST_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")
#: Hooks OCI runs inside the container's namespaces: in a pod VM that is the guest,
#: where no host binary runs.
GUEST_HOOKS = ("createContainer", "startContainer")
#: Namespaces the container's host process stands in for on the host (the engines read
#: them from /proc/<pid>/ns/: Docker's network setup, Podman's pod members).
HOLDER_NAMESPACES = {"network": "net", "ipc": "ipc", "uts": "uts"}
STATUSES = ("creating", "created", "running", "paused", "stopped")


def pod_of(spec: Spec, cid: str) -> tuple[str, bool]:
    """(the pod the container belongs to, whether it joins a pod other than its own).

    A Podman pod member names its infra container by CRI-O's annotations; CRI's and
    dockershim's are understood too (``Spec.pod_id``). Anything else is its own pod."""
    a = spec.annotations
    if a.get(CRIO_CONTAINER_TYPE) == "container" and a.get(CRIO_SANDBOX_ID):
        pod = a[CRIO_SANDBOX_ID]
    else:
        pod = spec.pod_id(cid)
    return pod, pod != cid


def check_hooks(spec_data: Mapping[str, Any], cid: str) -> dict[str, list[dict[str, Any]]]:
    """The spec's hooks by kind, checked; hooks that must run in the container's
    namespaces are refused, naming them."""
    hooks = spec_data.get("hooks") or {}
    if not isinstance(hooks, dict):
        raise InvalidArgument(f"container {cid}: hooks is {type(hooks).__name__}, not an object")
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, entries in hooks.items():
        if kind not in HOST_HOOKS + GUEST_HOOKS:
            raise InvalidArgument(
                f"container {cid}: unknown hook kind {str(kind)[:64]!r}; accepted: "
                f"{', '.join(HOST_HOOKS + GUEST_HOOKS)}"
            )
        if not isinstance(entries, list):
            raise InvalidArgument(f"container {cid}: hooks.{kind} is not a list")
        for i, hook in enumerate(entries):
            where = f"container {cid}: hooks.{kind}[{i}]"
            if not isinstance(hook, dict) or not isinstance(hook.get("path"), str):
                raise InvalidArgument(f"{where}: needs a path")
            if not hook["path"].startswith("/"):
                raise InvalidArgument(f"{where}: path {hook['path'][:64]!r} is not absolute")
            for key, kind_of in (("args", list), ("env", list), ("timeout", int)):
                if key in hook and not isinstance(hook[key], kind_of):
                    raise InvalidArgument(f"{where}.{key} is not a {kind_of.__name__}")
            if isinstance(hook.get("timeout"), int) and hook["timeout"] <= 0:
                raise InvalidArgument(f"{where}.timeout {hook['timeout']} must be positive")
        if entries and kind in GUEST_HOOKS:
            raise InvalidArgument(
                f"container {cid}: hooks.{kind} would run in the container's namespaces, "
                "which live in the pod's VM where no host program runs; accepted: "
                f"{', '.join(HOST_HOOKS)}"
            )
        if entries:
            out[kind] = entries
    return out


def holder_namespaces(spec: Spec) -> list[tuple[str, str]]:
    """(``/proc/PID/ns`` name, path to join or "" for a new one) for each namespace the
    container's host process takes: the spec's network, ipc and uts."""
    out = []
    for ns in spec.namespaces:
        name = HOLDER_NAMESPACES.get(ns.type)
        if name is not None:
            out.append((name, ns.path))
    return out


def service_spec(spec: Spec, cid: str, pod: str, holder_pid: int) -> dict[str, Any]:
    """The spec the pod's service gets for this container (see the module's doc)."""
    data = spec.to_dict()
    data.setdefault("root", {})["path"] = "rootfs"
    data.pop("hooks", None)
    annotations = dict(data.get("annotations") or {})
    if pod != cid:
        annotations[contract.CRI_CONTAINER_TYPE] = "container"
        annotations[contract.CRI_SANDBOX_ID] = pod
    data["annotations"] = annotations
    linux = data.setdefault("linux", {})
    namespaces = []
    for ns in linux.get("namespaces") or []:
        ns = dict(ns)
        if pod == cid and ns.get("type") == "network":
            ns["path"] = f"/proc/{holder_pid}/ns/net"  # the pod's: its interfaces
        elif pod == cid and ns.get("type") in HOLDER_NAMESPACES:
            ns.pop("path", None)  # the guest makes its own
        namespaces.append(ns)
    linux["namespaces"] = namespaces
    return data


def hook_state(
    cid: str, status: str, pid: int, bundle: str, annotations: Mapping[str, str]
) -> dict[str, Any]:
    """The state hooks get on stdin (OCI runtime spec, "State")."""
    return {
        "ociVersion": contract.OCI_VERSION,
        "id": cid,
        "status": status,
        "pid": pid,
        "bundle": bundle,
        "annotations": dict(annotations),
    }


def runc_state(
    cid: str,
    status: str,
    pid: int,
    bundle: str,
    rootfs: str,
    created: str,
    annotations: Mapping[str, str],
    owner: str = "",
) -> dict[str, Any]:
    """``state``'s document, as runc prints it (pid 0 once stopped)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r}; accepted: {', '.join(STATUSES)}")
    return {
        "ociVersion": contract.OCI_VERSION,
        "id": cid,
        "pid": 0 if status == "stopped" else pid,
        "status": status,
        "bundle": bundle,
        "rootfs": rootfs,
        "created": created,
        "annotations": dict(annotations),
        "owner": owner,
    }
