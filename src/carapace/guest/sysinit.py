"""Early system set-up done by the agent when it is PID 1 of the guest.

Runs before anything else: mounts the pseudo filesystems, loads the kernel modules
the image lists for the start (the others when first needed: ``need_modules``),
names the image's modprobe to the kernel, enables cgroup v2 controllers, brings lo
up. Stdlib only (ctypes for mount(2) and finit_module(2), an ioctl for lo), no
subprocess, so it costs milliseconds. The modules a workload needs are not loaded
here: the kernel asks the image's modprobe for them (``carapace.guest.modprobe``).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct

from carapace.guest import MODULE_LIST_DIR, module_list
from carapace.guest.modprobe import KERNEL_MODPROBE, PROGRAM, load_module
from carapace.linux import MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_REC, mount

log = logging.getLogger("carapace.agent")

_libc = ctypes.CDLL(None, use_errno=True)

MODULE_LIST = module_list()
CGROUP_ROOT = "/sys/fs/cgroup"


def load_modules(list_path: str = MODULE_LIST) -> list[str]:
    loaded: list[str] = []
    try:
        with open(list_path) as f:
            paths = [p.strip() for p in f if p.strip()]
    except FileNotFoundError:
        return loaded
    for p in paths:
        load_module(p)
        loaded.append(os.path.basename(p))
    return loaded


#: The on-demand module groups loaded so far.
_groups_loaded: set[str] = set()


def need_modules(group: str) -> None:
    """Load the image's on-demand module group ``group`` (``carapace.guest.module_list``)
    unless it is loaded already; raises OSError if a module does not load."""
    if group in _groups_loaded:
        return
    loaded = load_modules(module_list(group))
    _groups_loaded.add(group)
    if loaded:
        log.info("loaded kernel modules for %s: %s", group, " ".join(loaded))


def need_all_modules(list_dir: str = MODULE_LIST_DIR) -> None:
    """Load every on-demand group the image lists (``carapace.<group>.load``)."""
    for name in sorted(os.listdir(list_dir)):
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "carapace" and parts[2] == "load":
            need_modules(parts[1])


def set_modprobe(program: str = PROGRAM, setting: str = KERNEL_MODPROBE) -> None:
    """Name the image's modprobe as the program the kernel's request_module runs (its
    default, /sbin/modprobe, does not exist: see ``carapace.guest.modprobe``)."""
    if not os.path.exists(program):
        log.warning("no %s in the image: modules load only with the agent's groups", program)
        return
    try:
        with open(setting, "w") as f:
            f.write(program)
    except OSError as e:
        log.warning("cannot set %s to %s: %s", setting, program, e)


def make_root_a_mount() -> None:
    """Put a bind mount of the initramfs over / and chroot into it.

    The initramfs root has no parent mount, so pivot_root(2) (which crun uses to
    enter a container's rootfs) fails with EINVAL under it; under a bind mount of it
    moved onto / it works.
    """
    os.makedirs("/newroot", exist_ok=True)
    mount("/", "/newroot", None, MS_BIND | MS_REC)
    os.chdir("/newroot")
    mount("/newroot", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def early_init() -> None:
    """Mount what a Linux userspace and crun need, load modules, set up cgroup v2."""
    make_root_a_mount()
    nosuid_nodev = MS_NOSUID | MS_NODEV
    mount("proc", "/proc", "proc", nosuid_nodev | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", nosuid_nodev | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=0666")
    mount("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755")
    mount("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777")
    mount("cgroup2", CGROUP_ROOT, "cgroup2", nosuid_nodev | MS_NOEXEC)
    for name, target in (
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ):
        if not os.path.lexists(target):
            os.symlink(name, target)
    load_modules()
    set_modprobe()
    enable_cgroup_controllers(CGROUP_ROOT)
    loopback_up()
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write("carapace")


SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
IFREQ_FLAGS = struct.Struct("16sh22x")  # struct ifreq: name, ifr_flags (40 bytes)


def loopback_up() -> None:
    """Bring lo up: the kernel leaves it down, and containers (which share the VM's
    network namespace) reach their own services on 127.0.0.1 and ::1 through it.
    (One ioctl: cheaper at start than a netlink socket and its parsing.)"""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            got = fcntl.ioctl(s, SIOCGIFFLAGS, IFREQ_FLAGS.pack(b"lo", 0))
            flags = IFREQ_FLAGS.unpack(got)[1]
            if not flags & IFF_UP:
                fcntl.ioctl(s, SIOCSIFFLAGS, IFREQ_FLAGS.pack(b"lo", flags | IFF_UP))
    except OSError as e:
        log.warning("cannot bring lo up: %s", e)


def enable_cgroup_controllers(root: str) -> None:
    """Delegate every available controller from the root to its children."""
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            controllers = f.read().split()
        with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join("+" + c for c in controllers))
    except OSError as e:
        log.warning("cannot enable cgroup controllers: %s", e)


def find_virtio_port(name: str, sysfs: str = "/sys/class/virtio-ports") -> str | None:
    """The /dev node of the virtio-serial port called ``name``, if it exists yet."""
    try:
        ports = os.listdir(sysfs)
    except FileNotFoundError:
        return None
    for port in ports:
        try:
            with open(os.path.join(sysfs, port, "name")) as f:
                if f.read().strip() == name:
                    return f"/dev/{port}"
        except OSError:
            continue
    return None


def power_off() -> None:
    """Power the VM off at once (the agent is PID 1: nothing else shuts it down)."""
    _libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
