"""The QEMU command line for a pod VM (pure: a VMSpec in, an argv list out)."""

from __future__ import annotations

from carapace.hypervisor.base import BASE_KERNEL_PARAMS, Nic, PortForward, TapNic, VMSpec
from carapace.hypervisor.qemu.channels import ChannelFds
from carapace.hypervisor.qemu.hotplug import MEMORY_SLOTS
from carapace.protocols.contract import AGENT_PORT_NAME, SHARE_TAG, SHARED_FS_VIRTIOFS

#: Kernel parameter given when memory can be hot-added: the guest kernel onlines a new
#: memory block itself as ACPI adds it (the agent's OnlineCPUMem is the safety net).
MEMORY_HOTPLUG_PARAM = "memhp_default_state=online"


def smp_arg(spec: VMSpec) -> str:
    """``-smp``: the boot vCPUs, and with headroom one socket per possible vCPU (so that
    each hot-added vCPU is a socket of its own, as ``lscpu`` shows in the guest)."""
    if spec.max_vcpus <= spec.vcpus:
        return f"{spec.vcpus}"
    m = spec.max_vcpus
    return f"cpus={spec.vcpus},maxcpus={m},sockets={m},cores=1,threads=1"


def memory_arg(spec: VMSpec) -> str:
    """``-m``: the boot memory, and with headroom DIMM slots and the most memory."""
    headroom = spec.memory_headroom_mib
    if headroom == 0:
        return f"{spec.memory_mib}M"
    return f"size={spec.memory_mib}M,slots={MEMORY_SLOTS},maxmem={spec.memory_mib + headroom}M"


def kernel_params(spec: VMSpec) -> str:
    params = BASE_KERNEL_PARAMS
    if spec.memory_headroom_mib:
        params += " " + MEMORY_HOTPLUG_PARAM
    if spec.kernel_params:
        params += " " + spec.kernel_params
    return params


#: QEMU's id of the PCIe root port that takes the N-th hot-added NIC.
NIC_SLOT_PREFIX = "nicslot"


def nic_device_id(nic_id: str) -> str:
    return f"{nic_id}-nic"


def hostfwd(fwd: PortForward) -> str:
    return f"hostfwd={fwd.protocol}:{fwd.host_ip}:{fwd.host_port}-:{fwd.guest_port}"


def netdev_arg(nic: Nic, fd: int | None = None) -> str:
    """``-netdev``: a tap by its fd, or user-mode networking with its forwards."""
    if isinstance(nic, TapNic):
        vhost = ",vhost=on" if nic.vhost else ""
        return f"tap,id={nic.id},fd={nic.fd if fd is None else fd}{vhost}"
    return ",".join([f"user,id={nic.id}", *(hostfwd(f) for f in nic.forwards)])


def nic_slot(i: int) -> str:
    return f"{NIC_SLOT_PREFIX}{i}"


def nic_device_args(nic: Nic, slot: str) -> dict[str, str]:
    """The virtio-net device of ``nic`` in the PCIe root port ``slot``."""
    return {
        "driver": "virtio-net-pci",
        "id": nic_device_id(nic.id),
        "netdev": nic.id,
        "mac": nic.mac,
        "bus": slot,
    }


def nic_args(spec: VMSpec) -> list[str]:
    """Every NIC sits in a PCIe root port of its own (q35's root bus cannot unplug), so
    that any can be removed: the boot NICs in the first ports, then ``nic_slots`` free
    ones for NICs hot-added later."""
    args: list[str] = []
    for i in range(len(spec.nics) + spec.nic_slots):
        args += ["-device", f"pcie-root-port,id={nic_slot(i)},chassis={i + 1}"]
    for i, nic in enumerate(spec.nics):
        device = nic_device_args(nic, nic_slot(i))
        args += ["-netdev", netdev_arg(nic)]
        args += [
            "-device",
            ",".join([device.pop("driver"), *(f"{k}={v}" for k, v in device.items())]),
        ]
    return args


#: The id of the guest's boot memory backend when it is shared (virtio-fs).
BOOT_MEMORY_ID = "ram0"


def shared_fs_args(spec: VMSpec) -> list[str]:
    """The share: a vhost-user-fs device on the daemon's socket (with guest memory in a
    shared memfd, which vhost-user needs), or QEMU's own 9p server."""
    if spec.shared_fs == SHARED_FS_VIRTIOFS:
        return [
            "-object",
            f"memory-backend-memfd,id={BOOT_MEMORY_ID},size={spec.memory_mib}M,share=on",
            "-chardev",
            f"socket,id=virtiofs,path={spec.fs_socket}",
            "-device",
            f"vhost-user-fs-pci,chardev=virtiofs,tag={SHARE_TAG},queue-size=1024",
        ]
    return [
        "-fsdev",
        f"local,id=shared,path={spec.shared_dir},security_model=none,multidevs=remap",
        "-device",
        f"virtio-9p-pci,fsdev=shared,mount_tag={SHARE_TAG}",
    ]


def machine_arg(spec: VMSpec) -> str:
    machine = f"q35,accel={spec.accel}"
    if spec.shares_memory:
        machine += f",memory-backend={BOOT_MEMORY_ID}"
    return machine


#: QEMU's seccomp sandbox (as Kata can run it): no obsolete system calls, no setuid and
#: friends, no fork/exec, no scheduler or resource changes, for QEMU's whole life.
SECCOMP_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def channel_args(fds: ChannelFds) -> list[str]:
    """The console, QMP and the agent's port on sockets carapace made (``channels``):
    QEMU creates no socket file of its own."""
    return [
        "-chardev",
        f"socket,id=console,fd={fds.console},server=off",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=qmp,fd={fds.qmp},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-device",
        "virtio-serial-pci,id=serial0",
        "-chardev",
        f"socket,id=agent,fd={fds.agent},server=on,wait=off",
        "-device",
        f"virtserialport,bus=serial0.0,chardev=agent,name={AGENT_PORT_NAME}",
    ]


def qemu_argv(binary: str, spec: VMSpec, fds: ChannelFds) -> list[str]:
    cpu = "host" if spec.accel == "kvm" else "max"
    params = kernel_params(spec)
    sandbox = ["-sandbox", SECCOMP_SANDBOX] if spec.seccomp_sandbox else []
    return [
        binary,
        "-name",
        f"{spec.vm_name},debug-threads=on",
        "-machine",
        machine_arg(spec),
        "-cpu",
        cpu,
        "-smp",
        smp_arg(spec),
        "-m",
        memory_arg(spec),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        params,
        *sandbox,
        "-pidfile",
        str(spec.pid_file),
        *channel_args(fds),
        *shared_fs_args(spec),
        *nic_args(spec),
        *spec.extra_args,
    ]
