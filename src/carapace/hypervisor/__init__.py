"""The hypervisor interface: what a Sandbox needs from a VM, independent of QEMU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Kernel parameters every guest boots with (quiet, fast, trusted CPU RNG for Python).
BASE_KERNEL_PARAMS = (
    "console=ttyS0 quiet panic=-1 random.trust_cpu=on 8250.nr_uarts=1 tsc=reliable "
    "no_timer_check rcupdate.rcu_expedited=1 i8042.noaux i8042.nomux i8042.nopnp "
    "i8042.dumbkbd cryptomgr.notests"
)


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to start one pod VM."""

    name: str
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
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "qemu.pid"
