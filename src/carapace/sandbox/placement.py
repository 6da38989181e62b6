"""Where a sandbox sits in the host's cgroups (seed 001, SandboxCgroupOnly).

``sandbox_cgroup_only = true``: one cgroup, ``<pod>/carapace-sandbox-<id>``, for QEMU,
its threads and the owner (the shim); a fractional CPU amount caps the vCPU threads in
its ``vcpus`` child. ``false`` (legacy, cgroup v1 only): QEMU in ``carapace/<id>``, the
vCPU threads in the pod cgroup limited by the sum of the containers' limits, the owner
in the sandbox container's ``<pod>/carapace_<id>``. Every directory is recorded before
it is made; ``state.release`` removes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from carapace import resources
from carapace.errors import CarapaceError, HostError
from carapace.hostcgroup import CgroupDriver, CgroupHandle, CgroupStats, driver
from carapace.hostcgroup.cgroupspath import own_parents
from carapace.protocols.contract import VCPU_CGROUP
from carapace.sandbox.plan import SandboxPlan
from carapace.sandbox.state import SandboxRecord

log = logging.getLogger("carapace.sandbox")

HOST_CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")
#: The pod cgroup's controllers when it holds the vCPU threads (sandbox_cgroup_only =
#: false).
POD_CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory")


class SandboxCgroupPlacement:
    """The host cgroups of one sandbox: made, joined, limited, measured."""

    def __init__(
        self,
        plan: SandboxPlan,
        record: SandboxRecord,
        container_prefix: str,
        new_driver: Callable[[], CgroupDriver] = driver,
    ) -> None:
        self.plan = plan
        self.record = record
        self.container_prefix = container_prefix
        self.new_driver = new_driver
        self.cgroup: CgroupHandle | None = None
        #: sandbox_cgroup_only = false: the pod cgroup that holds the vCPU threads
        self.pod_cgroup: CgroupHandle | None = None
        self._owner_cgroup: CgroupHandle | None = None
        self._owner_origin: list[str] = []

    def make(self) -> None:
        """Make the cgroups (recording each first), join the owner, apply blkio."""
        drv = self.new_driver()
        plan = self.plan
        pod = plan.pod_cgroup_path
        if pod is not None and drv.version != "v1":
            raise HostError(
                "sandbox_cgroup_only = false places single vCPU threads in the pod "
                "cgroup, which needs cgroup v1; this host has cgroup v2"
            )
        path = plan.cgroup_path
        self.cgroup = drv.create(path, HOST_CGROUP_CONTROLLERS, own_parents(path))
        self.record.cgroup = self.cgroup.to_record()
        self.record.save()
        owner_cgroup = self.cgroup
        if pod is not None:
            self.pod_cgroup = drv.create(pod, POD_CGROUP_CONTROLLERS, own_parents(pod))
            self.record.more_cgroups.insert(0, self.pod_cgroup.to_record())
            self.record.save()
            if plan.join_owner:
                owner_cgroup = drv.create(
                    f"{pod}/{self.container_prefix}{plan.id}", HOST_CGROUP_CONTROLLERS
                )
                self.record.more_cgroups.insert(0, owner_cgroup.to_record())
                self.record.save()
        if plan.join_owner:
            self._owner_origin = owner_cgroup.origin(os.getpid())
            self._owner_cgroup = owner_cgroup
            owner_cgroup.join(os.getpid(), move_memory=True)
        if plan.blkio:
            result = self.cgroup.set_blkio(plan.blkio)
            for u in result.unapplied:
                log.warning(
                    "sandbox %s: %s %s=%d not applied: %s",
                    plan.id,
                    u.path or "(all devices)",
                    u.type,
                    u.value,
                    u.reason,
                )
            for w in result.warnings:
                log.warning("sandbox %s: %s", plan.id, w)

    def join_vm(self) -> Callable[[], None]:
        """What the VM process runs before exec to be in the sandbox cgroup."""
        if self.cgroup is None:
            raise HostError(f"sandbox {self.plan.id}: its host cgroup is not made yet")
        return self.cgroup.preexec_fn()

    def adopt_vm(self, pid: int) -> None:
        """Move a VM process started elsewhere (a pool's) into the sandbox cgroup, its
        memory charged here from now on."""
        if self.cgroup is None:
            raise HostError(f"sandbox {self.plan.id}: its host cgroup is not made yet")
        self.cgroup.join(pid, move_memory=True)

    def place_vcpus(self, threads: dict[int, int], pod_cpus: float) -> None:
        """Place the vCPU threads (again after hotplug). Legacy: all of them in the pod
        cgroup. Otherwise only for a fractional CPU amount, which caps their host CPU
        time: they move to the ``vcpus`` child, limited to ``pod_cpus`` (the pod's CPUs,
        never below the boot amount)."""
        if self.cgroup is None:
            return
        if self.pod_cgroup is not None:
            self.pod_cgroup.place_threads(threads.values())
            return
        cgroup = self.cgroup
        if VCPU_CGROUP not in cgroup.children:
            # recorded before it is made: whatever fails next (a vCPU thread that exited
            # before it could be moved: ESRCH), release removes it with the rest
            record = cgroup.to_record()
            record["created"] += [
                d for d in cgroup.thread_child_dirs(VCPU_CGROUP) if d not in record["created"]
            ]
            self.record.cgroup = record
            self.record.save()
        try:
            cgroup.add_threads(threads.values(), child=VCPU_CGROUP)
        finally:
            self.record.cgroup = cgroup.to_record()
            self.record.save()
        cap = None if pod_cpus >= len(threads) else pod_cpus
        self.cgroup.set_cpu_limit(cap, child=VCPU_CGROUP)
        log.info("sandbox %s: %d vCPU threads capped to %s CPUs", self.plan.id, len(threads), cap)

    @property
    def caps_vcpus(self) -> bool:
        """Whether the vCPU threads are placed apart (legacy, or a fractional amount)."""
        return self.pod_cgroup is not None or self.plan.size.cpu_cap is not None

    def apply_pod_limits(self, containers: Iterable[resources.ContainerResources]) -> None:
        """Legacy: the pod cgroup (the vCPU threads) is limited by the sum of the
        containers' CPU and memory limits."""
        if self.pod_cgroup is None:
            return
        cpus, memory = resources.pod_limits(containers)
        try:
            self.pod_cgroup.set_cpu_limit(cpus)
            self.pod_cgroup.set_memory_limit(memory)
        except CarapaceError as e:
            log.warning("sandbox %s: cannot limit the pod cgroup: %s", self.plan.id, e)

    def leave(self) -> None:
        """The owner goes back to where it was before it joined."""
        if self._owner_origin and self._owner_cgroup is not None:
            try:
                self._owner_cgroup.move_to(os.getpid(), self._owner_origin)
                self._owner_origin = []
            except CarapaceError as e:
                log.warning("sandbox %s: cannot leave its cgroup: %s", self.plan.id, e)

    def stats(self) -> CgroupStats:
        if self.cgroup is None:
            raise HostError(f"sandbox {self.plan.id} has no host cgroup")
        return self.cgroup.stats()
