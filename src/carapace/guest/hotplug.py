"""Onlining hot-plugged CPUs and memory in the guest, through sysfs.

The guest kernel adds a CPU or a memory block when ACPI tells it to, but leaves a
CPU offline (no udev here to online it) and memory offline unless the kernel was
booted with memhp_default_state=online. Hot-removed CPUs are offlined and ejected
by the kernel's ACPI handling itself. Stdlib only; the sysfs root is a parameter so
that tests run on a temporary tree.
"""

from __future__ import annotations

import os
import re

SYSFS_SYSTEM = "/sys/devices/system"
MEMINFO = "/proc/meminfo"
_CPU_DIR = re.compile(r"^cpu(\d+)$")
_MEMORY_DIR = re.compile(r"^memory(\d+)$")


def parse_cpu_list(text: str) -> list[int]:
    """'0-2,4' -> [0, 1, 2, 4] (the kernel's cpulist format; empty: none)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


def online_cpus(root: str = SYSFS_SYSTEM) -> list[int]:
    with open(os.path.join(root, "cpu", "online")) as f:
        return parse_cpu_list(f.read())


def _numbered(directory: str, pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := pattern.match(name))]
    return sorted(found)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, value: str) -> str | None:
    """Write ``value``; returns the error (a block may go online or away meanwhile)."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    return None


class OnlineResult:
    """What one ``online_all`` did. (Not a dataclass: see guest/pod.py.)"""

    def __init__(
        self,
        cpus: list[int],
        memory_blocks: list[int],
        errors: list[str],
        offlined: list[int] | None = None,
    ) -> None:
        self.cpus = cpus  # CPUs onlined by this call
        self.memory_blocks = memory_blocks  # memory blocks onlined by this call
        self.errors = errors  # writes that failed
        self.offlined = offlined if offlined is not None else []  # CPUs taken offline


def online_all(root: str = SYSFS_SYSTEM, max_cpus: int = 0) -> OnlineResult:
    """Online every offline memory block, and offline CPUs until ``max_cpus`` are online
    (0: all of them; lowest ids first). With ``max_cpus``, CPUs beyond it are taken
    offline, highest ids first: how a VM whose hypervisor cannot unplug vCPUs gives
    them back."""
    result = OnlineResult([], [], [])
    cpu_root = os.path.join(root, "cpu")
    cpus = _numbered(cpu_root, _CPU_DIR)
    online = set(online_cpus(root)) if os.path.exists(os.path.join(cpu_root, "online")) else set()
    for n, name in cpus:
        if max_cpus and len(online) >= max_cpus:
            break
        path = os.path.join(cpu_root, name, "online")
        if _read(path) == "0":  # cpu0 has no 'online' file: it is always online
            err = _write(path, "1")
            if err is None:
                result.cpus.append(n)
                online.add(n)
            else:
                result.errors.append(err)
    for n, name in reversed(cpus):
        if not max_cpus or len(online) <= max_cpus:
            break
        path = os.path.join(cpu_root, name, "online")
        if n in online and _read(path) == "1":
            err = _write(path, "0")
            if err is None:
                result.offlined.append(n)
                online.discard(n)
            else:
                result.errors.append(err)
    for n, name in _numbered(os.path.join(root, "memory"), _MEMORY_DIR):
        path = os.path.join(root, "memory", name, "state")
        if _read(path) == "offline":
            err = _write(path, "online")
            if err is None:
                result.memory_blocks.append(n)
            else:
                result.errors.append(err)
    return result


def mem_total_kb(meminfo: str = MEMINFO) -> int:
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0
