"""The thin host layer under the cgroup drivers: the only code that touches cgroupfs.

Unit tests substitute a subclass that does on a temporary tree what the kernel does
on cgroupfs (interface files appear on mkdir, rmdir refuses a populated cgroup).
"""

from __future__ import annotations

import os

from carapace.errors import HostError


class CgroupFs:
    """Directory and file operations on a cgroup hierarchy, errors made readable."""

    def mkdir(self, path: str) -> bool:
        """Create ``path``; True if this call created it, False if it existed."""
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not os.path.isdir(path):
                raise HostError(
                    f"cannot create cgroup {path}: a non-directory is in the way"
                ) from None
            return False
        return True

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def read(self, path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError as exc:
            raise HostError(f"cannot read {path}: {exc.strerror}") from None

    def write(self, path: str, value: str) -> None:
        """One write(2) of ``value``: the kernel takes one line per write."""
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise HostError(f"cannot write {value!r} to {path}: {exc.strerror}") from None

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except OSError as exc:
            raise HostError(f"cannot list {path}: {exc.strerror}") from None

    def subdirs(self, path: str) -> list[str]:
        """Child cgroups of ``path`` (empty if it is gone)."""
        try:
            return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
