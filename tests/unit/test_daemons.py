"""Starting a pod's host daemons (carapace.daemons): without CAP_MKNOD a root child
cannot make a device node, and still makes a FIFO."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from carapace.daemons import CAP_MKNOD, drop_capabilities


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_MKNOD to lose)")
def test_a_child_without_cap_mknod_cannot_make_a_device_node(tmp_path: Path) -> None:
    script = f"mknod {tmp_path}/sda b 8 0; echo dev=$?; mkfifo {tmp_path}/fifo; echo fifo=$?"
    before = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert "dev=0" in before.stdout  # root can, without the drop
    os.unlink(tmp_path / "sda")
    os.unlink(tmp_path / "fifo")
    after = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=drop_capabilities(CAP_MKNOD),
    )
    assert "dev=1" in after.stdout and "Operation not permitted" in after.stderr
    assert "fifo=0" in after.stdout
    assert not (tmp_path / "sda").exists()
