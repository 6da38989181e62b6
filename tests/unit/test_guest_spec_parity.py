"""The guest's spec for crun keeps every field runc would apply (the parity bundle of
tests/integration/test_spec_parity.py), joins the VM's network namespace (so net.*
sysctls apply there), refuses host devices by name, and puts back the mount options
crun 1.8 drops from read-only paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from carapace import linux
from carapace.guest.spec import (
    GuestSpecError,
    check_device,
    guest_spec,
    readonly_remounts,
)
from tests.integration.test_spec_parity import make_spec

ROOTFS = "/run/carapace/containers/c1/rootfs"
#: Fields crun applies as runc does: the guest passes them through untouched.
PASSED_THROUGH = [
    ("hostname",),
    ("process",),
    ("mounts",),
    ("linux", "sysctl"),
    ("linux", "maskedPaths"),
    ("linux", "readonlyPaths"),
    ("linux", "devices"),
    ("linux", "resources"),
]


def parity_spec() -> dict[str, Any]:
    spec = make_spec(Path("/run/carapace/shared/c1/volumes/0"))
    spec["mounts"][-1]["source"] = "/run/carapace/shared/c1/volumes/0"
    return spec


def _get(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        d = d[k]
    return d


@pytest.mark.parametrize("keys", PASSED_THROUGH, ids=".".join)
def test_parity_fields_are_passed_to_crun_unchanged(keys: tuple[str, ...]) -> None:
    spec = parity_spec()
    out = guest_spec(spec, "c1", ROOTFS)
    assert _get(out, keys) == _get(spec, keys)


def test_parity_process_fields() -> None:
    process = guest_spec(parity_spec(), "c1", ROOTFS)["process"]
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o27}
    assert process["cwd"] == "/home/user" and process["noNewPrivileges"] is True
    assert process["oomScoreAdj"] == 500
    assert set(process["capabilities"]) == {
        "bounding", "permitted", "effective", "inheritable", "ambient"}  # fmt: skip
    assert len(process["rlimits"]) == 16


def test_root_stays_read_only() -> None:
    out = guest_spec(parity_spec(), "c1", ROOTFS)
    assert out["root"] == {"path": ROOTFS, "readonly": True}


@pytest.mark.parametrize(
    "namespaces",
    [
        [{"type": "network"}],
        [{"type": "network", "path": "/var/run/netns/cni-1"}],
        [{"type": "network"}, {"type": "network", "path": "/proc/9/ns/net"}],
        [],  # a spec sharing its host's network namespace shares the VM's
    ],
)
def test_the_vms_network_namespace_is_joined_by_path(namespaces: list[dict[str, str]]) -> None:
    # crun applies net.* sysctls only in a network namespace it makes or joins by
    # path: the VM's (the agent's, PID 1's) is joined, once
    out = guest_spec({"process": {"args": ["sh"]}, "linux": {"namespaces": namespaces}}, "c", "/r")
    nets = [ns for ns in out["linux"]["namespaces"] if ns["type"] == "network"]
    assert nets == [{"type": "network", "path": "/proc/1/ns/net"}]


@pytest.mark.parametrize(
    "dev",
    [
        {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3},
        {"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11},
        {"path": "/dev/tty0", "type": "c", "major": 4, "minor": 0},
        {"path": "/dev/ptmx", "type": "c", "major": 5, "minor": 2},
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        {"path": "/dev/net/tun", "type": "u", "major": 10, "minor": 200},
        {"path": "/dev/pts/3", "type": "c", "major": 136, "minor": 3},
        {"path": "/dev/fifo", "type": "p"},
    ],
)
def test_devices_the_guest_has_are_accepted(dev: dict[str, Any]) -> None:
    check_device(0, dev)
    guest_spec({"process": {}, "linux": {"devices": [dev]}}, "c", "/r")


@pytest.mark.parametrize(
    "dev",
    [
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
        {"path": "/dev/vdb", "type": "b", "major": 254, "minor": 16},
        {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0},
        {"path": "/dev/dyn", "type": "c", "major": 511, "minor": 0},
        {"path": "/dev/x", "type": "c"},
    ],
)
def test_host_devices_are_refused_by_name(dev: dict[str, Any]) -> None:
    spec = {"process": {}, "linux": {"devices": [{"path": "/dev/null", "type": "c",
                                                  "major": 1, "minor": 3}, dev]}}  # fmt: skip
    with pytest.raises(GuestSpecError, match=rf"linux\.devices\[1\] {dev['path']} .*accepted:"):
        guest_spec(spec, "c", "/r")


def test_a_device_that_is_no_object_is_refused() -> None:
    with pytest.raises(GuestSpecError, match=r"linux\.devices\[0\] is 'x'"):
        check_device(0, "x")


# -- read-only paths: the options crun 1.8 drops ----------------------------------------

#: A container's mount table after crun 1.8 (the parity bundle, docker's /proc options).
MOUNTINFO = """\
60 40 0:50 / / ro,relatime - virtiofs carapace rw
61 60 0:51 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
62 60 0:52 / /made-ro rw,nosuid,relatime - tmpfs tmpfs rw,size=1024k,mode=777
63 60 0:53 / /ro-tmp ro,relatime - tmpfs tmpfs rw,size=1024k
64 61 0:51 /sys /proc/sys ro,relatime - proc proc rw
65 62 0:52 / /made-ro ro,relatime - tmpfs tmpfs rw,size=1024k,mode=777
66 61 0:51 /bus /proc/bus ro,nosuid,nodev,noexec,relatime - proc proc rw
67 60 0:54 / /with\\040space ro,noatime - tmpfs tmpfs rw
68 67 0:54 / /with\\040space ro,noatime - tmpfs tmpfs rw
"""
RO = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY


def test_readonly_remounts_put_back_the_options_of_the_mount_beneath() -> None:
    remounts = readonly_remounts(
        MOUNTINFO, ["/proc/sys", "/made-ro", "/proc/bus", "/with space", "/proc/absent"]
    )
    assert remounts == [
        ("/proc/sys", RO | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RELATIME),
        ("/made-ro", RO | linux.MS_NOSUID | linux.MS_RELATIME),
    ]


def test_readonly_remounts_none_when_crun_kept_them() -> None:
    # /proc/bus has them already; a missing path (crun skips it) is left alone
    assert readonly_remounts(MOUNTINFO, ["/proc/bus", "/nowhere", "proc/bus/"]) == []


def test_readonly_remounts_of_an_empty_table() -> None:
    assert readonly_remounts("", ["/proc/sys"]) == []
