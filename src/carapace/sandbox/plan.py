"""The sandbox plan (pure): everything about a pod VM that is decided once, before
anything exists, from the configuration, the caller's options and the host's facts.

A bad option is refused here (``InvalidArgument`` naming it), so a sandbox that cannot
be made never leaves a run dir, a cgroup or a process behind.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import carapace.annotations as pod_annotations
from carapace import hostinfo, resources, sizing
from carapace.config import Config, HypervisorConfig
from carapace.errors import InvalidArgument, shown
from carapace.hostcgroup import (
    BlkioItem,
    ResolvedBlkioItem,
    parse_blkio_cgroup,
    resolve_devices,
)
from carapace.hostcgroup.cgroupspath import pod_cgroup_path, sandbox_cgroup_path
from carapace.hypervisor import Nic, PortForward, VMSpec, memory_headroom_mib
from carapace.oci.bundle import Mount, Spec
from carapace.protocols.contract import ID_RE, SHARED_FS_VIRTIOFS
from carapace.resources import ContainerResources
from carapace.sandbox.netplan import NetworkPlan, plan_network


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} {shown(value)} is not valid; accepted: 1-76 characters of letters, "
            "digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


@dataclass
class SandboxOptions:
    """What the caller asked for; checked by ``plan_sandbox`` before anything exists."""

    cpus: float | str | None = None
    memory: str | int | None = None  # docker-style size; None: the configured default
    sandbox_id: str | None = None
    hostname: str = "carapace"
    #: The pod's annotations when there is no ``sandbox_spec`` (the CLI, the Python API);
    #: with one, its annotations are the pod's.
    annotations: dict[str, str] = field(default_factory=dict)
    #: The pod's sandbox container's OCI spec: checked before anything is made (host
    #: namespaces, its resources); its annotations and files limit size the sandbox.
    sandbox_spec: Spec | None = None
    #: The hypervisor's open files limit asked for (``--files-limit``).
    files_limit: int | None = None
    #: The pod's network: None (the sandbox spec's namespace, else loopback only),
    #: "none", "user" or "netns:PATH" (see ``sandbox.netplan``).
    net: str | None = None
    #: Host ports forwarded into the guest (``--net user`` only).
    ports: tuple[PortForward, ...] = ()
    #: The owner process (the shim daemon serving the pod) joins the sandbox's host
    #: cgroup too, and leaves it for where it was before the cgroup is removed.
    join_owner: bool = False
    #: Bind mounts every container ``Sandbox.run`` makes from a command gets (the
    #: CLI's ``-v``, the Python API's ``volumes=``).
    volumes: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class HostFacts:
    """What the plan needs to know of the host (``probe`` reads the real one)."""

    usable_cpus: int
    memory_total: int  # bytes
    file_max: int
    nofile_cap: int
    is_host_namespace: Callable[[str, str], bool] = lambda kind, path: False

    @classmethod
    def probe(cls) -> HostFacts:
        return cls(
            usable_cpus=hostinfo.usable_cpus(),
            memory_total=hostinfo.memory_total(),
            file_max=hostinfo.file_max(),
            nofile_cap=hostinfo.nofile_cap(),
            is_host_namespace=hostinfo.is_host_namespace,
        )


@dataclass(frozen=True)
class SandboxPlan:
    """A pod VM as decided: its size and headroom, host cgroup paths, limits."""

    id: str
    hostname: str
    annotations: Mapping[str, str]
    run_dir: Path
    size: resources.SandboxSize
    #: CPU and memory hotplug: the VM can grow to ``max_vcpus`` / ``max_memory_mib``.
    hotplug: bool
    max_vcpus: int
    #: The boot memory and whole memory blocks of headroom (what the VM can reach).
    max_memory_mib: int
    files_limit: int | None
    blkio: tuple[ResolvedBlkioItem, ...]
    #: The sandbox's host cgroup, and (legacy mode) the pod cgroup for the vCPU threads.
    cgroup_path: str
    pod_cgroup_path: str | None
    #: The sandbox container's own resources (part of the pod's).
    sandbox_resources: ContainerResources
    join_owner: bool
    network: NetworkPlan = field(default_factory=NetworkPlan)
    #: How the share reaches the guest ("virtio-fs" or "virtio-9p").
    shared_fs: str = SHARED_FS_VIRTIOFS
    #: See ``SandboxOptions.volumes``.
    volumes: tuple[Mount, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def vcpus(self) -> int:
        """vCPUs to boot."""
        return self.size.vcpus

    @property
    def memory_mib(self) -> int:
        """Memory to boot with."""
        return self.size.memory_mib

    def check_fit(
        self,
        container_id: str,
        res: ContainerResources,
        others: Iterable[ContainerResources],
        current: tuple[int, int],
    ) -> tuple[int, int]:
        """Check a container's resources against the VM (whose ``current`` size is
        (vCPUs, MiB)); returns the vCPUs and MiB the VM must have for the pod with it
        (its current size without hotplug)."""
        vcpus_now, memory_now = current
        if not self.hotplug:
            resources.check_container(
                res,
                container_id,
                vm_vcpus=vcpus_now,
                vm_memory=memory_now * sizing.MiB,
                hotplug=False,
            )
            return vcpus_now, memory_now
        pod = [*others, res]
        vcpus = resources.pod_vcpus(self.size.vcpus, pod)
        if vcpus > self.max_vcpus:
            raise InvalidArgument(
                f"container {container_id}: the pod's containers need {vcpus} vCPUs "
                f"(--cpus {res.cpus or 0:g} for this one); the pod VM can grow to at most "
                f"{self.max_vcpus} (default_maxvcpus, the host's usable CPUs)"
            )
        limit = self.max_memory_mib * sizing.MiB
        resources.check_container(res, container_id, vm_vcpus=vcpus, vm_memory=limit, hotplug=True)
        memory = resources.pod_memory(self.size.memory, memory_now * sizing.MiB, pod)
        if memory > limit:
            raise InvalidArgument(
                f"container {container_id}: the pod's containers need "
                f"{sizing.format_size(memory)} of memory; the pod VM can grow to at most "
                f"{sizing.format_size(limit)} (default_maxmemory)"
            )
        return vcpus, memory // sizing.MiB


def size_cap(hv: HypervisorConfig, host: HostFacts) -> resources.SizeCap:
    """The most a pod VM may have on this host: ``default_maxvcpus`` and
    ``default_maxmemory`` when set, never more than the host's usable CPUs and memory
    (nor 256G); by default the host's."""
    cpus, cpus_why = host.usable_cpus, "the host's usable CPUs"
    if 0 < hv.default_maxvcpus < cpus:
        cpus, cpus_why = hv.default_maxvcpus, "configuration default_maxvcpus"
    memory = min(host.memory_total // sizing.MiB * sizing.MiB, resources.MAX_MEMORY)
    memory_why = "the host's memory" if memory < resources.MAX_MEMORY else "the largest VM"
    if 0 < hv.default_maxmemory * sizing.MiB < memory:
        memory, memory_why = hv.default_maxmemory * sizing.MiB, "configuration default_maxmemory"
    return resources.SizeCap(cpus, memory, cpus_why, memory_why)


def plan_sandbox(
    config: Config,
    options: SandboxOptions,
    host: HostFacts,
    resolve_blkio: Callable[[list[BlkioItem]], list[ResolvedBlkioItem]] = resolve_devices,
) -> SandboxPlan:
    """Decide the sandbox; raises InvalidArgument for anything that cannot be."""
    hv, rt = config.hypervisor, config.runtime
    sandbox_id = check_id(options.sandbox_id or secrets.token_hex(6), "sandbox id")
    spec = options.sandbox_spec
    annotations = dict(spec.annotations if spec is not None else options.annotations)
    # only the annotations the configuration enables are honoured; any other is refused
    pod_annotations.check_enabled(annotations, hv.enable_annotations, f"sandbox {sandbox_id}")
    cap = size_cap(hv, host)
    size = resources.sandbox_size(
        annotations,
        default_cpus=hv.default_vcpus,
        default_memory_mib=hv.default_memory,
        cap=cap,
        cpus=options.cpus,
        memory=options.memory,
    )
    sandbox_resources = ContainerResources()
    if spec is not None:
        resources.check_namespaces(spec.namespaces, sandbox_id, host.is_host_namespace)
        sandbox_resources = resources.container_resources(spec.resources, sandbox_id)
    max_vcpus, max_memory_mib = size.vcpus, size.memory_mib
    if hv.enable_cpu_memory_hotplug:
        # up to the cap: by default the host's CPUs and memory, at most the largest VM
        max_vcpus = max(size.vcpus, cap.cpus)
        wanted = max(size.memory_mib, cap.memory // sizing.MiB)
        max_memory_mib = size.memory_mib + memory_headroom_mib(size.memory_mib, wanted)
    warnings: list[str] = []
    asked = options.files_limit
    if asked is None and spec is not None:
        asked = spec.files_limit
    files_limit, warning = resources.files_limit(
        resources.files_limit_value(asked, annotations), host.file_max, host.nofile_cap
    )
    if warning:
        warnings.append(warning)
    blkio: tuple[ResolvedBlkioItem, ...] = ()
    if resources.BLKIO_CGROUP in annotations:
        raw = annotations[resources.BLKIO_CGROUP]
        if not isinstance(raw, str):
            raise InvalidArgument(
                f"annotation {resources.BLKIO_CGROUP}: {shown(raw)}; accepted: a string "
                "holding openEuler's BlkioCgroup JSON"
            )
        items = parse_blkio_cgroup(raw)
        blkio = tuple(resolve_blkio(items))
    # where the host cgroups go (worked out here, so a bad cgroupsPath is refused before
    # anything exists): the pod cgroup is the parent of the sandbox container's; legacy
    # mode puts QEMU in carapace/<id>
    cgroups_path = spec.cgroups_path if spec is not None else ""
    cgroup_path = sandbox_cgroup_path(
        cgroups_path if rt.sandbox_cgroup_only else None, sandbox_id, rt.sandbox_cgroup_prefix
    )
    pod_path = None if rt.sandbox_cgroup_only else pod_cgroup_path(cgroups_path, sandbox_id)
    network = plan_network(options.net, options.ports, spec)
    if network.mode == "netns" and host.is_host_namespace("network", network.netns):
        raise InvalidArgument(
            f"sandbox {sandbox_id}: network namespace {network.netns} is the host's own "
            "(--net host); a pod VM has its own kernel and cannot share the host's network; "
            "accepted: a pod network namespace (netns:PATH), user or none"
        )
    plan = SandboxPlan(
        id=sandbox_id,
        hostname=options.hostname,
        annotations=annotations,
        run_dir=Path(rt.run_dir) / sandbox_id,
        size=size,
        hotplug=hv.enable_cpu_memory_hotplug,
        max_vcpus=max_vcpus,
        max_memory_mib=max_memory_mib,
        files_limit=files_limit,
        blkio=blkio,
        cgroup_path=cgroup_path,
        pod_cgroup_path=pod_path,
        sandbox_resources=sandbox_resources,
        join_owner=options.join_owner,
        network=network,
        shared_fs=hv.shared_fs,
        volumes=options.volumes,
        warnings=tuple(warnings),
    )
    if spec is not None:
        plan.check_fit(sandbox_id, sandbox_resources, [], (plan.vcpus, plan.memory_mib))
    return plan


#: Free PCIe slots a pod VM boots with, for interfaces added while it runs.
NIC_SLOTS = 2


def vm_spec(
    plan: SandboxPlan,
    hv: HypervisorConfig,
    shared_dir: Path,
    kernel: Path,
    initrd: Path,
    accel: str,
    nics: tuple[Nic, ...],
) -> VMSpec:
    """The VM of the pod ``plan`` as it would boot."""
    return VMSpec(
        name=plan.id,
        run_dir=plan.run_dir,
        kernel=kernel,
        initrd=initrd,
        vcpus=plan.vcpus,
        memory_mib=plan.memory_mib,
        accel=accel,
        shared_dir=shared_dir,
        kernel_params=hv.kernel_params,
        max_vcpus=plan.max_vcpus,
        max_memory_mib=plan.max_memory_mib,
        nics=nics,
        nic_slots=NIC_SLOTS,
        shared_fs=plan.shared_fs,
        tcg_tb_size_mib=hv.tcg_tb_size_mib,
        free_page_reporting=hv.reclaim_guest_freed_memory,
    )
