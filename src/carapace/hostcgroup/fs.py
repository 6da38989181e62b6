"""The thin host layer under the cgroup drivers: the only code that touches cgroupfs.

Unit tests substitute a subclass that does on a temporary tree what the kernel does
on cgroupfs (interface files appear on mkdir, rmdir refuses a populated cgroup).

Another owner may remove a shared parent cgroup (the runtime's own ``carapace``) at
any moment: what that does to a call here (ENOENT; ENODEV from a cgroup the kernel is
removing, seen on cgroup v2) is raised as ``CgroupGone``, so that a creator can retry.
"""

from __future__ import annotations

import errno
import os

from carapace.errors import HostError

#: errno values meaning "this cgroup was removed (or is being removed) meanwhile".
_GONE = (errno.ENOENT, errno.ENODEV)
#: mkdir attempts when the path exists, then does not (another owner removing it).
_MKDIR_ATTEMPTS = 3


class CgroupGone(HostError):
    """A cgroup, or a cgroup a path is in, is gone: removed by another owner meanwhile."""


def _error(message: str, exc: OSError) -> HostError:
    cls = CgroupGone if exc.errno in _GONE else HostError
    return cls(f"{message}: {exc.strerror}")


class CgroupFs:
    """Directory and file operations on a cgroup hierarchy, errors made readable."""

    def mkdir(self, path: str) -> bool:
        """Create ``path``; True if this call created it, False if it existed. Raises
        CgroupGone when its parent is gone (or being removed)."""
        for _ in range(_MKDIR_ATTEMPTS):
            try:
                os.mkdir(path, 0o755)
                return True
            except FileExistsError:
                if os.path.isdir(path):
                    return False
                if os.path.lexists(path):
                    raise HostError(
                        f"cannot create cgroup {path}: a non-directory is in the way"
                    ) from None
                # it existed, then another owner removed it: make it ourselves
            except OSError as exc:
                raise _error(f"cannot create cgroup {path}", exc) from None
        raise CgroupGone(
            f"cannot create cgroup {path}: it existed, then did not, {_MKDIR_ATTEMPTS} times "
            "(created and removed concurrently)"
        )

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def read(self, path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError as exc:
            raise _error(f"cannot read {path}", exc) from None

    def write(self, path: str, value: str) -> None:
        """One write(2) of ``value``: the kernel takes one line per write."""
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise _error(f"cannot write {value!r} to {path}", exc) from None

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
