"""The QEMU command line of a pod VM (carapace.hypervisor.qemu.cmdline)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from carapace.hypervisor import BASE_KERNEL_PARAMS, VMSpec
from carapace.hypervisor.qemu.channels import ChannelFds
from carapace.hypervisor.qemu.cmdline import SECCOMP_SANDBOX, qemu_argv
from carapace.protocols.contract import AGENT_PORT_NAME, SHARE_TAG

QEMU = "/usr/bin/qemu-system-x86_64"
#: The fds of the sockets carapace made for QEMU (channels.py).
FDS = ChannelFds(agent=21, qmp=22, console=23)


def make_spec(tmp_path: Path, **kw: object) -> VMSpec:
    args: dict[str, object] = {
        "name": "sb-1",
        "run_dir": tmp_path / "run" / "sb-1",
        "kernel": tmp_path / "guest" / "vmlinux",
        "initrd": tmp_path / "guest" / "initrd.img",
        "vcpus": 2,
        "memory_mib": 768,
        "accel": "kvm",
        "shared_dir": tmp_path / "run" / "sb-1" / "shared",
    }
    args.update(kw)
    return VMSpec(**args)  # type: ignore[arg-type]


def values(argv: list[str], flag: str) -> list[str]:
    """The value after each occurrence of ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def value(argv: list[str], flag: str) -> str:
    vs = values(argv, flag)
    assert len(vs) == 1, f"{flag} given {len(vs)} times: {vs}"
    return vs[0]


def opts(v: str) -> tuple[str, dict[str, str]]:
    """'driver,k=v,k2=v2' -> ('driver', {k: v, k2: v2}); a bare first element is the driver."""
    first, *rest = v.split(",")
    out = {}
    if "=" in first:
        rest.insert(0, first)
        first = ""
    for item in rest:
        k, _, val = item.partition("=")
        out[k] = val
    return first, out


def test_argv_is_a_list_of_strings(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path), FDS)
    assert isinstance(argv, list)
    assert all(isinstance(a, str) for a in argv)
    assert argv[0] == QEMU
    # no shell string: every option is its own element
    assert "-machine" in argv and "-kernel" in argv
    assert not any(a.startswith("-machine ") for a in argv)


@pytest.mark.parametrize(("accel", "cpu"), [("kvm", "host"), ("tcg", "max")])
def test_machine_accel_and_cpu(tmp_path: Path, accel: str, cpu: str) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, accel=accel), FDS)
    machine, mopts = opts(value(argv, "-machine"))
    assert machine == "q35"
    # TCG's accelerator is its own -accel option (it carries the translation cache size)
    accels = [mopts["accel"]] if accel == "kvm" else [opts(a)[0] for a in values(argv, "-accel")]
    assert accels == [accel]
    assert "accel" not in mopts or accel == "kvm"
    assert value(argv, "-cpu") == cpu


def test_smp_and_memory(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, vcpus=3, memory_mib=1536), FDS)
    assert value(argv, "-smp") == "3"
    assert value(argv, "-m") == "1536M"


