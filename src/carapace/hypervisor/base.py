"""The hypervisor interface: what a Sandbox needs from a VM, independent of QEMU.

``VMSpec`` says what to start; a ``VM`` is one running pod VM. The hypervisor owns the
guest memory block size and the hotplug headroom (``memory_headroom_mib``): every other
part asks it, none recomputes them. ``carapace.hypervisor.qemu`` is the only
implementation; nothing outside ``carapace.hypervisor`` imports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from carapace.protocols import contract

#: Kernel parameters every guest boots with (quiet, fast, trusted CPU RNG for Python).
BASE_KERNEL_PARAMS = (
    "console=ttyS0 quiet panic=-1 random.trust_cpu=on 8250.nr_uarts=1 tsc=reliable "
    "no_timer_check rcupdate.rcu_expedited=1 i8042.noaux i8042.nomux i8042.nopnp "
    "i8042.dumbkbd cryptomgr.notests"
)

#: The guest's memory block size on x86_64: the unit it onlines hot-added memory in.
MEMORY_BLOCK_MIB = 128


def align_up(mib: int, block: int = MEMORY_BLOCK_MIB) -> int:
    return -(-mib // block) * block


def align_down(mib: int, block: int = MEMORY_BLOCK_MIB) -> int:
    return mib // block * block


def memory_headroom_mib(memory_mib: int, max_memory_mib: int) -> int:
    """The memory that can be hot-added above the boot memory: whole guest memory
    blocks up to ``max_memory_mib`` (0 when there is no whole block of room)."""
    if max_memory_mib <= memory_mib:
        return 0
    return align_down(max_memory_mib - memory_mib)


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator a VM runs under, and why it was chosen."""

    accel: str  # "kvm" or "tcg"
    reason: str
    cached: bool = False


@dataclass(frozen=True)
class PortForward:
    """A host port forwarded into the guest (user-mode networking)."""

    host_port: int
    guest_port: int
    protocol: str = "tcp"  # "tcp" or "udp"
    host_ip: str = "127.0.0.1"


@dataclass(frozen=True)
class TapNic:
    """A NIC backed by a tap device the host made; ``fd`` is its open /dev/net/tun
    file, handed to the VM process (the VM never opens a device by name)."""

    id: str  # e.g. "net0"; the device is "<id>-nic"
    mac: str
    fd: int
    vhost: bool = False


@dataclass(frozen=True)
class UserNic:
    """A NIC on the hypervisor's user-mode network (NAT, no host device); the guest is
    10.0.2.15/24 with the gateway 10.0.2.2 and DNS at 10.0.2.3."""

    id: str
    mac: str
    forwards: tuple[PortForward, ...] = ()


Nic = TapNic | UserNic

