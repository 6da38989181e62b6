"""Starting a pod from a VM template (``carapace.factory``) or with a VM taken from a
pool of pre-booted ones (``factory.pool``), instead of a boot.

``plan_restore`` says whether a pod can (a pure verdict, with the reason when not: the
pod then boots cold, and the log says why). ``Restore`` gets the template (built on
first use), gives the VM spec of the clone, and once QEMU runs does what a clone must
before anything else: wait for the restored state, hot-add the share, reseed the guest's
CRNG, set its clock, hot-add the pod's NICs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from carapace.agent.client import AgentClient
from carapace.config import Config
from carapace.errors import CarapaceError
from carapace.factory import (
    Template,
    TemplateStore,
    build_template,
    clone_spec,
    copy_sparse,
    template_key,
)
from carapace.factory.pool import Handover, pool_key, pool_vm_spec, take, why_not_pooled
from carapace.hypervisor import VM, Nic, TapNic, VMSpec
from carapace.protocols.contract import SHARED_FS_VIRTIOFS
from carapace.sandbox.network import NIC_APPEAR_TIMEOUT, wait_for_nic
from carapace.sandbox.placement import SandboxCgroupPlacement
from carapace.sandbox.state import SandboxRecord

log = logging.getLogger("carapace.sandbox")

#: NICs a pod restored from a template may have at start (each is hot-added into one of
#: the template's free PCIe root ports, which also keep room for later ones).
MAX_CLONE_NICS = 2
#: Host bytes a clone's CRNG is reseeded with.
SEED_BYTES = 64


def template_base(spec: VMSpec, nic_slots: int) -> VMSpec:
    """``spec`` as far as its template goes: no boot NICs, room for a clone's NICs and
    the ``nic_slots`` free ones every pod has, and no virtio-balloon: QEMU 7.2 cannot
    restore a VM saved with one doing free page reporting (seen here: the load fails
    at the balloon's section, or the restored guest never answers)."""
    return dataclasses.replace(
        spec, nics=(), nic_slots=nic_slots + MAX_CLONE_NICS, free_page_reporting=False
    )


def plan_restore(nics: tuple[Nic, ...]) -> str | None:
    """Why a pod with these boot NICs cannot start from a template (None: it can)."""
    if any(not isinstance(n, TapNic) for n in nics):
        return "user-mode networking cannot be hot-added into a restored VM"
    if len(nics) > MAX_CLONE_NICS:
        return (
            f"the pod has {len(nics)} network interfaces; a VM restored from a template "
            f"takes at most {MAX_CLONE_NICS} at start"
        )
    return None


#: What building a template needs from outside: the hypervisor's command line of a
#: spec, a new VM, an agent connection.
TemplateParts = tuple[
    Callable[[str, VMSpec], list[str]],
    Callable[[str, VMSpec, bool], VM],
    Callable[[str], Awaitable[AgentClient]],
]


async def attempt_restore(
    sandbox_id: str, config: Config, spec: VMSpec, nic_slots: int, parts: TemplateParts
) -> Restore | None:
    """The start of pod ``sandbox_id`` from a template, or None with the reason logged
    (the pod then boots cold): a pod the template cannot fit, a template that could
    not be made."""
    why = plan_restore(spec.nics)
    if why is None:
        try:
            hv = config.hypervisor
            store = Path(config.factory.template_dir)
            restore = await Restore.prepare(store, hv.path, spec, nic_slots, parts, hv.boot_timeout)
        except (CarapaceError, OSError) as e:
            why = f"no template: {e}"
        else:
            log.info(
                "sandbox %s: restoring VM template %s%s",
                sandbox_id,
                restore.template.key,
                " (built now)" if restore.built else "",
            )
            return restore
    log.warning("sandbox %s: booting cold, not from a VM template: %s", sandbox_id, why)
    return None


@dataclass
class Restore:
    """One pod's start from a template."""

    template: Template
    built: bool
    nics: tuple[TapNic, ...]
    memory_fd: int | None = None

    @classmethod
    async def prepare(
        cls,
        store: Path,
        binary: str,
        spec: VMSpec,
        nic_slots: int,
        parts: TemplateParts,
        boot_timeout: float,
    ) -> Restore:
        """The template for ``spec`` (built now if the store has none), and for
        virtio-fs the clone's own copy of its RAM."""
        command_line, new_vm, connect_agent = parts
        base = template_base(spec, nic_slots)
        key, inputs = template_key(binary, base, command_line)

        async def build(work: Path) -> None:
            await build_template(binary, base, work, new_vm, connect_agent, boot_timeout)

        template, built = await TemplateStore(store).get(key, inputs, build)
        nics = tuple(n for n in spec.nics if isinstance(n, TapNic))
        restore = cls(template, built, nics)
        if spec.shared_fs == SHARED_FS_VIRTIOFS:
            fd = os.memfd_create(f"carapace-{spec.name}", os.MFD_CLOEXEC)
            restore.memory_fd = fd
            try:
                await asyncio.to_thread(copy_sparse, template.memory_file, fd)
            except BaseException:
                restore.close()
                raise
        return restore

    def vm_spec(self, spec: VMSpec, nic_slots: int) -> VMSpec:
        return clone_spec(template_base(spec, nic_slots), self.template, self.memory_fd)

    def close(self) -> None:
        """Close carapace's copy of the clone's RAM (QEMU holds its own once started)."""
        if self.memory_fd is not None:
            os.close(self.memory_fd)
            self.memory_fd = None

    async def resume(self, vm: VM, connect: Callable[[VM], Awaitable[AgentClient]]) -> AgentClient:
        """Once QEMU runs: wait for the restored guest, then ``make_it_the_pods``."""
        await vm.wait_restored()
        return await make_it_the_pods(vm, self.nics, connect)


async def make_it_the_pods(
    vm: VM, nics: tuple[TapNic, ...], connect: Callable[[VM], Awaitable[AgentClient]]
) -> AgentClient:
    """What a VM booted before its pod existed (restored from a template, or taken from
    a pool) needs first: the pod's share hot-added, the agent connected, the guest's
    CRNG reseeded from host bytes and its clock set, the pod's NICs hot-added."""
    if vm.spec.hotplug_share:
        await vm.add_share()
    agent = await connect(vm)
    await agent.reseed_random_dev(os.urandom(SEED_BYTES))
    await agent.set_guest_date_time(time.time_ns())
    for nic in nics:
        await vm.add_nic(nic)
    for nic in nics:
        await wait_for_nic(agent, nic.mac, NIC_APPEAR_TIMEOUT)
    return agent


def pool_base(spec: VMSpec, nic_slots: int) -> VMSpec:
    """``spec`` as far as a pool's VM goes: no boot NICs, room for the pod's NICs and
    the ``nic_slots`` free ones every pod has."""
    return dataclasses.replace(spec, nics=(), nic_slots=nic_slots + MAX_CLONE_NICS)


@dataclass
class Taken:
    """A pod's VM taken from the pool: the handover, and the VM as the pod sees it."""

    handover: Handover
    spec: VMSpec
    nics: tuple[TapNic, ...]
    #: The agent connection the pool made at the VM's start, once the pod has it.
    agent: socket.socket | None = None

    async def connect_agent(self, _path: str) -> AgentClient:
        """The pod's client of the VM's agent: on the pool's connection, the agent's
        first and only host (a second host on its port may lose its first request)."""
        sock, self.agent = self.agent, None
        if sock is None:
            raise CarapaceError("the pool VM's agent connection was used already")
        return await AgentClient.over(sock)


async def adopt(
    vm: VM,
    taken: Taken,
    record: SandboxRecord,
    placement: SandboxCgroupPlacement,
    files_limit: int | None,
) -> int:
    """Take over the pool's VM: recorded first (``state.release`` kills it by its
    name whatever fails next), then moved into the sandbox's cgroup, with the pod's
    file limit. Returns its pid."""
    h = taken.handover
    record.qemu_pid, record.qemu_name = h.pid, h.vm_name
    record.save()
    pid = await vm.adopt(*h.give())
    taken.agent = socket.socket(fileno=h.agent.detach())
    placement.adopt_vm(pid)
    if files_limit is not None:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (files_limit, files_limit))
    return pid


async def attempt_take(
    sandbox_id: str,
    config: Config,
    spec: VMSpec,
    nic_slots: int,
    command_line: Callable[[str, VMSpec], list[str]],
) -> Taken | None:
    """Pod ``sandbox_id``'s VM from the pool of pre-booted VMs, or None with the
    reason logged (no pool, none ready, another shape: the pod starts otherwise)."""
    why = plan_restore(spec.nics) or why_not_pooled(spec)
    if why is None:
        base = pool_base(spec, nic_slots)
        key, _ = pool_key(config.hypervisor.path, base, command_line)
        own = pool_vm_spec(base, spec.run_dir, spec.name)
        endpoint = Path(config.factory.vm_cache_endpoint)
        try:
            h = await asyncio.to_thread(take, endpoint, key, own.agent_socket, own.qmp_socket)
        except CarapaceError as e:
            why = str(e)
        else:
            log.info("sandbox %s: VM %s taken from the pool (pid %d)", sandbox_id, h.vm_name, h.pid)
            return Taken(h, own, tuple(n for n in spec.nics if isinstance(n, TapNic)))
    log.info("sandbox %s: not from the VM pool: %s", sandbox_id, why)
    return None
