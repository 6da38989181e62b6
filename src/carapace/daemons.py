"""Starting a pod's host daemons (QEMU, virtiofsd) the same way: a session of their
own, stdin from /dev/null, stdout and stderr appended to a log file, setup run in the
child before exec (join cgroups, set limits, die with the owner)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
#: capabilities(7): CAP_MKNOD, which makes device nodes.
CAP_MKNOD = 27


def die_with_parent() -> None:
    """In a child before exec: be killed when the process that forked it dies."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def drop_capabilities(*caps: int) -> Callable[[], None]:
    """In a child before exec: take ``caps`` out of its bounding set, so the program
    it executes (as root) never has them (QEMU's 9p server without CAP_MKNOD cannot
    make a device node on the host for the guest)."""

    def drop() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in caps:
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")

    return drop


async def spawn_logged(
    argv: Sequence[str],
    log_path: Path,
    pre_exec: Callable[[], None],
    pass_fds: Sequence[int] = (),
) -> asyncio.subprocess.Process:
    """Start ``argv`` with its output appended to ``log_path``."""
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pre_exec,
            pass_fds=tuple(pass_fds),
        )
    finally:
        log_file.close()


def listen_unix(path: Path, backlog: int = 4) -> socket.socket:
    """A unix socket listening at ``path``, mode 0600 before it listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale one (an earlier VM of a run dir, a pool that died)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
