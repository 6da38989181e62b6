"""The pod's virtio-fs daemon: QEMU's virtiofsd serving the share to the VM.

One daemon per pod, started before QEMU on a listening socket carapace opens (handed
over as ``--fd``, so QEMU can connect the moment it starts and nobody else can bind
the path first). It is confined by its own sandbox: new mount, pid and network
namespaces with the share as its root (``sandbox=namespace``) and a seccomp filter;
without CAP_MKNOD (``modcaps=-mknod``) the guest cannot make a device node on the
host; it runs in the sandbox's host cgroup and dies with its owner. It exits by itself
when QEMU closes the connection. ``state.release`` kills what a dead owner left,
found by the share it serves (``source=`` on its command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from carapace.daemons import die_with_parent, spawn_logged
from carapace.errors import NotFound

#: Debian's virtiofsd (qemu-system-common 7.2; Debian 12 has no separate package).
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def virtiofsd_argv(binary: str, source: Path, fd: int) -> list[str]:
    """The daemon's command line (pure)."""
    return [
        binary,
        f"--fd={fd}",
        "-o",
        f"source={source}",
        # metadata and dentries are trusted for 1 s: a file the host changes (a
        # configmap swapped in by kubelet) is seen within that
        "-o",
        "cache=auto",
        "-o",
        "sandbox=namespace",
        "-o",
        "modcaps=-mknod",
        "-o",
        "no_posix_lock",
        "-o",
        "log_level=warn",
        # the limit is set before exec (the default would raise it past a hard cap)
        "--rlimit-nofile=0",
    ]


def is_daemon_of(argv: list[bytes], source: Path) -> bool:
    """Whether a command line is a virtiofsd serving ``source``."""
    return bool(argv) and argv[0].endswith(b"virtiofsd") and f"source={source}".encode() in argv


def daemons_of(source: Path) -> list[int]:
    """Pids of every virtiofsd serving ``source`` (its namespaced child too)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if is_daemon_of(argv, source):
            pids.append(int(entry))
    return pids


def kill_daemons(source: Path, wait: float = 5.0) -> list[int]:
    """SIGKILL every virtiofsd serving ``source``; returns those still alive after
    ``wait`` seconds."""
    pids = daemons_of(source)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while (left := daemons_of(source)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


class Virtiofsd:
    """One running virtiofsd."""

    def __init__(
        self,
        binary: str,
        source: Path,
        socket_path: Path,
        log_path: Path,
        die_with_owner: bool = True,
    ) -> None:
        self.source = source
        self.socket_path = socket_path
        self.log_path = log_path
        self.binary = binary
        self.die_with_owner = die_with_owner
        #: Run in the child between fork and exec (join cgroups), in order.
        self.pre_exec: list[Callable[[], None]] = []
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def _pre_exec(self) -> None:
        if self.die_with_owner:
            die_with_parent()
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        for fn in self.pre_exec:
            fn()

    async def start(self) -> int:
        """Open the socket, start the daemon on it; returns its pid."""
        if not os.access(self.binary, os.X_OK):
            raise NotFound(
                f"virtiofsd {self.binary} not found; install qemu-system-common or set "
                '[hypervisor] shared_fs = "virtio-9p"'
            )
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(1)
            fd = listener.fileno()
            self.proc = await spawn_logged(
                virtiofsd_argv(self.binary, self.source, fd), self.log_path, self._pre_exec, [fd]
            )
        finally:
            listener.close()
        return self.proc.pid

    async def wait(self) -> int:
        """Wait until the daemon exits; returns its exit status."""
        assert self.proc is not None
        return await self.proc.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    async def stop(self, timeout: float = 2.0) -> None:
        """Wait for the daemon to exit (it does when QEMU is gone), then kill it and
        its namespaced child."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        await asyncio.to_thread(kill_daemons, self.source)
