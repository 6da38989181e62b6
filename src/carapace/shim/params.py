"""Pure parts of the shim contract: the pod namespaces a container joins, rootfs mount
options and containerd's ``Any`` type URLs. (The command line and the socket address
are ``carapace.shim.command``'s; which pod a container belongs to is the spec's:
``carapace.oci.Spec.pod_id``.)"""

from __future__ import annotations

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.message import DecodeError

from carapace import linux
from carapace.errors import InvalidArgument
from carapace.oci import Namespace, Spec
from carapace.protocols import contract
from carapace.protocols.containerd import runtimeoptions_pb2

#: The runtime type containerd resolves to the binary ``containerd-shim-carapace-v2``.
RUNTIME_TYPE = "io.containerd.carapace.v2"
#: containerd's task API, as the shim serves it.
TASK_SERVICE = "containerd.task.v2.Task"

#: containerd's type URLs for what travels in ``google.protobuf.Any``.
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
METRICS_URL = "io.containerd.cgroups.v1.Metrics"
RUNTIME_OPTIONS_URL = "runtimeoptions.v1.Options"

#: Namespaces a pod's containers may share with its sandbox container in the guest.
POD_SHARED_NAMESPACES = ("pid", "ipc", "uts")


def join_pod_namespaces(spec: Spec, sandbox_guest_pid: int) -> Spec:
    """Point the namespaces CRI asks a container to share with the pod (a path to the
    sandbox container's namespace on the host) at the sandbox container's namespaces in
    the guest (``contract.guest_namespace_path``, see ``carapace.guest.spec``). The
    pod's network namespace (CRI names it by the pod task's pid, which is the VM's on
    the host) is the VM's: the entry stays without its host path; other shared
    namespaces become new ones."""
    namespaces = []
    for ns in spec.namespaces:
        if ns.path:
            if ns.type in POD_SHARED_NAMESPACES and sandbox_guest_pid > 0:
                ns = Namespace(ns.type, contract.guest_namespace_path(sandbox_guest_pid, ns.type))
            else:
                ns = Namespace(ns.type)
        namespaces.append(ns)
    return spec.with_namespaces(tuple(namespaces))


_MOUNT_FLAGS: dict[str, tuple[bool, int]] = {
    # option: (clear?, flag)
    "ro": (False, linux.MS_RDONLY),
    "rw": (True, linux.MS_RDONLY),
    "nosuid": (False, linux.MS_NOSUID),
    "suid": (True, linux.MS_NOSUID),
    "nodev": (False, linux.MS_NODEV),
    "dev": (True, linux.MS_NODEV),
    "noexec": (False, linux.MS_NOEXEC),
    "exec": (True, linux.MS_NOEXEC),
    "bind": (False, linux.MS_BIND),
    "rbind": (False, linux.MS_BIND | linux.MS_REC),
    "remount": (False, linux.MS_REMOUNT),
    "noatime": (False, linux.MS_NOATIME),
    "relatime": (False, linux.MS_RELATIME),
    "strictatime": (False, linux.MS_STRICTATIME),
    "sync": (False, linux.MS_SYNCHRONOUS),
    "async": (True, linux.MS_SYNCHRONOUS),
}


def mount_options(options: list[str]) -> tuple[int, str]:
    """containerd mount options → (mount(2) flags, filesystem data string)."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt == "defaults":
            continue
        known = _MOUNT_FLAGS.get(opt)
        if known is None:
            data.append(opt)
        elif known[0]:
            flags &= ~known[1]
        else:
            flags |= known[1]
    return flags, ",".join(data)


def is_type(type_url: str, name: str) -> bool:
    """Whether an Any's type URL names ``name`` (bare, as containerd writes it, or
    after a ``host/`` prefix)."""
    return type_url == name or type_url.endswith("/" + name)


def config_path_of(options: AnyPb) -> str | None:
    """The configuration file named by containerd's runtime options
    (``runtimeoptions.v1.Options``), if these are such options and name one."""
    if not is_type(options.type_url, RUNTIME_OPTIONS_URL):
        return None
    opts = runtimeoptions_pb2.Options()
    try:
        opts.ParseFromString(options.value)
    except DecodeError as e:
        raise InvalidArgument(f"cannot parse the {options.type_url} runtime options: {e}") from e
    return opts.config_path or None


def strip_unix(address: str) -> str:
    return address.removeprefix("unix://")
