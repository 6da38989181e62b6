"""The hypervisor: the VM interface a sandbox needs (``base``) and the way to get one.

``new_vm`` and ``choose_accelerator`` are the only doors to the implementation
(``carapace.hypervisor.qemu``), so nothing outside this package imports QEMU modules.
"""

from __future__ import annotations

from pathlib import Path

from carapace.hypervisor.base import (
    BASE_KERNEL_PARAMS,
    MEMORY_BLOCK_MIB,
    USER_NET_DNS,
    USER_NET_GATEWAY,
    USER_NET_GUEST_IP,
    USER_NET_PREFIX,
    VM,
    AccelChoice,
    Nic,
    PortForward,
    TapNic,
    UserNic,
    VMSpec,
    memory_headroom_mib,
    tail,
)

__all__ = [
    "BASE_KERNEL_PARAMS",
    "MEMORY_BLOCK_MIB",
    "USER_NET_DNS",
    "USER_NET_GATEWAY",
    "USER_NET_GUEST_IP",
    "USER_NET_PREFIX",
    "VM",
    "AccelChoice",
    "Nic",
    "PortForward",
    "TapNic",
    "UserNic",
    "VMSpec",
    "choose_accelerator",
    "kvm_precheck",
    "memory_headroom_mib",
    "new_vm",
    "tail",
    "vm_command_line",
]


def new_vm(binary: str, spec: VMSpec, die_with_owner: bool = True) -> VM:
    """A VM (not started yet) for ``spec``, run by the hypervisor binary ``binary``."""
    from carapace.hypervisor.qemu.vm import QemuVM

    return QemuVM(binary, spec, die_with_owner=die_with_owner)


def vm_command_line(binary: str, spec: VMSpec) -> list[str]:
    """The command line ``spec`` starts the hypervisor with (its channels as fds 3, 4
    and 5): what decides whether a saved VM can be restored into another."""
    from carapace.hypervisor.qemu.channels import ChannelFds
    from carapace.hypervisor.qemu.cmdline import qemu_argv

    return qemu_argv(binary, spec, ChannelFds(agent=3, qmp=4, console=5))


def choose_accelerator(
    setting: str, binary: str, kernel: Path, initrd: Path, cache: Path
) -> AccelChoice:
    """The accelerator to run VMs under: by configuration, or by probing (KVM only
    where a guest really boots under it), cached in ``cache``."""
    from carapace.hypervisor.qemu import accel

    return accel.choose_accelerator(setting, binary, kernel, initrd, cache)


def kvm_precheck() -> str | None:
    """Why KVM cannot be used on this host, judged without booting anything (None:
    it may be; ``choose_accelerator`` then boots a probe guest to be sure)."""
    from carapace.hypervisor.qemu import accel

    return accel.kvm_precheck()