def test_kernel_and_initrd(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = qemu_argv(QEMU, spec, FDS)
    assert value(argv, "-kernel") == str(spec.kernel)
    assert value(argv, "-initrd") == str(spec.initrd)


def chardevs(argv: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
    return {o["id"]: (backend, o) for backend, o in map(opts, values(argv, "-chardev"))}


def test_agent_channel(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = qemu_argv(QEMU, spec, FDS)
    backend, copts = chardevs(argv)["agent"]
    assert backend == "socket"
    # carapace's listening socket (0600, made before QEMU): QEMU makes no socket file
    assert copts == {"id": "agent", "fd": "21", "server": "on", "wait": "off"}
    devices = [opts(d) for d in values(argv, "-device")]
    ports = [o for drv, o in devices if drv == "virtserialport"]
    assert len(ports) == 1
    assert ports[0]["name"] == AGENT_PORT_NAME == "carapace.agent"
    assert ports[0]["chardev"] == copts["id"]
    # the port sits on the virtio-serial controller that is created
    serial = [o for drv, o in devices if drv == "virtio-serial-pci"]
    assert len(serial) == 1
    assert ports[0]["bus"] == serial[0]["id"] + ".0"


def test_shared_dir(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = qemu_argv(QEMU, spec, FDS)
    driver, fopts = opts(value(argv, "-fsdev"))
    assert driver == "local"
    assert fopts["path"] == str(spec.shared_dir)
    assert fopts["security_model"] == "none"
    devices = [opts(d) for d in values(argv, "-device")]
    nine = [o for drv, o in devices if drv == "virtio-9p-pci"]
    assert len(nine) == 1
    assert nine[0]["mount_tag"] == SHARE_TAG == "carapace"
    assert nine[0]["fsdev"] == fopts["id"]


def test_virtio_fs_share_and_shared_guest_memory(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, shared_fs="virtio-fs", max_memory_mib=768 + 1024)
    argv = qemu_argv(QEMU, spec, FDS)
    assert "-fsdev" not in argv
    backend, bopts = opts(value(argv, "-object"))
    assert backend == "memory-backend-memfd"
    assert bopts == {"id": "ram0", "size": "768M", "share": "on"}
    _, mopts = opts(value(argv, "-machine"))
    assert mopts["memory-backend"] == "ram0"
    assert value(argv, "-m") == "size=768M,slots=16,maxmem=1792M"
    chardevs = [opts(c) for c in values(argv, "-chardev")]
    fs_char = [o for drv, o in chardevs if o.get("id") == "virtiofs"]
    assert fs_char == [{"id": "virtiofs", "path": str(spec.run_dir / "virtiofs.sock")}]
    devices = [opts(d) for d in values(argv, "-device")]
    fs = [o for drv, o in devices if drv == "vhost-user-fs-pci"]
    assert fs == [
        {"id": "virtiofs0", "chardev": "virtiofs", "tag": SHARE_TAG, "queue-size": "1024"}
    ]
    assert spec.shares_memory and not make_spec(tmp_path).shares_memory


def test_console_qmp_and_pidfile(tmp_path: Path) -> None:
    """The console and QMP are on sockets carapace made and passed (no path, no
    ``-serial file:`` growing without bound, no ``-qmp unix:`` QEMU would create)."""
    spec = make_spec(tmp_path)
    argv = qemu_argv(QEMU, spec, FDS)
    devs = chardevs(argv)
    assert value(argv, "-serial") == "chardev:console"
    assert devs["console"] == ("socket", {"id": "console", "fd": "23", "server": "off"})
    assert value(argv, "-mon") == "chardev=qmp,mode=control"
    assert devs["qmp"] == ("socket", {"id": "qmp", "fd": "22", "server": "on", "wait": "off"})
    assert "-qmp" not in argv
    assert not any("path=" in c and "id=virtiofs" not in c for c in values(argv, "-chardev"))
    assert value(argv, "-pidfile") == str(spec.run_dir / "qemu.pid")


def test_qemu_runs_under_its_seccomp_sandbox(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path), FDS)
    assert value(argv, "-sandbox") == SECCOMP_SANDBOX
    assert opts(SECCOMP_SANDBOX) == (
        "on",
        {
            "obsolete": "deny",
            "elevateprivileges": "deny",
            "spawn": "deny",
            "resourcecontrol": "deny",
        },
    )
    assert "-sandbox" not in qemu_argv(QEMU, make_spec(tmp_path, seccomp_sandbox=False), FDS)


def test_name_identifies_the_sandbox(tmp_path: Path) -> None:
    # sandbox.state relies on this to recognise its QEMU process
    argv = qemu_argv(QEMU, make_spec(tmp_path, name="abc"), FDS)
    assert value(argv, "-name").startswith("carapace-abc,")


def test_no_defaults_and_no_reboot(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path), FDS)
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert argv.count(flag) == 1, flag


def test_kernel_params(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path), FDS)
    append = value(argv, "-append")
    assert append == BASE_KERNEL_PARAMS
    assert "console=ttyS0" in append.split()


def test_extra_kernel_params(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, kernel_params="loglevel=7 carapace.debug=1"), FDS)
    params = value(argv, "-append").split()
    assert "console=ttyS0" in params
    assert params[-2:] == ["loglevel=7", "carapace.debug=1"]


def test_extra_args_are_appended(tmp_path: Path) -> None:
    extra = ("-device", "virtio-rng-pci", "-S")
    argv = qemu_argv(QEMU, make_spec(tmp_path, extra_args=extra), FDS)
    assert tuple(argv[-3:]) == extra


def test_no_headroom_keeps_the_plain_smp_and_memory(tmp_path: Path) -> None:
    # max at or below the boot size (the default 0 included) means no hotplug
    for max_vcpus, max_mem in ((0, 0), (3, 1536), (2, 1000)):
        spec = make_spec(tmp_path, vcpus=3, memory_mib=1536, max_vcpus=max_vcpus,
                         max_memory_mib=max_mem)  # fmt: skip
        argv = qemu_argv(QEMU, spec, FDS)
        assert value(argv, "-smp") == "3"
        assert value(argv, "-m") == "1536M"
        assert "memhp_default_state=online" not in value(argv, "-append").split()


