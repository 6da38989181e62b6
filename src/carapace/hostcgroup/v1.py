"""The cgroup v1 driver (see ``driver`` for the handle and the base class)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from carapace.errors import HostError

from . import files
from .driver import (
    CgroupDriver,
    CgroupHandle,
    check_relative_path,
)
from .files import Version


class CgroupV1(CgroupDriver):
    """cgroup v1: <root>/<controller>/<path>; controllers co-mounted ('cpu,cpuacct')
    share one directory."""

    version: Version = "v1"

    def hierarchy(self, controller: str) -> str:
        """The mount directory of ``controller`` (``<root>/<controller>`` or a co-mount
        such as ``<root>/cpu,cpuacct``)."""
        direct = os.path.join(self.root, controller)
        if self.fs.isdir(direct):
            return direct
        for name in sorted(self.fs.listdir(self.root)):
            if controller in name.split(",") and self.fs.isdir(os.path.join(self.root, name)):
                return os.path.join(self.root, name)
        raise HostError(
            f"no cgroup v1 hierarchy for the {controller} controller under {self.root} "
            f"(found: {', '.join(sorted(self.fs.listdir(self.root))) or 'nothing'})"
        )

    def member_dirs(self, where: dict[str, str], controllers: Iterable[str]) -> list[str]:
        # co-mounted controllers (cpu and cpuacct behind symlinks) are one directory
        dirs = {
            os.path.realpath(os.path.join(self.hierarchy(c), where[c].lstrip("/")))
            for c in controllers
            if c in where
        }
        return sorted(dirs)

    def create(self, path: str, controllers: Iterable[str], own_parents: int = 0) -> CgroupHandle:
        rel = check_relative_path(path)
        names: list[str] = []
        for c in controllers:
            n = files.controller_name("v1", c)
            if n not in names:
                names.append(n)
        if "cpu" in names and "cpuacct" not in names:
            try:
                self.hierarchy("cpuacct")
                names.append("cpuacct")
            except HostError:
                pass
        by_mount: dict[str, list[str]] = {}
        for n in names:
            by_mount.setdefault(os.path.realpath(self.hierarchy(n)), []).append(n)
        created: list[str] = []
        dirs: dict[str, str] = {}
        try:
            for n in names:
                if n in dirs:
                    continue
                top = self.hierarchy(n)
                leaf = self._mkdirs(top, rel, created, own_parents)[-1]
                for same in by_mount[os.path.realpath(top)]:
                    dirs[same] = leaf
        except BaseException:
            self._undo(created)
            raise
        return CgroupHandle(self, rel, dirs, created)

    def _after_mkdir(self, directory: str) -> None:
        # A new cpuset cgroup starts with no CPUs and no memory nodes: nothing could
        # join it. Inherit the parent's, as runc does.
        parent = os.path.dirname(directory)
        for name in ("cpuset.cpus", "cpuset.mems"):
            mine = os.path.join(directory, name)
            if self.fs.exists(mine) and not self.fs.read(mine).strip():
                self.fs.write(mine, self.fs.read(os.path.join(parent, name)).strip())

    def add_threads(self, handle: CgroupHandle, tids: list[int], child: str) -> None:
        targets = {c: d for c, d in handle.dirs.items() if c in files.THREADED_CONTROLLERS_V1}
        if not targets:
            raise HostError(
                f"cgroup {handle.path} has none of the controllers that place single "
                f"threads ({', '.join(sorted(files.THREADED_CONTROLLERS_V1))})"
            )
        child_dirs = handle.children.setdefault(child, {})
        for c, d in sorted(targets.items()):
            if c not in child_dirs:
                child_dirs[c] = self._mkdirs(d, child, handle.created)[-1]
        for d in sorted(set(child_dirs.values())):
            for tid in tids:
                self.fs.write(os.path.join(d, files.threads_file("v1")), str(tid))
