"""Containers' cgroups (v2) in the guest: where they are, and what their files say.

crun runs with ``--cgroup-manager cgroupfs`` and each container's spec has
``cgroupsPath: /carapace/<id>``, so a container's cgroup is the directory
``/sys/fs/cgroup/carapace/<id>`` (crun may make child cgroups under it, e.g. for a
container that manages its own sub-cgroups). Reading never fails: a file the kernel
does not have (``memory.peak`` before 5.19), or a cgroup that is already gone, reads
as zero or empty. Stdlib + protobuf only; the parsers are pure.
"""

from __future__ import annotations

import os

from carapace.protocols import agent_pb2 as pb

CGROUP_ROOT = "/sys/fs/cgroup"
#: The cgroup, under the guest's root, that holds one child cgroup per container.
CONTAINERS_PARENT = "carapace"
UINT64_MAX = (1 << 64) - 1


def cgroups_path(container_id: str) -> str:
    """The spec's ``linux.cgroupsPath`` of a container (relative to the cgroup root)."""
    return f"/{CONTAINERS_PARENT}/{container_id}"


def container_cgroup(container_id: str, root: str = CGROUP_ROOT) -> str:
    """The directory of a container's cgroup."""
    return os.path.join(root, CONTAINERS_PARENT, container_id)


def _uint64(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return min(max(value, 0), UINT64_MAX)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``cpu.stat``, ``memory.stat``, ``memory.events``):
    one ``key value`` per line. Lines that are not that (or not integers) are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        value = _uint64(parts[1])
        if value is not None:
            out[parts[0]] = value
    return out


def parse_value(text: str) -> int:
    """A single-value file (``memory.current``, ``memory.max``, ``pids.max``...):
    the number, with ``max`` (no limit) and anything unreadable as 0."""
    value = _uint64(text.strip())
    return 0 if value is None else value


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # missing file, or a cgroup removed while we read it
        return ""


def read_stats(cgroup_dir: str) -> pb.StatsContainerResponse:
    """The StatsContainer answer for the cgroup at ``cgroup_dir``."""

    def value(name: str) -> int:
        return parse_value(_read(os.path.join(cgroup_dir, name)))

    def keyed(name: str) -> dict[str, int]:
        return parse_flat_keyed(_read(os.path.join(cgroup_dir, name)))

    return pb.StatsContainerResponse(
        cpu_stat=keyed("cpu.stat"),
        memory_stat=keyed("memory.stat"),
        memory_events=keyed("memory.events"),
        memory_current=value("memory.current"),
        memory_max=value("memory.max"),
        memory_peak=value("memory.peak"),
        swap_current=value("memory.swap.current"),
        pids_current=value("pids.current"),
        pids_max=value("pids.max"),
    )


def oom_kills(cgroup_dir: str) -> int:
    """The ``oom_kill`` counter of the cgroup's ``memory.events`` (0 if unreadable);
    it counts the kills in the cgroup and its descendants."""
    return parse_flat_keyed(_read(os.path.join(cgroup_dir, "memory.events"))).get("oom_kill", 0)


def parse_procs(text: str) -> list[int]:
    """The pids of a ``cgroup.procs`` file."""
    return [int(p) for p in text.split() if p.isdigit()]


def list_pids(cgroup_dir: str) -> list[int]:
    """Every pid in the cgroup and its descendants, sorted, each once."""
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(cgroup_dir):
        if "cgroup.procs" in files:
            pids.update(parse_procs(_read(os.path.join(dirpath, "cgroup.procs"))))
    return sorted(pids)
