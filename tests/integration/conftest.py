"""Integration tests: real VMs (QEMU), real crun in the guest, real mounts.

One sandbox is shared by the tests that can share one (booting costs seconds under
TCG); a fixture checks after every test that nothing new was left behind: no QEMU
process, no run dir, no mount of carapace's, no sandbox cgroup on the host, no tap or
tc redirect of carapace's on the host or in a namespace under /var/run/netns, no
virtiofsd.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import carapace
from carapace.config import load_config
from carapace.errors import CarapaceError
from carapace.image.builder import ImageBuilder
from carapace.network.tcfilter import traces, traces_here

from .procs import is_carapace_shim, processes

REPO = Path(__file__).resolve().parents[2]
CARAPACE = str(REPO / ".venv" / "bin" / "carapace")
RUN_ROOT = Path(load_config().runtime.run_dir)

pytestmark = pytest.mark.vm


def qemu_pids() -> set[int]:
    """Live QEMU processes. A zombie (no command line) is not counted: a QEMU whose
    owner was killed is reparented to init, which reaps it in its own time."""
    return {pid for pid, argv in processes() if b"qemu-system" in argv[0]}


def virtiofsd_pids() -> set[int]:
    """Live virtiofsd processes (a pod's daemon and its namespaced child), carapace's or
    not: the check is machine-wide, as for QEMU."""
    return {pid for pid, argv in processes() if argv[0].endswith(b"virtiofsd")}


def run_dirs() -> set[str]:
    return {p.name for p in RUN_ROOT.iterdir()} if RUN_ROOT.is_dir() else set()


def carapace_mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f if "carapace" in line.split()[1]}


def shim_pids() -> set[int]:
    """containerd-shim-carapace-v2 daemons (the serving ones, not start/delete calls)."""
    return {
        pid
        for pid, argv in processes()
        if is_carapace_shim(argv) and b"start" not in argv and b"delete" not in argv
    }


def host_cgroups() -> set[str]:
    """Sandbox cgroups on the host: [<hierarchy>/]carapace (itself too: it goes with
    the last sandbox in it) and carapace/<id>, or
    <pod cgroup>/carapace-sandbox-<id> or <pod cgroup>/carapace_<id> a few levels down."""
    root = Path("/sys/fs/cgroup")
    patterns = ["*/carapace", "carapace", "*/carapace/*", "carapace/*"] + [
        "*/" * depth + name
        for depth in range(1, 6)
        for name in ("carapace-sandbox-*", "carapace_*")
    ]
    return {str(p) for pattern in patterns for p in root.glob(pattern) if p.is_dir()}


def network_traces() -> set[str]:
    """carapace's taps (``tapN_carapace``) and its tc redirects (an ingress qdisc holding
    only carapace's mirred filters), on the host and in every namespace under
    /var/run/netns."""
    found = traces_here("host: ")
    netns_dir = Path("/var/run/netns")
    for path in sorted(netns_dir.iterdir()) if netns_dir.is_dir() else []:
        try:
            found |= traces(str(path))
        except CarapaceError:  # not a namespace (any more)
            continue
    return found


def stand_in_pids() -> set[int]:
    """The runc command line's stand-in processes (and calls of it still running): a
    container's ends with it."""
    return {
        pid for pid, argv in processes() if any(a.endswith(b"carapace-runtime") for a in argv[:2])
    }


Resources = tuple[set[int], set[str], set[str], set[int], set[str], set[str], set[int], set[int]]


def resources() -> Resources:
    return (
        qemu_pids(),
        run_dirs(),
        carapace_mounts(),
        shim_pids(),
        host_cgroups(),
        network_traces(),
        virtiofsd_pids(),
        stand_in_pids(),
    )


@pytest.fixture(scope="session", autouse=True)
def guest_image() -> None:
    cfg = load_config()
    if ImageBuilder(cfg.image_dir).current() is None:
        pytest.fail(f"no guest image in {cfg.image_dir}: run `make image` (make test does)")


@pytest.fixture(autouse=True)
def nothing_leaked(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, no QEMU process, run dir, mount, shim, host cgroup, tap or tc
    redirect, virtiofsd or stand-in of the runc command line exists that did not before.
    (The check is machine-wide: run one test session at a time.)"""
    before = resources()
    yield
    after = resources()
    leaked = [sorted(a - b) for a, b in zip(after, before, strict=True)]  # type: ignore[operator]
    assert leaked == [[]] * 8, (
        f"{request.node.name} left behind qemu pids / run dirs / mounts / shims / host "
        f"cgroups / taps and tc redirects / virtiofsd pids / runc command line stand-ins: "
        f"{leaked}"
    )


@pytest.fixture(scope="session")
def shared_sandbox() -> Iterator[carapace.Sandbox]:
    with carapace.Sandbox(cpus=1, memory="1G") as sb:
        yield sb
    # the session's sandbox is gone once closed
    assert not (RUN_ROOT / sb.id).exists()
    assert sb.qemu_pid not in qemu_pids()


def host_kernel() -> str:
    return os.uname().release