def test_cpu_headroom_gives_one_socket_per_vcpu(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, vcpus=1, max_vcpus=4), FDS)
    _, smp = opts(value(argv, "-smp"))
    assert smp == {"cpus": "1", "maxcpus": "4", "sockets": "4", "cores": "1", "threads": "1"}
    assert value(argv, "-m") == "768M"  # no memory headroom asked
    assert "memhp_default_state=online" not in value(argv, "-append").split()


def test_memory_headroom_gives_slots_and_aligned_maxmem(tmp_path: Path) -> None:
    argv = qemu_argv(QEMU, make_spec(tmp_path, memory_mib=1024, max_memory_mib=8192), FDS)
    _, mem = opts(value(argv, "-m"))
    assert mem == {"size": "1024M", "slots": "16", "maxmem": "8192M"}
    assert value(argv, "-smp") == "2"
    params = value(argv, "-append").split()
    assert "memhp_default_state=online" in params
    # headroom is whole 128 MiB guest memory blocks above the boot memory
    argv = qemu_argv(QEMU, make_spec(tmp_path, memory_mib=1000, max_memory_mib=1300), FDS)
    assert opts(value(argv, "-m"))[1]["maxmem"] == "1256M"
    # less than one block of room: no headroom at all
    argv = qemu_argv(QEMU, make_spec(tmp_path, memory_mib=1000, max_memory_mib=1100), FDS)
    assert value(argv, "-m") == "1000M"


def test_user_kernel_params_stay_last_with_hotplug(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, memory_mib=512, max_memory_mib=4096, kernel_params="loglevel=7")
    params = value(qemu_argv(QEMU, spec, FDS), "-append").split()
    assert params[-2:] == ["memhp_default_state=online", "loglevel=7"]


def test_nics_each_in_a_root_port_and_free_slots() -> None:
    from carapace.hypervisor import PortForward, TapNic, UserNic

    spec = VMSpec(
        name="n",
        run_dir=Path("/run/c/n"),
        kernel=Path("/k"),
        initrd=Path("/i"),
        vcpus=1,
        memory_mib=1024,
        accel="tcg",
        shared_dir=Path("/run/c/n/shared"),
        nics=(
            TapNic("net0", "02:00:00:00:00:01", 7),
            UserNic("net1", "02:00:00:00:00:02", (PortForward(18080, 80),)),
        ),
        nic_slots=1,
    )
    argv = qemu_argv("qemu", spec, FDS)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    ports = [d for d in devices if d.startswith("pcie-root-port")]
    assert ports == [f"pcie-root-port,id=nicslot{i},chassis={i + 1}" for i in range(3)]
    assert netdevs == ["tap,id=net0,fd=7", "user,id=net1,hostfwd=tcp:127.0.0.1:18080-:80"]
    assert "virtio-net-pci,id=net0-nic,netdev=net0,mac=02:00:00:00:00:01,bus=nicslot0" in devices
    assert "virtio-net-pci,id=net1-nic,netdev=net1,mac=02:00:00:00:00:02,bus=nicslot1" in devices
    assert "-netdev" not in qemu_argv("qemu", replace(spec, nics=(), nic_slots=0), FDS)


# -- VM templates: the RAM backend, the share hot-added, the incoming state ------------


