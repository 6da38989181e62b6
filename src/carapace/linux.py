"""Thin wrappers of Linux system calls that the stdlib lacks (mount, umount2).

Stdlib only: used on the host and inside the guest.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_SYNCHRONOUS = 16
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2); creates ``target`` (a directory) if missing; raises OSError naming what
    failed."""
    if not os.path.lexists(target):
        os.makedirs(target)
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def bind_mount(
    source: str,
    target: str,
    readonly: bool = False,
    recursive: bool = True,
    readonly_below: bool = True,
    propagation: int = 0,
) -> None:
    """Bind ``source`` at ``target`` (with the mounts below it when ``recursive``),
    nosuid and nodev, read-only when asked: the bind itself, and every mount below it
    unless ``readonly_below`` is false (runc's ``ro``, which is not recursive: the
    mounts below keep their own flags). ``propagation`` (``MS_PRIVATE``, ``MS_SLAVE``;
    0 leaves the clone in its source's peer group) is set on every mount of the clone
    before it is attached: a private clone never sees a mount the host makes later
    under ``source``, a slave clone does. The bind is cloned detached, given its
    attributes, then moved into place (open_tree, mount_setattr, move_mount), so every
    copy that propagates from ``target`` (a guest-visible view, a file daemon's
    namespace) has them too."""
    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    if readonly and readonly_below:
        attrs |= MOUNT_ATTR_RDONLY
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _libc.syscall(
        _SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), source.encode(), ctypes.c_uint(flags)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree {source}: {os.strerror(err)}")
    try:
        what = f"bind of {source}"
        _setattr(fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, attrs, what, propagation)
        if readonly and not readonly_below:
            _setattr(fd, b"", AT_EMPTY_PATH, MOUNT_ATTR_RDONLY, what)
        if not os.path.lexists(target):
            os.makedirs(target)
        rc = _libc.syscall(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(AT_FDCWD),
            target.encode(),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"move_mount {source} to {target}: {os.strerror(err)}")
    finally:
        os.close(fd)


def make_shared(target: str) -> None:
    """Make the mount at ``target`` shared: mounts made below it later propagate to its
    copies (a guest-visible view, a file daemon's namespace)."""
    mount("none", target, None, MS_SHARED)


def make_slave(target: str) -> None:
    """Make the mount at ``target`` a slave: it receives its master's mount events and
    sends none back."""
    mount("none", target, None, MS_SLAVE)


# mount_setattr(2) (Linux 5.12): attributes of a mount and, with AT_RECURSIVE, of
# every mount below it
_SYS_OPEN_TREE = 428  # x86_64 and aarch64 alike (syscalls added after 5.1 share numbers)
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _setattr(
    dirfd: int, path: bytes, flags: int, attr_set: int, what: str, propagation: int = 0
) -> None:
    attr = _MountAttr(attr_set, 0, propagation, 0)
    rc = _libc.syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(dirfd),
        path,
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount_setattr {what}: {os.strerror(err)}")


def mount_setattr(target: str, attr_set: int, recursive: bool = True) -> None:
    """Set mount attributes (``MOUNT_ATTR_*``) on ``target`` and, by default, on every
    mount below it, without following a symlink at ``target``."""
    flags = AT_SYMLINK_NOFOLLOW | (AT_RECURSIVE if recursive else 0)
    _setattr(AT_FDCWD, target.encode(), flags, attr_set, target)


def umount(target: str, lazy: bool = False) -> None:
    rc = _libc.umount2(target.encode(), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escapes in a mount table field (``\\040`` space,
    ``\\011`` tab, ``\\012`` newline, ``\\134`` backslash)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in mount order, unescaped."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and right:
                out.append((unescape_mountinfo(fields[4]), right.split()[0]))
    return out


def is_under(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or below it (by path components, not text)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def is_mountpoint(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    return any(point == path for point, _ in mount_table(mountinfo))


def mounts_under(top: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``top``, the last mounted first."""
    return points_under(mount_table(mountinfo), top)


def points_under(table: list[tuple[str, str]], top: str) -> list[str]:
    """The mount points of ``table`` (``mount_table``'s) at or below ``top``, the last
    mounted first."""
    return [p for p, _ in reversed(table) if is_under(p, top)]


def fs_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The filesystem type of the mount ``path`` is on (the deepest mount holding it)."""
    return fs_type_in(mount_table(mountinfo), path)


def fs_type_in(table: list[tuple[str, str]], path: str) -> str:
    """The filesystem type of the mount of ``table`` (``mount_table``'s) that ``path``
    is on: the deepest one holding it, the last mounted of equals."""
    best, kind = "", ""
    for point, fstype in table:
        if is_under(path, point) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
#: CLONE_NEW* of the namespace kinds ``/proc/PID/ns/<name>`` names.
NAMESPACE_FLAGS = {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def unshare(flags: int) -> None:
    """unshare(2): the calling process leaves the namespaces ``flags`` names for new
    ones (Python 3.11's os has no unshare)."""
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def setns_path(path: str, flags: int) -> None:
    """setns(2) the whole (single-threaded) process into the namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns to {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
