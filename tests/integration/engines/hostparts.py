"""What the engine rigs find and remove on the host: the parent cgroup an engine
makes in every hierarchy, removed children first."""

from __future__ import annotations

import contextlib
from pathlib import Path

from carapace.linux import mount_table


def cgroup_parents(name: str) -> set[Path]:
    """``name`` under every cgroup v1 hierarchy (and the v2 mount)."""
    hierarchies = [target for target, fstype in mount_table() if fstype in ("cgroup", "cgroup2")]
    return {Path(target) / name for target in hierarchies}


def rmdir_tree(cgroup: Path) -> None:
    """Remove a cgroup and its (empty) children, children first."""
    for child in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir():
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        cgroup.rmdir()
