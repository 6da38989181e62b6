"""The cgroup v2 driver (see ``driver`` for the handle and the base class)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from carapace.errors import HostError

from . import files
from .driver import (
    DEFAULT_ROOT,
    CgroupDriver,
    CgroupHandle,
    check_relative_path,
)
from .files import Version
from .fs import CgroupFs


class CgroupV2(CgroupDriver):
    """cgroup v2: <root>/<path>; the controllers needed are enabled in each ancestor's
    cgroup.subtree_control on the way down."""

    version: Version = "v2"

    def __init__(self, root: str = DEFAULT_ROOT, fs: CgroupFs | None = None) -> None:
        super().__init__(root, fs)
        self._enable: set[str] = set()

    def member_dirs(self, where: dict[str, str], controllers: Iterable[str]) -> list[str]:
        if "" not in where:
            return []
        return [os.path.normpath(os.path.join(self.root, where[""].lstrip("/")))]

    def create(self, path: str, controllers: Iterable[str], own_parents: int = 0) -> CgroupHandle:
        rel = check_relative_path(path)
        names = {files.controller_name("v2", c) for c in controllers}
        created: list[str] = []
        self._enable = names
        try:
            leaf = self._mkdirs(self.root, rel, created, own_parents)[-1]
        except BaseException:
            self._undo(created)
            raise
        finally:
            self._enable = set()
        return CgroupHandle(self, rel, {n: leaf for n in sorted(names)} or {"": leaf}, created)

    def _before_mkdir(self, parent: str) -> None:
        self.enable_controllers(parent, self._enable)

    def enable_controllers(self, directory: str, names: set[str]) -> None:
        """Make ``names`` available to ``directory``'s children."""
        if not names:
            return
        available = files.parse_controllers(
            self.fs.read(os.path.join(directory, "cgroup.controllers"))
        )
        if names - available:
            raise HostError(
                f"cgroup v2 controller(s) {', '.join(sorted(names - available))} not available "
                f"in {directory} (cgroup.controllers: {' '.join(sorted(available)) or 'none'})"
            )
        control = os.path.join(directory, "cgroup.subtree_control")
        missing = names - files.parse_controllers(self.fs.read(control))
        if missing:
            self.fs.write(control, files.subtree_control_write(missing))

    def add_threads(self, handle: CgroupHandle, tids: list[int], child: str) -> None:
        leaf = handle.leaves()[0]
        child_dirs = handle.children.get(child)
        if child_dirs is None:
            child_dir = self._mkdirs(leaf, child, handle.created)[-1]
            type_file = os.path.join(child_dir, "cgroup.type")
            if self.fs.read(type_file).strip() != "threaded":
                self.fs.write(type_file, "threaded")
            threaded = {c for c in handle.dirs if c in files.THREADED_CONTROLLERS_V2}
            # The parent is now "domain threaded": threaded controllers may be enabled
            # for its children although it holds processes.
            self.enable_controllers(leaf, threaded)
            child_dirs = {c: child_dir for c in sorted(threaded)} or {"": child_dir}
            handle.children[child] = child_dirs
        directory = next(iter(child_dirs.values()))
        for tid in tids:
            self.fs.write(os.path.join(directory, files.threads_file("v2")), str(tid))
