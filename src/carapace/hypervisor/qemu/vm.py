"""A running QEMU process: start, QMP, graceful shutdown with a deadline, kill.

QEMU gets its sockets from carapace (``channels``) and runs under its seccomp sandbox;
its console is read into a capped log (``hypervisor.console``) while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from qemu.qmp import ExecuteError, QMPClient

from carapace.daemons import die_with_parent, spawn_logged
from carapace.errors import HypervisorError
from carapace.hypervisor.base import TapNic, VMSpec, tail
from carapace.hypervisor.console import ConsoleLog, console_tail
from carapace.hypervisor.qemu import hotplug, migration
from carapace.hypervisor.qemu.channels import Channels
from carapace.hypervisor.qemu.cmdline import (
    SHARE_CHARDEV_ID,
    nic_device_args,
    nic_device_id,
    nic_slot,
    qemu_argv,
    share_device_args,
)

log = logging.getLogger("carapace.qemu")

#: How long QEMU may take from exec to answering on QMP.
START_TIMEOUT = 30.0
#: How long the console's last bytes may take to arrive once QEMU is gone.
CONSOLE_DRAIN = 2.0


#: The exit status an adopted QEMU reports: its parent (the pool) reaps it, so the
#: real one is not ours to read.
UNKNOWN_STATUS = 255


class AdoptedProcess:
    """A QEMU process another process started (``QemuVM.adopt``): signalled and waited
    for through a pidfd, so a reused pid is never hit."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None
        self._exited: asyncio.Future[None] | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            if self._exited is None:
                loop = asyncio.get_running_loop()
                self._exited = loop.create_future()
                loop.add_reader(self.pidfd, self._on_exit)
            await asyncio.shield(self._exited)
        return UNKNOWN_STATUS

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)
        self.returncode = UNKNOWN_STATUS
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)
        os.close(self.pidfd)
        self.pidfd = -1

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.pidfd >= 0:
            signal.pidfd_send_signal(self.pidfd, sig)


