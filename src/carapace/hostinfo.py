"""Facts about the host the resource policy needs (read from /proc and /sys)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from carapace.resources import usable_cpus as _usable_cpus

ISOLATED_CPUS = Path("/sys/devices/system/cpu/isolated")
FILE_MAX = Path("/proc/sys/fs/file-max")
NR_OPEN = Path("/proc/sys/fs/nr_open")


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text()
    except OSError:
        return default


def usable_cpus() -> int:
    """CPUs this process may run on, isolated cores excluded."""
    return max(1, _usable_cpus(os.sched_getaffinity(0), _read(ISOLATED_CPUS)))


def file_max() -> int:
    """fs.file-max: the most open files the whole system allows."""
    text = _read(FILE_MAX).strip()
    return int(text) if text.isdigit() else 0


def nofile_cap() -> int:
    """The highest RLIMIT_NOFILE a child of ours can get: our hard limit (a child cannot
    raise it here) and fs.nr_open."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nr_open = _read(NR_OPEN).strip()
    caps = [c for c in (hard, int(nr_open) if nr_open.isdigit() else -1) if c > 0]
    return min(caps) if caps else 1024


def memory_total() -> int:
    """The host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


#: /proc/1/ns/<name> for each OCI namespace type.
_NS_FILE = {"network": "net", "ipc": "ipc", "pid": "pid", "uts": "uts", "mount": "mnt"}


def is_host_namespace(ns_type: str, path: str) -> bool:
    """Whether ``path`` is the host's own namespace of that type: init's, or (where
    init's cannot be read) the runtime's, which runs in the host's namespaces."""
    try:
        return is_host_namespace_file(ns_type, os.stat(path))
    except OSError:
        return False


def is_host_namespace_file(ns_type: str, st: os.stat_result) -> bool:
    """``is_host_namespace`` for a namespace file already stat'ed (or fstat'ed)."""
    name = _NS_FILE.get(ns_type)
    if name is None:
        return False
    for host in (f"/proc/1/ns/{name}", f"/proc/self/ns/{name}"):
        try:
            b = os.stat(host)
        except OSError:
            continue
        return (st.st_dev, st.st_ino) == (b.st_dev, b.st_ino)
    return False