#: The guest side of user-mode networking (QEMU's slirp defaults).
USER_NET_GUEST_IP = "10.0.2.15"
USER_NET_PREFIX = 24
USER_NET_GATEWAY = "10.0.2.2"
USER_NET_DNS = "10.0.2.3"


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to start one pod VM."""

    name: str  # the sandbox id
    run_dir: Path
    kernel: Path
    initrd: Path
    vcpus: int
    memory_mib: int
    accel: str  # "kvm" or "tcg"
    shared_dir: Path
    kernel_params: str = ""
    #: Hotplug headroom: the most vCPUs / MiB of memory the VM can grow to while it
    #: runs. At most ``vcpus`` / ``memory_mib`` (the default 0 included): no headroom.
    max_vcpus: int = 0
    max_memory_mib: int = 0
    #: NICs the VM boots with.
    nics: tuple[Nic, ...] = ()
    #: Free slots for NICs hot-added while the VM runs.
    nic_slots: int = 0
    #: How the VM sees ``shared_dir``: "virtio-fs" (a vhost-user daemon already
    #: listening on ``fs_socket``; guest memory is then shared with it) or "virtio-9p".
    shared_fs: str = contract.SHARED_FS_9P
    #: Run the hypervisor under its seccomp sandbox (QEMU's ``-sandbox``).
    seccomp_sandbox: bool = True
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    #: Under TCG, the translation cache in MiB (0: QEMU's default). Ignored under KVM
    #: and with vCPU headroom (see ``cmdline.accel_args``).
    tcg_tb_size_mib: int = 0
    #: A virtio-balloon device with free page reporting: pages the guest frees are
    #: handed back to the host (QEMU discards them).
    free_page_reporting: bool = False
    #: Guest RAM in this file (a VM template's, on tmpfs) instead of anonymous memory:
    #: mapped shared by the template VM (its RAM is written there) and private
    #: copy-on-write by the template's clones (they share its pages until they write).
    memory_file: Path | None = None
    memory_file_shared: bool = False
    #: An fd the VM process inherits for ``memory_file`` (``/proc/self/fd/N``): a
    #: memfd holding a clone's own copy of the template's RAM.
    memory_fd: int | None = None
    #: Restore the VM from this migration stream (a template's device state) rather
    #: than boot it; guest RAM is ``memory_file``'s (migration skips shared RAM).
    incoming: Path | None = None
    #: The virtio-fs device is hot-added once the VM runs (a template's clone: QEMU
    #: cannot migrate a vhost-user-fs device) into a PCIe root port of its own.
    hotplug_share: bool = False

    @property
    def memory_headroom_mib(self) -> int:
        """Memory that can be hot-added: whole blocks up to ``max_memory_mib``."""
        return memory_headroom_mib(self.memory_mib, self.max_memory_mib)

    @property
    def memory_limit_mib(self) -> int:
        """The most memory the VM can have: the boot memory and its headroom."""
        return self.memory_mib + self.memory_headroom_mib

    @property
    def vm_name(self) -> str:
        return contract.vm_name(self.name)

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def fs_socket(self) -> Path:
        """The vhost-user socket of the virtio-fs daemon."""
        return self.run_dir / "virtiofs.sock"

    @property
    def shares_memory(self) -> bool:
        """Whether guest memory must be shareable (memfd) with a vhost-user daemon."""
        return self.shared_fs == contract.SHARED_FS_VIRTIOFS

    @property
    def memory_backend(self) -> bool:
        """Whether the boot memory is a named backend (shared, or in a file)."""
        return self.shares_memory or self.memory_file is not None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        """The newest console output (capped: see ``hypervisor.console``)."""
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "qemu.pid"


class VM(Protocol):
    """One pod VM, as a Sandbox uses it."""

    spec: VMSpec
    #: Run in the child between fork and exec (join cgroups, set limits), in order.
    pre_exec: list[Callable[[], None]]

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None:
        """The VM process's exit status once it exited, else None."""
        ...

    @property
    def can_unplug_vcpus(self) -> bool:
        """Whether vCPUs may be hot-removed (else surplus ones stay plugged and the
        guest takes them offline)."""
        ...

    async def start(self) -> int:
        """Start the VM process; returns its pid once the agent channel exists."""
        ...

    def exited(self) -> bool: ...

    async def wait(self) -> int: ...

    async def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the guest to power off, then stop it by force."""
        ...

    def kill(self) -> None: ...

    def console_tail(self, lines: int = 15) -> str:
        """The last lines the guest printed on its console."""
        ...

    async def vcpu_threads(self) -> dict[int, int]:
        """cpu-index -> host thread id of every vCPU."""
        ...

    async def plugged_vcpus(self) -> int: ...

    async def check_vcpus(self, n: int) -> None:
        """Raise when ``set_vcpus(n)`` cannot be done, before anything changes."""
        ...

    async def set_vcpus(self, n: int) -> None:
        """Hot-add or hot-remove vCPUs until the VM has exactly ``n`` plugged."""
        ...

    async def add_memory(self, mib: int) -> int:
        """Hot-add at least ``mib`` MiB (whole memory blocks); returns the MiB added."""
        ...

    async def add_nic(self, nic: TapNic) -> None:
        """Hot-add a NIC backed by ``nic.fd`` (the VM gets its own copy of the fd)."""
        ...

    async def save_state(self, path: Path) -> None:
        """Save the VM (its RAM is ``spec.memory_file``) to ``path`` and end it."""
        ...

    async def wait_restored(self) -> None:
        """Wait until a VM started from ``spec.incoming`` runs the restored guest."""
        ...

    async def add_share(self) -> None:
        """Hot-add the virtio-fs device of the pod's share (``spec.hotplug_share``)."""
        ...

    async def remove_nic(self, nic_id: str) -> None:
        """Hot-remove a NIC added at boot or by ``add_nic``; returns once it is gone."""
        ...

    async def close_qmp(self) -> None:
        """Close this side's QMP connection (another may connect then)."""
        ...

    async def hand_over(self) -> tuple[int, int, int]:
        """Give the running VM away (a pool's VM to a pod): (its pid, a pidfd of it,
        the host end of its console); from then on this object neither reads its
        console nor stops or kills it, and ``wait`` only reaps it."""
        ...

    async def adopt(self, pid: int, pidfd: int, console: int) -> int:
        """Take over a running VM another process started (``hand_over``'s three)
        instead of starting one; its QMP and agent sockets are at ``spec``'s paths.
        The fds are this object's from then on. Returns the pid once QMP answers."""
        ...


#: The most bytes ``tail`` reads from the end of a file, and the longest line it shows.
TAIL_BYTES = 64 << 10
TAIL_LINE = 1000


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages: read by seeking from its end
    (at most ``TAIL_BYTES``, however big the file grew), each line cut at ``TAIL_LINE``
    characters (a guest may print one endless line)."""
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES)
            f.seek(start)
            data = f.read(TAIL_BYTES)
    except OSError:
        return ""
    found = data.decode(errors="replace").rstrip().splitlines()
    if start and len(found) > 1:
        found = found[1:]  # the first one began before what was read
    found = found[-lines:] if lines > 0 else []
    return "\n".join(t if len(t) <= TAIL_LINE else t[:TAIL_LINE] + " [...]" for t in found)
