"""A hostile guest (issue 14): the agent's test double (carapace.guest.hostile, switched on
by a kernel parameter only the host sets) floods the serial console with 50 MiB; the
console log on the host stays under its cap the whole time, its tail still reads, and
the pod still works. (The shim's side, through containerd: containerd/test_hostile_shim.py.)
And every socket of a pod is 0600 whatever the umask."""

from __future__ import annotations

import os
import stat
import time

import carapace
from carapace.config import load_config
from carapace.guest import hostile
from carapace.hypervisor.console import CONSOLE_LOG_MAX, console_tail, older

FLOOD_TIMEOUT = 600.0


def test_a_console_flood_stays_under_the_cap() -> None:
    config = load_config()
    config.hypervisor.kernel_params = "carapace.hostile=console-flood"
    with carapace.Sandbox(cpus=1, memory="1G", config=config) as sb:
        log = sb.run_dir / "console.log"
        peak = 0
        deadline = time.monotonic() + FLOOD_TIMEOUT
        while hostile.CONSOLE_DONE not in (tail := console_tail(log, 5)):
            peak = max(peak, sum(p.stat().st_size for p in (log, older(log)) if p.exists()))
            assert peak <= CONSOLE_LOG_MAX, f"the console log grew to {peak} bytes"
            assert time.monotonic() < deadline, f"no end of the flood in sight: {tail}"
            time.sleep(0.5)
        written = int(tail.split(hostile.CONSOLE_DONE)[1].split()[0])
        assert written >= hostile.CONSOLE_FLOOD_MIB << 20
        assert peak > CONSOLE_LOG_MAX // 2  # it was full: the cap, not the flood, held it
        # the pod is none the worse
        r = sb.run(["echo", "still here"])
        assert (r.exit_code, r.stdout) == (0, b"still here\n")


def test_every_socket_of_a_pod_is_0600_whatever_the_umask() -> None:
    """Item 13: the agent's, QMP's and virtiofsd's sockets are made 0600 by carapace
    before anything can connect, not left to the umask (000 here)."""
    old = os.umask(0)
    try:
        with carapace.Sandbox(cpus=1, memory="1G") as sb:
            sockets = {
                p.name: stat.S_IMODE(p.lstat().st_mode)
                for p in sb.run_dir.iterdir()
                if stat.S_ISSOCK(p.lstat().st_mode)
            }
            assert sb.run(["true"]).exit_code == 0
    finally:
        os.umask(old)
    assert {"agent.sock", "qmp.sock", "virtiofs.sock"} <= set(sockets), sockets
    assert set(sockets.values()) == {0o600}, sockets
