"""The default OCI runtime spec `carapace run` builds (a bundle is read by
``carapace.oci.bundle.Bundle.load``)."""

from __future__ import annotations

from typing import Any

from carapace.errors import InvalidArgument
from carapace.protocols import contract

DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_env(items: list[str]) -> list[str]:
    """Check KEY=VALUE environment entries."""
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key or any(c.isspace() for c in key):
            raise InvalidArgument(f"--env {item!r}: expected KEY=VALUE with a non-empty KEY")
    return items


def process_spec(
    args: list[str], env: list[str] | None = None, cwd: str = "/", terminal: bool = False
) -> dict[str, Any]:
    if not args:
        raise InvalidArgument("no command given; accepted: a command and its arguments")
    if not cwd.startswith("/"):
        raise InvalidArgument(f"--workdir {cwd!r}: must be an absolute path")
    envs = [DEFAULT_PATH, "TERM=xterm" if terminal else "TERM=dumb", *parse_env(env or [])]
    caps = list(DEFAULT_CAPABILITIES)
    return {
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": list(args),
        "env": envs,
        "cwd": cwd,
        "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }


def default_spec(
    args: list[str],
    env: list[str] | None = None,
    cwd: str = "/",
    terminal: bool = False,
    hostname: str = "carapace",
) -> dict[str, Any]:
    """A spec like `crun spec` writes, for running ``args`` in a rootfs."""
    return {
        "ociVersion": contract.OCI_VERSION,
        "process": process_spec(args, env, cwd, terminal),
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
        ],
        "linux": {
            "namespaces": [
                {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/asound",
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
