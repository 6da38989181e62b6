"""The pod's virtio-fs daemon (carapace.storage.virtiofsd): its command line, how a
leftover daemon is recognised, and a real start on a socket carapace opens."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from carapace.storage.virtiofsd import VIRTIOFSD, Virtiofsd, is_daemon_of, virtiofsd_argv


def test_argv_is_confined_and_serves_the_share_on_the_given_fd() -> None:
    argv = virtiofsd_argv("/usr/lib/qemu/virtiofsd", Path("/run/carapace/p/shared"), 7)
    assert argv[:2] == ["/usr/lib/qemu/virtiofsd", "--fd=7"]
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "source=/run/carapace/p/shared" in options
    assert "sandbox=namespace" in options  # mount, pid, net namespaces; pivot_root
    assert "modcaps=-mknod" in options  # the guest cannot make a device node on the host
    assert "cache=auto" in options
    assert "--rlimit-nofile=0" in argv


def test_a_daemon_is_recognised_by_the_share_it_serves() -> None:
    argv = [a.encode() for a in virtiofsd_argv(VIRTIOFSD, Path("/run/carapace/p/shared"), 3)]
    assert is_daemon_of(argv, Path("/run/carapace/p/shared"))
    assert not is_daemon_of(argv, Path("/run/carapace/q/shared"))
    assert not is_daemon_of(
        [b"/bin/sh", b"source=/run/carapace/p/shared"], Path("/run/carapace/p/shared")
    )
    assert not is_daemon_of([], Path("/x"))


@pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason=f"{VIRTIOFSD} is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd's sandbox needs root")
def test_a_real_daemon_accepts_on_the_socket_and_is_stopped(tmp_path: Path) -> None:
    share = tmp_path / "shared"
    share.mkdir()

    async def life() -> None:
        d = Virtiofsd(VIRTIOFSD, share, tmp_path / "fs.sock", tmp_path / "fs.log", True)
        pid = await d.start()
        assert pid > 0 and d.pid == pid
        assert (tmp_path / "fs.sock").stat().st_mode & 0o777 == 0o600
        # the socket listens before the daemon even runs: a client connects at once
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "fs.sock"))
        c.close()  # a vhost-user client going away ends the daemon
        await asyncio.wait_for(d.wait(), 10)
        await d.stop()
        assert not [p for p in os.listdir("/proc") if p.isdigit() and _serves(p, share)]

    asyncio.run(life())


def _serves(pid: str, share: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return is_daemon_of(f.read().split(b"\0"), share)
    except OSError:
        return False
