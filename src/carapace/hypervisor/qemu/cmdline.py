"""The QEMU command line for a pod VM (pure: a VMSpec in, an argv list out)."""

from __future__ import annotations

from carapace.hypervisor import BASE_KERNEL_PARAMS, VMSpec

AGENT_PORT_NAME = "carapace.agent"
SHARE_TAG = "carapace"


def qemu_argv(binary: str, spec: VMSpec) -> list[str]:
    cpu = "host" if spec.accel == "kvm" else "max"
    params = BASE_KERNEL_PARAMS + (" " + spec.kernel_params if spec.kernel_params else "")
    return [
        binary,
        "-name",
        f"carapace-{spec.name},debug-threads=on",
        "-machine",
        f"q35,accel={spec.accel}",
        "-cpu",
        cpu,
        "-smp",
        f"{spec.vcpus}",
        "-m",
        f"{spec.memory_mib}M",
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
        "-serial",
        f"file:{spec.console_log}",
        "-qmp",
        f"unix:{spec.qmp_socket},server=on,wait=off",
        "-pidfile",
        str(spec.pid_file),
        "-device",
        "virtio-serial-pci,id=serial0",
        "-chardev",
        f"socket,id=agent,path={spec.agent_socket},server=on,wait=off",
        "-device",
        f"virtserialport,bus=serial0.0,chardev=agent,name={AGENT_PORT_NAME}",
        "-fsdev",
        f"local,id=shared,path={spec.shared_dir},security_model=none,multidevs=remap",
        "-device",
        f"virtio-9p-pci,fsdev=shared,mount_tag={SHARE_TAG}",
        *spec.extra_args,
    ]
