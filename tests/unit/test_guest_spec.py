"""Turning the host's OCI spec into the guest's (carapace.guest.spec)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from carapace.guest.spec import GuestSpecError, guest_spec, is_guest_mount
from carapace.oci.spec import default_spec

ROOTFS = "/run/carapace/containers/c1/rootfs"


def host_spec() -> dict[str, Any]:
    spec = default_spec(["sh", "-c", "true"])
    spec["ociVersion"] = "1.2.0"
    spec["root"] = {"path": "/var/lib/containerd/bundles/c1/rootfs", "readonly": True}
    spec["hooks"] = {"prestart": [{"path": "/usr/bin/netns-setup"}]}
    spec["linux"]["cgroupsPath"] = "/kubepods/besteffort/pod123/c1"
    spec["linux"]["namespaces"] = [
        {"type": "pid"},
        {"type": "network", "path": "/var/run/netns/cni-1234"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "network"},
    ]
    spec["mounts"] = [
        *spec["mounts"],
        {
            "destination": "/vol",
            "type": "bind",
            "source": "/run/carapace/shared/c1/vol",
            "options": ["rbind"],
        },
        {"destination": "/dev/vdb", "type": "bind", "source": "/dev/vdb"},
        {"destination": "/cg2", "type": "cgroup2", "source": "cgroup2"},
    ]
    return spec


def test_version_root_hooks_and_cgroups() -> None:
    out = guest_spec(host_spec(), "c1", ROOTFS)
    assert out["ociVersion"] == "1.0.2"
    assert out["root"] == {"path": ROOTFS, "readonly": True}
    assert "hooks" not in out
    assert out["linux"]["cgroupsPath"] == "/carapace/c1"


def test_namespaces() -> None:
    out = guest_spec(host_spec(), "c1", ROOTFS)
    # host paths mean nothing in the guest; the VM's network namespace is joined; a
    # cgroup namespace is added (v2 guest)
    assert out["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "network", "path": "/proc/1/ns/net"},
        {"type": "cgroup"},
    ]


def test_namespaces_of_the_pod_sandbox_container_are_joined() -> None:
    spec = host_spec()
    spec["linux"]["namespaces"] = [
        {"type": "pid", "path": "guest:/proc/7/ns/pid"},
        {"type": "ipc", "path": "guest:/proc/7/ns/ipc"},
        {"type": "uts", "path": "guest:/etc/passwd"},
        {"type": "cgroup"},
    ]
    out = guest_spec(spec, "c1", ROOTFS)
    assert out["linux"]["namespaces"] == [
        {"type": "pid", "path": "/proc/7/ns/pid"},
        {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "cgroup"},
        {"type": "network", "path": "/proc/1/ns/net"},
    ]


@pytest.mark.parametrize(
    "mount",
    [
        {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/pods/x/hosts"},
        {"destination": "/data", "source": "/home/user/data", "options": ["rbind"]},
        {"destination": "/cfg", "type": "none", "source": "/etc/app", "options": ["bind", "ro"]},
        {"destination": "/evil", "type": "bind", "source": "/run/carapace-evil/x"},
        {"destination": "/ext", "type": "ext4", "source": "/dev/sda1"},
    ],
)
def test_a_mount_not_in_the_guest_is_refused_never_dropped(mount: dict[str, Any]) -> None:
    spec = host_spec()
    spec["mounts"].append(mount)
    with pytest.raises(GuestSpecError, match=f"mount at {mount['destination']} .*accepted:"):
        guest_spec(spec, "c1", ROOTFS)


def test_mounts_kept() -> None:
    spec = host_spec()
    out = guest_spec(spec, "c1", ROOTFS)
    dests = [m["destination"] for m in out["mounts"]]
    assert dests == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/tmp",
        "/vol", "/dev/vdb", "/cg2",
    ]  # fmt: skip
    # kept mounts are unchanged
    by_dest = {m["destination"]: m for m in spec["mounts"]}
    for m in out["mounts"]:
        assert m == by_dest[m["destination"]]


def test_input_spec_not_mutated() -> None:
    spec = host_spec()
    before = copy.deepcopy(spec)
    out = guest_spec(spec, "c1", ROOTFS)
    assert spec == before
    # nor shares nested objects with the output
    out["process"]["args"].append("x")
    out["mounts"][0]["options"] = ["changed"]
    assert spec == before


def test_minimal_spec_gets_root_and_linux() -> None:
    out = guest_spec({"process": {"args": ["sh"]}}, "abc", "/r")
    assert out == {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"]},
        "root": {"path": "/r"},
        "linux": {
            "cgroupsPath": "/carapace/abc",
            "namespaces": [{"type": "network", "path": "/proc/1/ns/net"}, {"type": "cgroup"}],
        },
        "mounts": [],
    }


@pytest.mark.parametrize(
    ("mount", "kept"),
    [
        ({"type": "proc", "source": "proc"}, True),
        ({"type": "tmpfs", "source": "tmpfs"}, True),
        ({"type": "devpts", "source": "devpts"}, True),
        ({"type": "mqueue", "source": "mqueue"}, True),
        ({"type": "sysfs", "source": "sysfs"}, True),
        ({"type": "cgroup", "source": "cgroup"}, True),
        ({"type": "bind", "source": "/run/carapace/shared/x"}, True),
        ({"source": "/run/carapace/shared/x", "options": ["rbind"]}, True),
        ({"type": "bind", "source": "/dev/null"}, True),
        ({"type": "bind", "source": "/run/carapace"}, False),
        ({"type": "bind", "source": "/run/carapacex/y"}, False),
        ({"type": "bind", "source": "/home"}, False),
        ({"type": "none", "source": "/etc", "options": ["rbind"]}, False),
        ({"type": "tmpfs", "source": "/srv", "options": ["bind"]}, False),
        ({"source": "/srv"}, False),
        ({"type": "nfs", "source": "server:/export"}, False),
        ({"type": "overlay", "source": "overlay"}, False),
    ],
)
def test_is_guest_mount(mount: dict[str, Any], kept: bool) -> None:
    assert is_guest_mount({"destination": "/x", **mount}) is kept