class QemuVM:
    """One QEMU process running one pod VM (a ``carapace.hypervisor.VM``)."""

    def __init__(self, binary: str, spec: VMSpec, die_with_owner: bool = True) -> None:
        self.binary = binary
        self.spec = spec
        self.die_with_owner = die_with_owner
        self.proc: asyncio.subprocess.Process | AdoptedProcess | None = None
        self.qmp: QMPClient | None = None
        self._console: asyncio.Task[None] | None = None
        self._console_sock: socket.socket | None = None
        #: Given away (``hand_over``): never stopped or killed from here.
        self._handed_over = False
        #: Hot-remove vCPUs under TCG anyway (QEMU may abort afterwards: see vcpu_plan);
        #: for a test that proves the mechanism on a VM it throws away.
        self.unplug_under_tcg = False
        #: Run in the child between fork and exec (join cgroups, set limits), in order.
        self.pre_exec: list[Callable[[], None]] = []
        #: PCIe root port -> the id of the NIC in it ("" for a free one)
        self.nic_slots = {nic_slot(i): "" for i in range(len(spec.nics) + spec.nic_slots)}
        for i, nic in enumerate(spec.nics):
            self.nic_slots[nic_slot(i)] = nic.id

    @property
    def can_unplug_vcpus(self) -> bool:
        """Whether vCPUs may be hot-removed (see vcpu_plan for why not under TCG)."""
        return self.spec.accel != "tcg" or self.unplug_under_tcg

    def _pre_exec(self) -> None:
        if self.die_with_owner:
            die_with_parent()
        for fn in self.pre_exec:
            fn()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def console_tail(self, lines: int = 15) -> str:
        return console_tail(self.spec.console_log, lines)

    async def start(self) -> int:
        """Start QEMU on the sockets carapace made; returns its pid once QMP answers."""
        if not Path(self.binary).exists():
            raise HypervisorError(
                f"QEMU binary {self.binary} not found; install qemu-system-x86 or set "
                "[hypervisor] path in configuration.toml"
            )
        channels = Channels.open(self.spec)
        try:
            self.proc = await spawn_logged(
                qemu_argv(self.binary, self.spec, channels.fds),
                self.spec.qemu_log,
                self._pre_exec,
                [
                    *(n.fd for n in self.spec.nics if isinstance(n, TapNic)),
                    *channels.qemu_fds,
                    *([] if self.spec.memory_fd is None else [self.spec.memory_fd]),
                ],
            )
        except BaseException:
            channels.close()
            raise
        channels.close_qemu_ends()  # QEMU has its own copies
        self._pump_console(channels.console_host)
        await self._wait_up()
        return self.proc.pid

    def _pump_console(self, sock: socket.socket) -> None:
        self._console_sock = sock
        console = ConsoleLog(self.spec.console_log)
        self._console = asyncio.ensure_future(console.pump(sock))

    async def adopt(self, pid: int, pidfd: int, console: int) -> int:
        """Take over a VM another process started (``VM.adopt``)."""
        self.proc = AdoptedProcess(pid, pidfd)
        self._pump_console(socket.socket(fileno=console))
        await self._wait_up()
        return pid

    async def hand_over(self) -> tuple[int, int, int]:
        """Give the running VM away (``VM.hand_over``)."""
        if self.proc is None or self.proc.returncode is not None or self._console_sock is None:
            raise HypervisorError(f"VM {self.spec.name} is not running: nothing to hand over")
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            # a copy survives the pump, which closes its socket when it stops
            console = os.dup(self._console_sock.fileno())
        except OSError:
            os.close(pidfd)
            raise
        self._handed_over = True
        # stopped now, without waiting for more output: its owner reads it from here on
        await self._stop_console(drain=False)
        await self.close_qmp()
        return self.proc.pid, pidfd, console

    async def _wait_up(self) -> None:
        """Wait until QEMU answers on QMP (it is up), or raise why it did not."""
        assert self.proc is not None
        up = asyncio.ensure_future(self.qmp_connect())
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait(
                {up, exited}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if up.done() and up.exception() is None:
                return
            with contextlib.suppress(TimeoutError):  # a failed connect: QEMU is going
                await asyncio.wait_for(asyncio.shield(exited), 5 if up.done() else 0)
        finally:
            for t in (up, exited):
                t.cancel()
            await asyncio.gather(up, exited, return_exceptions=True)
        if self.proc.returncode is not None:
            raise HypervisorError(
                f"QEMU exited with status {self.proc.returncode} at start: "
                f"{tail(self.spec.qemu_log, 5) or '(no output)'}"
            )
        why = f"{up.exception()}" if up.done() and not up.cancelled() else "no answer"
        raise HypervisorError(
            f"VM {self.spec.name}: QEMU did not answer on QMP within {START_TIMEOUT:g}s "
            f"({why}): {tail(self.spec.qemu_log, 5) or '(no output)'}"
        )

    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    async def wait(self) -> int:
        """Wait until QEMU exits; its console's last bytes are in the log by then."""
        assert self.proc is not None
        code = await self.proc.wait()
        await self._drain_console()
        return code

    async def _drain_console(self) -> None:
        """Let the console's last bytes in (QEMU is gone: its end of the socket is
        closed, the pump ends at EOF)."""
        pump = self._console
        if pump is not None and not pump.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(pump), CONSOLE_DRAIN)

    async def qmp_connect(self) -> QMPClient:
        if self.qmp is None:
            qmp = QMPClient(self.spec.vm_name)
            await qmp.connect(str(self.spec.qmp_socket))
            self.qmp = qmp
        return self.qmp

    async def qmp_execute(self, command: str, **args: object) -> object:
        qmp = await self.qmp_connect()
        return await qmp.execute(command, args or None)

    # -- templates ----------------------------------------------------------------

    async def save_state(self, path: Path, timeout: float = 60.0) -> None:
        """Save the VM's device state to ``path`` (its RAM is in the shared
        ``memory_file`` already), then end QEMU: what a template is made of."""
        await migration.save_state(self, path, timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp_execute("quit"), 5)
        await self.stop(5)

    async def wait_restored(self, timeout: float = 60.0) -> None:
        """Restore a VM started for ``spec.incoming`` from it; returns once loaded (QEMU
        then runs the guest on: the template was running when it was saved)."""
        if self.spec.incoming is None:
            raise HypervisorError(f"VM {self.spec.name} was not started to be restored")
        await migration.restore(self, self.spec.incoming, timeout)

    async def add_share(self) -> None:
        """Hot-add the pod's virtio-fs device (on the daemon's socket) into its root port."""
        await self.qmp_or_error(
            "chardev-add",
            {
                "id": SHARE_CHARDEV_ID,
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": str(self.spec.fs_socket)}},
                        "server": False,
                    },
                },
            },
        )
        device: dict[str, object] = dict(share_device_args(self.spec))
        device["queue-size"] = int(str(device["queue-size"]))
        await self.qmp_or_error("device_add", device)
        log.info("VM %s: hot-added the virtio-fs share", self.spec.name)

    # -- hotplug ------------------------------------------------------------------

    async def vcpu_threads(self) -> dict[int, int]:
        """cpu-index -> host thread id of every vCPU (``query-cpus-fast``)."""
        return hotplug.vcpu_threads(await self.qmp_execute("query-cpus-fast"))

    async def cpu_slots(self) -> list[hotplug.CpuSlot]:
        return hotplug.parse_hotpluggable_cpus(await self.qmp_execute("query-hotpluggable-cpus"))

    async def plugged_vcpus(self) -> int:
        return sum(slot.plugged for slot in await self.cpu_slots())

    async def check_vcpus(self, n: int) -> None:
        await self.vcpu_plan(n)

    async def vcpu_plan(self, n: int) -> hotplug.CpuPlan:
        """What ``set_vcpus(n)`` would plug and unplug; raises when it cannot be done."""
        plan = hotplug.plan_vcpus(await self.cpu_slots(), n, self.spec.vcpus)
        if plan.remove and self.spec.accel == "tcg" and not self.unplug_under_tcg:
            # seen with QEMU 7.2.22 under TCG: once a vCPU is hot-removed, QEMU's heap is
            # corrupt; the next device_add (vCPU or DIMM) aborts it ("double free or
            # corruption (out)", "corrupted size vs. prev_size while consolidating" in
            # tcg_cpu_realizefn), and it also died later without one: the pod is lost
            raise HypervisorError(
                f"VM {self.spec.name}: cannot hot-remove vCPUs ({n} wanted, "
                f"{n + len(plan.remove)} plugged) under TCG: QEMU corrupts its heap when a "
                "vCPU is unplugged and then aborts; vCPUs are hot-removed under KVM only"
            )
        return plan

    async def set_vcpus(self, n: int, unplug_timeout: float = 30.0) -> None:
        """Hot-add or hot-remove vCPUs until the VM has exactly ``n`` (at least the boot
        vCPUs, at most maxcpus). Only vCPUs added here are removed; each removal waits
        until QEMU reports the slot empty (the guest ejected the CPU)."""
        plan = await self.vcpu_plan(n)
        for slot in plan.add:
            args = hotplug.cpu_device_add_args(slot)
            log.info("VM %s: hot-adding vCPU %s", self.spec.name, args["id"])
            await self.qmp_or_error("device_add", args)
        for device_id in plan.remove:
            log.info("VM %s: hot-removing vCPU %s", self.spec.name, device_id)
            await self.qmp_or_error("device_del", {"id": device_id})
            await self._wait_cpu_unplugged(device_id, unplug_timeout)

    async def _wait_cpu_unplugged(self, device_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        path = hotplug.PERIPHERAL + device_id
        while True:
            if not any(s.qom_path == path for s in await self.cpu_slots()):
                return
            if time.monotonic() >= deadline:
                raise HypervisorError(
                    f"VM {self.spec.name}: vCPU {device_id} is still plugged {timeout:g}s after "
                    "device_del: the guest did not eject it (its kernel must offline the CPU "
                    "and run ACPI _EJ0); guest console tail:\n"
                    f"{self.console_tail(10) or '(empty)'}"
                )
            await asyncio.sleep(0.1)

    async def memory_dimms(self) -> list[hotplug.Dimm]:
        return hotplug.parse_memory_devices(await self.qmp_execute("query-memory-devices"))

    async def add_memory(self, mib: int) -> int:
        """Hot-add ``mib`` MiB (aligned up to the guest's memory block size) as one
        pc-dimm (backed like the boot memory: shared with a virtio-fs daemon or not);
        returns the MiB added. Never removed."""
        add = hotplug.plan_memory_add(
            mib, await self.memory_dimms(), self.spec.memory_mib, self.spec.memory_headroom_mib
        )
        add = dataclasses.replace(add, shared=self.spec.shares_memory)
        log.info("VM %s: hot-adding %d MiB as %s", self.spec.name, add.size_mib, add.dimm_id)
        await self.qmp_or_error("object-add", add.object_add_args())
        try:
            await self.qmp_or_error("device_add", add.device_add_args())
        except BaseException:
            # a backend without its DIMM would hold its memory until the VM stops
            with contextlib.suppress(Exception):
                await self.qmp_execute("object-del", id=add.backend_id)
            raise
        return add.size_mib

    # -- NICs ---------------------------------------------------------------------------

    async def add_nic(self, nic: TapNic) -> None:
        """Hot-add a tap NIC: its fd goes to QEMU over the QMP socket (``getfd``), then
        ``netdev_add`` and ``device_add`` into a free PCIe root port."""
        if nic.id in self.nic_slots.values():
            raise HypervisorError(f"VM {self.spec.name}: a NIC {nic.id} exists already")
        free = [slot for slot, used in self.nic_slots.items() if not used]
        if not free:
            raise HypervisorError(
                f"VM {self.spec.name}: no free slot for NIC {nic.id}; the VM was started "
                f"with {len(self.nic_slots)} (its boot NICs and nic_slots)"
            )
        qmp = await self.qmp_connect()
        fdname = f"fd-{nic.id}"
        qmp.send_fd_scm(nic.fd)
        await self.qmp_or_error("getfd", {"fdname": fdname})
        netdev: dict[str, object] = {"type": "tap", "id": nic.id, "fd": fdname}
        if nic.vhost:
            netdev["vhost"] = True
        try:
            await self.qmp_or_error("netdev_add", netdev)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.qmp_execute("closefd", fdname=fdname)
            raise
        try:
            await self.qmp_or_error("device_add", dict(nic_device_args(nic, free[0])))
        except BaseException:
            with contextlib.suppress(Exception):
                await self.qmp_execute("netdev_del", id=nic.id)
            raise
        self.nic_slots[free[0]] = nic.id
        log.info("VM %s: hot-added NIC %s (%s) in %s", self.spec.name, nic.id, nic.mac, free[0])

    async def remove_nic(self, nic_id: str, timeout: float = 30.0) -> None:
        """Hot-remove a NIC: ``device_del``, wait until the guest let the device go
        (PCIe hotplug takes the guest some seconds), then ``netdev_del``."""
        slot = next((s for s, used in self.nic_slots.items() if used == nic_id), None)
        if slot is None:
            raise HypervisorError(f"VM {self.spec.name}: no NIC {nic_id}")
        device = nic_device_id(nic_id)
        await self.qmp_or_error("device_del", {"id": device})
        deadline = time.monotonic() + timeout
        while await self._has_device(device):
            if time.monotonic() >= deadline:
                raise HypervisorError(
                    f"VM {self.spec.name}: NIC {nic_id} is still plugged {timeout:g}s after "
                    "device_del: the guest did not release it"
                )
            await asyncio.sleep(0.2)
        await self.qmp_or_error("netdev_del", {"id": nic_id})
        self.nic_slots[slot] = ""
        log.info("VM %s: removed NIC %s", self.spec.name, nic_id)

    async def _has_device(self, device_id: str) -> bool:
        entries = await self.qmp_execute("qom-list", path="/machine/peripheral")
        if not isinstance(entries, list):
            raise HypervisorError(f"qom-list: expected a list, got {entries!r}")
        return any(isinstance(e, dict) and e.get("name") == device_id for e in entries)

    async def qmp_or_error(self, command: str, args: dict[str, object]) -> object:
        try:
            return await self.qmp_execute(command, **args)
        except ExecuteError as e:
            raise HypervisorError(f"VM {self.spec.name}: QMP {command} {args} failed: {e}") from e

    async def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the guest to power off, then ``quit``, then kill."""
        if self.proc is None or self._handed_over:
            return
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.warning("VM %s did not power off in %gs; quitting it", self.spec.name, timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp_execute("quit"), 2)
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.kill()
                await self.proc.wait()
        await self.close_qmp()
        await self._stop_console()

    async def _stop_console(self, drain: bool = True) -> None:
        if drain:
            await self._drain_console()
        pump, self._console = self._console, None
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None and not self._handed_over:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)

    async def close_qmp(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