def test_memory_backend_of_a_template_is_its_file_shared(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import memory_backend_args

    mem = tmp_path / "templates" / "k" / "memory"
    spec = make_spec(tmp_path, memory_file=mem, memory_file_shared=True)
    assert memory_backend_args(spec) == [
        "-object",
        f"memory-backend-file,id=ram0,size=768M,mem-path={mem},share=on",
    ]
    argv = qemu_argv(QEMU, spec, FDS)
    assert opts(value(argv, "-object")) == (
        "memory-backend-file",
        {"id": "ram0", "size": "768M", "mem-path": str(mem), "share": "on"},
    )
    assert opts(value(argv, "-machine"))[1]["memory-backend"] == "ram0"


def test_memory_backend_of_a_9p_clone_is_the_file_private(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import memory_backend_args

    mem = tmp_path / "memory"
    spec = make_spec(tmp_path, memory_file=mem, memory_file_shared=False)
    _, bopts = opts(memory_backend_args(spec)[1])
    assert (bopts["mem-path"], bopts["share"]) == (str(mem), "off")


def test_memory_backend_of_a_virtiofs_clone_is_its_memfd_copy(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import memory_backend_args

    spec = make_spec(
        tmp_path,
        shared_fs="virtio-fs",
        memory_file=Path("/proc/self/fd/9"),
        memory_file_shared=True,
        memory_fd=9,
    )
    args = memory_backend_args(spec)
    assert args == [
        "-object",
        "memory-backend-file,id=ram0,size=768M,mem-path=/proc/self/fd/9,share=on",
    ]  # the file wins over the memfd of a cold virtio-fs boot


def test_memory_backend_memfd_for_virtiofs_and_none_otherwise(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import memory_backend_args

    fs = make_spec(tmp_path, shared_fs="virtio-fs")
    assert memory_backend_args(fs) == [
        "-object",
        "memory-backend-memfd,id=ram0,size=768M,share=on",
    ]
    plain = make_spec(tmp_path)
    assert memory_backend_args(plain) == []
    assert not plain.memory_backend
    argv = qemu_argv(QEMU, plain, FDS)
    assert "-object" not in argv
    assert "memory-backend" not in opts(value(argv, "-machine"))[1]
    for accel in ("kvm", "tcg"):
        named = make_spec(tmp_path, accel=accel, memory_file=tmp_path / "m")
        assert named.memory_backend
        machine, mopts = opts(value(qemu_argv(QEMU, named, FDS), "-machine"))
        assert (machine, mopts["memory-backend"]) == ("q35", "ram0")


def test_a_hotplugged_share_leaves_only_its_root_port(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import SHARE_SLOT, shared_fs_args

    spec = make_spec(tmp_path, shared_fs="virtio-fs", hotplug_share=True)
    assert shared_fs_args(spec) == ["-device", "pcie-root-port,id=shareslot,chassis=200"]
    assert SHARE_SLOT == "shareslot"
    argv = qemu_argv(QEMU, spec, FDS)
    devices = [opts(d) for d in values(argv, "-device")]
    assert not [o for drv, o in devices if drv == "vhost-user-fs-pci"]
    assert "virtiofs" not in chardevs(argv)
    assert "-fsdev" not in argv
    # its chassis is none of the NICs' root ports'
    spec = make_spec(tmp_path, shared_fs="virtio-fs", hotplug_share=True, nic_slots=4)
    devices = [opts(d) for d in values(qemu_argv(QEMU, spec, FDS), "-device")]
    chassis = [o["chassis"] for drv, o in devices if drv == "pcie-root-port"]
    assert len(chassis) == len(set(chassis)) == 5


def test_the_share_device_goes_into_its_slot_only_when_hot_added(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import share_device_args

    device = {
        "driver": "vhost-user-fs-pci",
        "id": "virtiofs0",
        "chardev": "virtiofs",
        "tag": SHARE_TAG,
        "queue-size": "1024",
    }
    cold = make_spec(tmp_path, shared_fs="virtio-fs")
    assert share_device_args(cold) == device
    hot = make_spec(tmp_path, shared_fs="virtio-fs", hotplug_share=True)
    assert share_device_args(hot) == {**device, "bus": "shareslot"}


def test_9p_is_on_the_command_line_even_for_a_template(tmp_path: Path) -> None:
    # hotplug_share is for vhost-user-fs only; QEMU's own 9p device is migrated
    argv = qemu_argv(QEMU, make_spec(tmp_path, hotplug_share=True), FDS)
    assert opts(value(argv, "-fsdev"))[0] == "local"
    assert "pcie-root-port,id=shareslot,chassis=200" not in values(argv, "-device")


def test_a_clone_waits_for_its_incoming_state(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import migration_args

    assert migration_args(make_spec(tmp_path)) == []
    spec = make_spec(tmp_path, incoming=tmp_path / "state", extra_args=("-S",))
    assert migration_args(spec) == ["-incoming", "defer"]
    argv = qemu_argv(QEMU, spec, FDS)
    assert value(argv, "-incoming") == "defer"  # the state is given over QMP
    assert str(tmp_path / "state") not in " ".join(argv)
    assert argv[-3:] == ["-incoming", "defer", "-S"]  # extra args stay last


def test_no_balloon_on_ram_mapped_private_from_a_file(tmp_path: Path) -> None:
    from carapace.hypervisor.qemu.cmdline import balloon_args

    balloon = ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    assert balloon_args(make_spec(tmp_path, free_page_reporting=True)) == balloon
    assert balloon_args(make_spec(tmp_path)) == []
    shared = make_spec(
        tmp_path, free_page_reporting=True, memory_file=tmp_path / "m", memory_file_shared=True
    )
    assert balloon_args(shared) == balloon
    assert balloon_args(replace(shared, memory_file_shared=False)) == []
