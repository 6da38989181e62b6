"""A pod VM's spec for unit tests: the default pod's shape, any field replaced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carapace.hypervisor import VMSpec


def make_spec(**kw: Any) -> VMSpec:
    args: dict[str, Any] = {
        "name": "pod-1",
        "run_dir": Path("/run/carapace/pod-1"),
        "kernel": Path("/var/lib/carapace/guest/vmlinux"),
        "initrd": Path("/var/lib/carapace/guest/initrd.img"),
        "vcpus": 1,
        "memory_mib": 1024,
        "accel": "tcg",
        "shared_dir": Path("/run/carapace/pod-1/shared"),
        "nic_slots": 2,
        "tcg_tb_size_mib": 64,
    }
    args.update(kw)
    return VMSpec(**args)
