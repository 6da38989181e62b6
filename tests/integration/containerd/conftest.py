"""Fixtures for tests against a private containerd (rig.py): ``containerd`` (session),
``ctr`` and ``cri`` helpers, and a check after every test that it left no task,
container, active snapshot, CRI pod or network namespace behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from .rig import ContainerdRig, CriClient, netns_names

CtrFn = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def containerd() -> Iterator[ContainerdRig]:
    if os.geteuid() != 0:
        pytest.skip("the test containerd needs root")
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd/ctr not installed (scripts/install-deps.sh installs them)")
    rig = ContainerdRig()
    rig.start()
    try:
        yield rig
    finally:
        problems = rig.stop()
    assert not problems, f"stopping the test containerd: {problems}"


@pytest.fixture(autouse=True)
def containerd_left_clean(
    containerd: ContainerdRig, request: pytest.FixtureRequest
) -> Iterator[None]:
    """Each test removes what it created in containerd; anything left is removed and
    fails the test (before the parent's nothing_leaked looks at the mounts)."""
    netns_before = netns_names()
    yield
    left = containerd.inventory()
    if left:
        containerd.remove_all()
    new_netns = sorted(netns_names() - netns_before)
    assert not left and not new_netns, (
        f"{request.node.name} left behind in containerd: {left}; network namespaces: {new_netns}"
    )


@pytest.fixture
def ctr(containerd: ContainerdRig) -> CtrFn:
    """``ctr(*args, namespace="default", check=True)`` against the test containerd."""
    return containerd.ctr


@pytest.fixture
def cri(containerd: ContainerdRig) -> Iterator[CriClient]:
    """CRI v1 runtime and image service stubs for the test containerd."""
    client = containerd.cri()
    yield client
    client.close()
