"""Resizing a running pod VM to what its containers need: CPU and memory hotplug, and
the vCPU threads' host placement that follows each change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from carapace import resources
from carapace.agent.client import AgentClient
from carapace.errors import CarapaceError, HypervisorError, InvalidArgument, StateError
from carapace.hypervisor import VM
from carapace.resources import ContainerResources
from carapace.sandbox.placement import SandboxCgroupPlacement
from carapace.sandbox.plan import SandboxPlan
from carapace.sandbox.state import SandboxRecord

log = logging.getLogger("carapace.sandbox")

RESIZE_TIMEOUT = 30.0  # how long the guest may take to online or eject what set_size changed


class Resizer:
    """The VM's current size, and the moves that change it."""

    def __init__(
        self,
        plan: SandboxPlan,
        record: SandboxRecord,
        placement: SandboxCgroupPlacement,
        pod: Callable[[], list[ContainerResources]],
    ) -> None:
        self.plan = plan
        self.record = record
        self.placement = placement
        self.pod = pod
        #: vCPUs the guest uses (online) and its memory; they change with hotplug
        self.vcpus, self.memory_mib = plan.vcpus, plan.memory_mib
        #: the vCPUs the pod's containers last needed (hotplug follows its changes)
        self._pod_vcpus = plan.vcpus
        self._lock = asyncio.Lock()
        self.vm: VM | None = None
        self.agent: AgentClient | None = None

    def attach(self, vm: VM, agent: AgentClient) -> None:
        self.vm, self.agent = vm, agent

    def detach(self) -> None:
        self.vm, self.agent = None, None

    def _parts(self) -> tuple[VM, AgentClient]:
        if self.vm is None or self.agent is None:
            raise StateError(f"sandbox {self.plan.id} has no running VM to resize")
        return self.vm, self.agent

    # -- following the pod's containers ----------------------------------------------

    def check(
        self, container_id: str, res: ContainerResources, others: list[ContainerResources]
    ) -> tuple[int, int]:
        return self.plan.check_fit(container_id, res, others, (self.vcpus, self.memory_mib))

    async def fit(
        self, container_id: str, res: ContainerResources, others: list[ContainerResources]
    ) -> None:
        """Check a container's resources and hot-plug what the pod needs with them."""
        vcpus, memory_mib = self.check(container_id, res, others)
        if self.plan.hotplug and (vcpus > self.vcpus or memory_mib > self.memory_mib):
            await self.set_size(max(vcpus, self.vcpus), memory_mib)
            self._pod_vcpus = max(self._pod_vcpus, vcpus)

    async def refit(self, running: bool) -> None:
        """After a container came, left or changed: the pod cgroup's limits follow, and
        vCPUs the pod no longer needs are given back (memory stays: it is only ever
        hot-added)."""
        pod = self.pod()
        self.placement.apply_pod_limits(pod)
        if not self.plan.hotplug or not running:
            return
        vcpus = resources.pod_vcpus(self.plan.vcpus, pod)
        # only a change of what the pod needs resizes (a size set by hand stays)
        changed, self._pod_vcpus = vcpus != self._pod_vcpus, vcpus
        if changed and vcpus != self.vcpus:
            try:
                await self.set_size(vcpus, self.memory_mib)
            except CarapaceError as e:
                log.warning("sandbox %s: could not give back vCPUs: %s", self.plan.id, e)
        else:
            await self.place_vcpus()

    async def place_vcpus(self) -> None:
        """Place the vCPU threads where the mode wants them (again after hotplug)."""
        if self.vm is None or not self.placement.caps_vcpus:
            return
        pod = self.pod()
        cpus = max(self.plan.size.cpus, sum(r.cpus or 0.0 for r in pod))
        self.placement.place_vcpus(await self.vm.vcpu_threads(), cpus)
        self.placement.apply_pod_limits(pod)

    # -- resizing ---------------------------------------------------------------------

    async def set_size(self, vcpus: int, memory_mib: int) -> None:
        """Resize the running VM: hot-add or hot-remove vCPUs to exactly ``vcpus``, and
        hot-add memory up to ``memory_mib`` (memory is never removed: a smaller size
        keeps the current one); the guest onlines what was added."""
        async with self._lock:
            vm, agent = self._parts()
            plan = self.plan
            if not plan.hotplug:
                raise InvalidArgument(
                    f"sandbox {plan.id}: cannot resize to {vcpus} vCPUs / {memory_mib} MiB: CPU "
                    "and memory hotplug is disabled; set [hypervisor] "
                    "enable_cpu_memory_hotplug = true in configuration.toml"
                )
            boot_vcpus, boot_mib = plan.vcpus, plan.memory_mib
            if not boot_vcpus <= vcpus <= plan.max_vcpus:
                raise InvalidArgument(
                    f"sandbox {plan.id}: vCPUs {vcpus} is out of range; accepted: {boot_vcpus} "
                    f"(the boot vCPUs) to {plan.max_vcpus} (max vCPUs)"
                )
            max_mib = vm.spec.memory_limit_mib
            if not boot_mib <= memory_mib <= max_mib:
                raise InvalidArgument(
                    f"sandbox {plan.id}: memory {memory_mib} MiB is out of range; accepted: "
                    f"{boot_mib} MiB (the boot memory) to {max_mib} MiB (max memory)"
                )
            plugged = await vm.plugged_vcpus()
            # where the VM cannot unplug vCPUs (QEMU under TCG), surplus ones stay
            # plugged and the guest takes them offline: it runs on exactly ``vcpus``
            plug = vcpus if vm.can_unplug_vcpus else max(vcpus, plugged)
            await vm.check_vcpus(plug)  # refuses before anything changed
            _, mem_before_kb = await agent.online_cpu_mem(0, RESIZE_TIMEOUT, max_online=plugged)
            added = 0
            if memory_mib > self.memory_mib:
                added = await vm.add_memory(memory_mib - self.memory_mib)
                self.memory_mib += added
                self.record.memory_mib = self.memory_mib
                self.record.save()
            try:
                await vm.set_vcpus(plug)
            finally:
                # what the VM has, even when a hot-add or hot-remove failed half-way
                with contextlib.suppress(Exception):
                    plugged = await vm.plugged_vcpus()
            cpus = await self._online(agent, min(vcpus, plugged), mem_before_kb, added)
            self.vcpus = cpus
            self.record.vcpus = self.vcpus
            self.record.save()
            await self.place_vcpus()
            if cpus != vcpus:
                raise HypervisorError(
                    f"sandbox {plan.id}: the guest has {cpus} online CPUs; expected {vcpus}"
                )
            log.info(
                "sandbox %s: resized to %d vCPUs (%d plugged), %d MiB",
                plan.id,
                vcpus,
                plugged,
                self.memory_mib,
            )

    async def _online(self, agent: AgentClient, want: int, mem_before_kb: int, added: int) -> int:
        """Have the guest online ``want`` CPUs and the memory added (ACPI adds it to the
        guest asynchronously: online until it is there); returns the CPUs online."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESIZE_TIMEOUT
        while True:
            cpus, mem_kb = await agent.online_cpu_mem(want, RESIZE_TIMEOUT, max_online=want)
            if mem_kb >= mem_before_kb + added * 1024:
                return cpus
            if loop.time() >= deadline:
                raise HypervisorError(
                    f"sandbox {self.plan.id}: the guest's MemTotal is {mem_kb} KiB "
                    f"{RESIZE_TIMEOUT:g}s after adding {added} MiB to its {mem_before_kb} "
                    f"KiB; expected at least {mem_before_kb + added * 1024} KiB"
                )
            await asyncio.sleep(0.1)
