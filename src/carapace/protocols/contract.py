"""The contract constants shared by the host and the guest: one home for each.

Stdlib only (it is shipped into the guest, see ``SHIPPED``). A name that two sides must
spell the same way lives here and nowhere else; everything else imports it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# -- identifiers ---------------------------------------------------------------------

#: What a sandbox, container or exec id may be: containerd's identifiers are at most 76
#: characters; so are ours. Match it whole (``fullmatch``: with ``match``, ``$`` also
#: accepts a trailing newline).
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,75}", re.ASCII)

# -- the agent channel and API ------------------------------------------------------

#: The ttrpc service the guest agent serves.
AGENT_SERVICE = "carapace.agent.v1.Agent"
#: The virtio-serial port name of the agent channel (QEMU ``virtserialport name=``;
#: the guest finds the port under /sys/class/virtio-ports by it).
AGENT_PORT_NAME = "carapace.agent"

# -- the pod's shared filesystem ------------------------------------------------------

#: The mount tag of the pod's shared directory (9p ``mount_tag``, virtio-fs ``tag``).
SHARE_TAG = "carapace"
#: The shared filesystems a pod's share can go over (configuration ``shared_fs``).
SHARED_FS_VIRTIOFS = "virtio-fs"
SHARED_FS_9P = "virtio-9p"
SHARED_FS_KINDS = (SHARED_FS_VIRTIOFS, SHARED_FS_9P)
#: Where the agent mounts the pod's shared directory in the guest.
GUEST_SHARED_DIR = "/run/carapace/shared"
#: The agent's own state in the guest.
GUEST_STATE_DIR = "/run/carapace"


def guest_container_dir(container_id: str) -> str:
    """A container's part of the share in the guest."""
    return f"{GUEST_SHARED_DIR}/{container_id}"


def guest_rootfs_path(container_id: str) -> str:
    """Where a container's rootfs (shared by the host) is in the guest."""
    return f"{guest_container_dir(container_id)}/rootfs"


def guest_volume_path(container_id: str, index: int) -> str:
    """Where the ``index``-th bind volume of a container (shared by the host) is."""
    return f"{guest_container_dir(container_id)}/volumes/{index}"


#: Memory-backed volumes the guest makes itself (tmpfs), one per pod and key.
GUEST_EPHEMERAL_DIR = "/run/carapace/ephemeral"
#: The ``Storage.driver`` of such a volume (the agent mounts it once per pod and
#: unmounts it with the last container that uses it).
EPHEMERAL_DRIVER = "ephemeral"


def guest_ephemeral_path(key: str) -> str:
    return f"{GUEST_EPHEMERAL_DIR}/{key}"


# -- namespaces -------------------------------------------------------------------------

#: A namespace path in a spec handed to the agent that names a guest namespace (of the
#: pod's sandbox container): ``guest:/proc/<pid>/ns/<type>``.
GUEST_NS_PREFIX = "guest:"


def guest_namespace_path(guest_pid: int, kind: str) -> str:
    return f"{GUEST_NS_PREFIX}/proc/{guest_pid}/ns/{kind}"


# -- the VM process on the host -------------------------------------------------------

#: QEMU's ``-name`` of a pod VM is ``carapace-<sandbox id>``; `gc` and release find a
#: sandbox's QEMU by it in /proc/<pid>/cmdline.
VM_NAME_PREFIX = "carapace-"


def vm_name(sandbox_id: str) -> str:
    return f"{VM_NAME_PREFIX}{sandbox_id}"


#: What the agent says on the console once it serves its port (a pool waits for it).
AGENT_SERVING = f"serving on virtio port {AGENT_PORT_NAME}"

#: What the names of a VM pool's VMs begin with (``pool_vm_name``).
POOL_VM_NAME = "pool:"


def pool_vm_name(pool_pid: int, serial: int) -> str:
    """The name (``VMSpec.name``) of a pool's VM: with ':', which no sandbox id has
    (``ID_RE``), so no pod's VM name is ever a pool VM's."""
    return f"{POOL_VM_NAME}{pool_pid}:{serial}"


def is_pool_vm_name(name: str) -> bool:
    """Whether ``name`` is the ``vm_name`` of a pool's VM."""
    return re.fullmatch(rf"{VM_NAME_PREFIX}{POOL_VM_NAME}[0-9]+:[0-9]+", name) is not None


# -- host cgroups ---------------------------------------------------------------------

#: The kernel's default CFS period (µs): CPU amounts become quota/period with it.
CFS_PERIOD_US = 100_000
#: The child of a sandbox's host cgroup that holds its vCPU threads.
VCPU_CGROUP = "vcpus"
#: A sandbox's host cgroup is <pod cgroup>/<prefix><sandbox id>: carapace's own, or
#: Kata's for tools that look for that name.
SANDBOX_CGROUP_PREFIXES = ("carapace-sandbox-", "kata-sandbox-")

# -- annotations ------------------------------------------------------------------------

#: openEuler's (virtcontainers') sandbox annotations.
SANDBOX_CPU = "com.github.containers.virtcontainers.sandbox_cpu"
SANDBOX_MEM = "com.github.containers.virtcontainers.sandbox_mem"
BLKIO_CGROUP = "com.github.containers.virtcontainers.blkio_cgroup"
FILES_LIMIT = "com.github.containers.virtcontainers.files_limit"
#: Kata's hypervisor annotations.
KATA_VCPUS = "io.katacontainers.config.hypervisor.default_vcpus"
KATA_MEMORY = "io.katacontainers.config.hypervisor.default_memory"  # MiB, as in Kata
#: containerd CRI's pod sizing annotations (the sum of the pod's containers' limits).
CRI_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
CRI_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
CRI_CPU_SHARES = "io.kubernetes.cri.sandbox-cpu-shares"
CRI_MEMORY = "io.kubernetes.cri.sandbox-memory"
#: Pod grouping: containerd CRI, then dockershim (which openEuler's examples use).
#: The OCI runtime spec version carapace writes and reports.
OCI_VERSION = "1.0.2"

CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # "sandbox" or "container"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
DOCKER_CONTAINER_TYPE = "io.kubernetes.docker.type"  # "podsandbox" or "container"
DOCKER_SANDBOX_ID = "io.kubernetes.sandbox.id"


def pod_id_of(annotations: Mapping[str, str], container_id: str) -> str:
    """The pod (shim group) a container belongs to, by its spec's annotations: CRI's or
    dockershim's sandbox id, or the container itself when it is not part of a pod (or is
    dockershim's pod sandbox)."""
    if annotations.get(DOCKER_CONTAINER_TYPE) == "podsandbox":
        return container_id
    return annotations.get(CRI_SANDBOX_ID) or annotations.get(DOCKER_SANDBOX_ID) or container_id
