"""The sandbox cgroup below the pod cgroup (seed 001: kata-sandbox-<id>)."""

from __future__ import annotations

import pytest

from carapace.errors import InvalidArgument
from carapace.hostcgroup.cgroupspath import pod_cgroup_path, sandbox_cgroup_path


@pytest.mark.parametrize(
    ("cgroups_path", "prefix", "expected"),
    [
        # "Pod 1: cgroupsPath=/kubepods/pod1; Container 1: /kubepods/pod1/container1"
        ("/kubepods/pod1/container1", "carapace-sandbox-", "kubepods/pod1/carapace-sandbox-sb1"),
        ("/kubepods/pod1/container1", "kata-sandbox-", "kubepods/pod1/kata-sandbox-sb1"),
        ("/default/c1", "carapace-sandbox-", "default/carapace-sandbox-sb1"),  # ctr run
        ("k8s.io/c1", "carapace-sandbox-", "k8s.io/carapace-sandbox-sb1"),  # relative: from /
        (
            "kubepods-besteffort-pod123.slice:cri-containerd:abc",
            "carapace-sandbox-",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod123.slice/"
            "carapace-sandbox-sb1",
        ),
        (None, "carapace-sandbox-", "carapace/sb1"),
        ("", "carapace-sandbox-", "carapace/sb1"),
    ],
)
def test_sandbox_cgroup_is_below_the_pod_cgroup(
    cgroups_path: str | None, prefix: str, expected: str
) -> None:
    assert sandbox_cgroup_path(cgroups_path, "sb1", prefix) == expected


def test_sandbox_cgroup_prefix_is_ours_or_katas() -> None:
    with pytest.raises(InvalidArgument, match="accepted: carapace-sandbox-, kata-sandbox-"):
        sandbox_cgroup_path("/a/b", "sb1", "runc-")


@pytest.mark.parametrize(
    ("cgroups_path", "expected"),
    [
        ("/kubepods/pod1/container1", "kubepods/pod1"),
        ("/default/c1", "default"),
        (
            "kubepods-besteffort-pod1.slice:cri-containerd:a",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice",
        ),
        (None, "carapace/pod-sb1"),
    ],
)
def test_pod_cgroup_is_the_parent_of_the_cgroups_path(
    cgroups_path: str | None, expected: str
) -> None:
    assert pod_cgroup_path(cgroups_path, "sb1") == expected
