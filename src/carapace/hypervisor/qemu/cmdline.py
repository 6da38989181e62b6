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


#: The id of the guest's boot memory backend when it is named (shared or in a file).
BOOT_MEMORY_ID = "ram0"
#: The chassis number of the share's root port (the NICs' ports count from 1).
SHARE_CHASSIS = 200


def memory_backend_args(spec: VMSpec) -> list[str]:
    """The boot memory's backend when it is named: a template's file (shared by the
    template VM, private copy-on-write in its clones), else a shared memfd (virtio-fs:
    vhost-user needs guest memory it can map)."""
    if spec.memory_file is not None:
        share = "on" if spec.memory_file_shared else "off"
        return [
            "-object",
            f"memory-backend-file,id={BOOT_MEMORY_ID},size={spec.memory_mib}M,"
            f"mem-path={spec.memory_file},share={share}",
        ]
    if spec.shares_memory:
        return [
            "-object",
            f"memory-backend-memfd,id={BOOT_MEMORY_ID},size={spec.memory_mib}M,share=on",
        ]
    return []


#: The virtio-fs device's id, its chardev's, and the PCIe root port a hot-added one
#: goes into.
SHARE_DEVICE_ID = "virtiofs0"
SHARE_CHARDEV_ID = "virtiofs"
SHARE_SLOT = "shareslot"


def share_device_args(spec: VMSpec) -> dict[str, str]:
    """The vhost-user-fs device of the pod's share (on the command line, or hot-added
    into ``SHARE_SLOT``)."""
    device = {
        "driver": "vhost-user-fs-pci",
        "id": SHARE_DEVICE_ID,
        "chardev": SHARE_CHARDEV_ID,
        "tag": SHARE_TAG,
        "queue-size": "1024",
    }
    if spec.hotplug_share:
        device["bus"] = SHARE_SLOT
    return device


def shared_fs_args(spec: VMSpec) -> list[str]:
    """The share: a vhost-user-fs device on the daemon's socket (with guest memory
    shared, which vhost-user needs; a template's clone hot-adds it into a root port of
    its own), or QEMU's own 9p server."""
    if spec.shared_fs == SHARED_FS_VIRTIOFS:
        if spec.hotplug_share:
            return ["-device", f"pcie-root-port,id={SHARE_SLOT},chassis={SHARE_CHASSIS}"]
        device = share_device_args(spec)
        return [
            "-chardev",
            f"socket,id={SHARE_CHARDEV_ID},path={spec.fs_socket}",
            "-device",
            ",".join([device.pop("driver"), *(f"{k}={v}" for k, v in device.items())]),
        ]
    return [
        "-fsdev",
        f"local,id=shared,path={spec.shared_dir},security_model=none,multidevs=remap",
        "-device",
        f"virtio-9p-pci,fsdev=shared,mount_tag={SHARE_TAG}",
    ]


def machine_arg(spec: VMSpec) -> str:
    """``-machine``; under TCG the accelerator is an ``-accel`` option (``accel_args``),
    which alone takes the translation cache size (QEMU refuses both forms at once)."""
    machine = "q35" if spec.accel == "tcg" else f"q35,accel={spec.accel}"
    if spec.memory_backend:
        machine += f",memory-backend={BOOT_MEMORY_ID}"
    return machine


def accel_args(spec: VMSpec) -> list[str]:
    """``-accel tcg`` with the translation cache size, under TCG only (KVM's accelerator
    is in ``-machine``).

    Not with vCPU headroom: QEMU 7.2 splits the cache into regions that the running
    vCPUs take as they fill them, and aborts (``tcg_region_initial_alloc__locked:
    assertion failed``) when a hot-added vCPU finds none left; with a small cache the
    one boot vCPU has taken them all within seconds. QEMU's default (1 GiB) leaves room."""
    if spec.accel != "tcg":
        return []
    sized = spec.tcg_tb_size_mib and spec.max_vcpus <= spec.vcpus
    return ["-accel", f"tcg,tb-size={spec.tcg_tb_size_mib}" if sized else "tcg"]


#: The id of the virtio-balloon device.
BALLOON_ID = "balloon0"


def balloon_args(spec: VMSpec) -> list[str]:
    """A virtio-balloon device used only for free page reporting: the guest reports
    the pages it freed and QEMU discards them, so they return to the host. It never
    inflates by itself, and guest OOM does not wait on it.

    Never with guest RAM mapped private from a file (a template's clone): QEMU 7.2
    discards a reported page of a file-backed RAM block by punching a hole into the
    file itself, which would zero that page for every VM mapping the file."""
    if not spec.free_page_reporting:
        return []
    if spec.memory_file is not None and not spec.memory_file_shared:
        return []
    return ["-device", f"virtio-balloon-pci,id={BALLOON_ID},free-page-reporting=on"]


def migration_args(spec: VMSpec) -> list[str]:
    """A template's clone waits for its state (given over QMP: ``migration.restore``)."""
    return [] if spec.incoming is None else ["-incoming", "defer"]


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
        *memory_backend_args(spec),
        *shared_fs_args(spec),
        *nic_args(spec),
        *accel_args(spec),
        *balloon_args(spec),
        *migration_args(spec),
        *spec.extra_args,
    ]
