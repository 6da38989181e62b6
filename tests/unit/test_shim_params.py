"""The shim's pure contract (carapace.shim.params): its Go-style command line, socket
address, rootfs mount options and pod namespace joining. (Pod grouping is the spec's:
test_oci_bundle.py.)"""

from __future__ import annotations

import os
from typing import Any

import pytest

from carapace import linux
from carapace.errors import InvalidArgument
from carapace.guest.spec import guest_spec
from carapace.oci import Namespace, Spec
from carapace.protocols.contract import GUEST_NS_PREFIX as GUEST
from carapace.shim.command import SOCKET_DIR, ShimArgs, parse_args, socket_path
from carapace.shim.params import is_type, join_pod_namespaces, mount_options, strip_unix

ADDRESS = "/run/containerd/containerd.sock"
ID64 = "a" * 64
#: sun_path is 108 bytes, its last one the terminating NUL.
SUN_PATH_MAX = 107

# --- parse_args ----------------------------------------------------------------------


def test_containerd_start_command_line() -> None:
    """What containerd runs: ``-namespace ns -address a -publish-binary b -id id start``."""
    args = parse_args(
        [
            "-namespace",
            "k8s.io",
            "-address",
            ADDRESS,
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            ID64,
            "-debug",
            "start",
        ]
    )
    assert args == ShimArgs(
        namespace="k8s.io",
        address=ADDRESS,
        publish_binary="/usr/bin/containerd",
        id=ID64,
        debug=True,
        action="start",
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["-id", "c1", "-namespace", "ns"],
        ["-id=c1", "-namespace=ns"],
        ["--id", "c1", "--namespace", "ns"],
        ["--id=c1", "--namespace=ns"],
        ["-id", "c1", "--namespace=ns"],
    ],
)
def test_go_flag_forms(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.id, args.namespace, args.action) == ("c1", "ns", "")


def test_value_with_equals_sign_and_dashes() -> None:
    """Only the first ``=`` separates; a value after a separate flag may start with ``-``."""
    args = parse_args(["-bundle=/x/a=b", "-id", "-odd-id", "-address", ""])
    assert args.bundle == "/x/a=b"
    assert args.id == "-odd-id"
    assert args.address == ""


@pytest.mark.parametrize(
    ("argv", "debug"),
    [
        ([], False),
        (["-debug"], True),
        (["--debug"], True),
        (["-debug=true"], True),
        (["-debug=1"], True),
        (["-debug=false"], False),
        (["-debug=FALSE"], False),
        (["-debug=0"], False),
        (["-debug", "-debug=false"], False),
    ],
)
def test_bare_and_explicit_booleans(argv: list[str], debug: bool) -> None:
    args = parse_args([*argv, "-id", "c1"])
    assert args.debug is debug
    assert args.id == "c1"
    assert args.version is False


def test_version_flag() -> None:
    assert parse_args(["-v"]).version is True
    assert parse_args(["-v=false"]).version is False


@pytest.mark.parametrize("action", ["start", "delete"])
def test_action_comes_last(action: str) -> None:
    args = parse_args(["-id", "c1", "-bundle", "/b", action])
    assert args.action == action
    assert (args.id, args.bundle) == ("c1", "/b")


def test_double_dash_ends_flags() -> None:
    assert parse_args(["-id", "c1", "--", "delete"]).action == "delete"
    assert parse_args(["-id", "c1", "--"]).action == ""


def test_daemon_form_has_no_action() -> None:
    """What ``start`` spawns: flags only, ``-socket`` naming the socket to serve."""
    sock = socket_path(ADDRESS, "k8s.io", "pod1")
    args = parse_args(
        ["-namespace", "k8s.io", "-id", "pod1", "-address", ADDRESS, "-socket", sock, "-debug"]
    )
    assert args.action == ""
    assert args.socket == sock
    assert args.debug is True


def test_unknown_flag_names_it_and_what_is_accepted() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_args(["-id", "c1", "-frobnicate=3", "start"])
    msg = str(info.value)
    assert "'-frobnicate=3'" in msg
    for accepted in ("-namespace", "-address", "-publish-binary", "-id", "-bundle", "-debug"):
        assert accepted in msg


@pytest.mark.parametrize("flag", ["-id", "--bundle", "-namespace"])
def test_missing_value_names_the_flag(flag: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_args(["-debug", flag])
    msg = str(info.value)
    assert f"-{flag.lstrip('-')}" in msg
    assert "value" in msg


@pytest.mark.parametrize(
    ("argv", "stray"),
    [
        (["-id", "c1", "run"], ["run"]),
        (["-id", "c1", "start", "extra"], ["start", "extra"]),
        (["start", "-id", "c1"], ["start", "-id", "c1"]),
        (["-id", "c1", "-"], ["-"]),
        (["-debug", "false"], ["false"]),
    ],
)
def test_stray_arguments_name_them_and_the_actions(argv: list[str], stray: list[str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_args(argv)
    msg = str(info.value)
    assert repr(stray) in msg
    assert "start" in msg and "delete" in msg


# --- socket_path -----------------------------------------------------------------------


def test_socket_path_is_deterministic_and_in_socket_dir() -> None:
    a = socket_path(ADDRESS, "k8s.io", ID64)
    assert a == socket_path(ADDRESS, "k8s.io", ID64)
    assert os.path.dirname(a) == SOCKET_DIR
    assert a.endswith(".sock")


def test_socket_path_differs_by_address_namespace_and_pod() -> None:
    base = socket_path(ADDRESS, "k8s.io", "pod1")
    others = {
        socket_path("/run/other/containerd.sock", "k8s.io", "pod1"),
        socket_path(ADDRESS, "default", "pod1"),
        socket_path(ADDRESS, "k8s.io", "pod2"),
        # the parts are separated, not simply concatenated
        socket_path(ADDRESS, "k8s.i", "opod1"),
    }
    assert base not in others
    assert len(others) == 4


def test_socket_path_fits_sun_path() -> None:
    longest_address = "/" + "x" * 200
    path = socket_path(longest_address, "n" * 64, ID64)
    assert len(path.encode()) <= SUN_PATH_MAX
    assert len(socket_path(ADDRESS, "k8s.io", ID64).encode()) <= SUN_PATH_MAX


def test_socket_path_root() -> None:
    assert os.path.dirname(socket_path(ADDRESS, "ns", "p", root="/tmp/x")) == "/tmp/x"


def test_strip_unix() -> None:
    assert strip_unix("unix:///run/containerd/containerd.sock.ttrpc") == (
        "/run/containerd/containerd.sock.ttrpc"
    )
    assert strip_unix(ADDRESS) == ADDRESS


# --- mount_options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ([], 0),
        (["ro"], linux.MS_RDONLY),
        (["rw"], 0),
        (["ro", "rw"], 0),
        (["rw", "ro"], linux.MS_RDONLY),
        (["nosuid", "nodev", "noexec"], linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC),
        (["nosuid", "suid"], 0),
        (["bind"], linux.MS_BIND),
        (["rbind", "ro"], linux.MS_BIND | linux.MS_REC | linux.MS_RDONLY),
        (["rbind", "rw"], linux.MS_BIND | linux.MS_REC),
        (["noatime"], linux.MS_NOATIME),
    ],
)
def test_mount_flags(options: list[str], flags: int) -> None:
    assert mount_options(options) == (flags, "")


def test_overlay_data_options_kept_in_order() -> None:
    """The overlayfs snapshotter's options: all data, in containerd's order."""
    options = [
        "index=off",
        "workdir=/var/lib/containerd/s/3/work",
        "upperdir=/var/lib/containerd/s/3/fs",
        "lowerdir=/var/lib/containerd/s/2/fs:/var/lib/containerd/s/1/fs",
    ]
    assert mount_options(options) == (0, ",".join(options))


def test_flags_and_data_mixed() -> None:
    flags, data = mount_options(["ro", "lowerdir=/a:/b", "nosuid", "index=off", "upperdir=/u"])
    assert flags == linux.MS_RDONLY | linux.MS_NOSUID
    assert data == "lowerdir=/a:/b,index=off,upperdir=/u"


# --- join_pod_namespaces ---------------------------------------------------------------------


def cri_container_spec(sandbox_host_pid: int = 4242) -> Spec:
    """A CRI container asking to share the sandbox's namespaces (paths on the host)."""
    ns = f"/proc/{sandbox_host_pid}/ns"
    return Spec.from_dict(
        {
            "ociVersion": "1.1.0",
            "process": {"args": ["sh"]},
            "linux": {
                "namespaces": [
                    {"type": "pid", "path": f"{ns}/pid"},
                    {"type": "ipc", "path": f"{ns}/ipc"},
                    {"type": "uts", "path": f"{ns}/uts"},
                    {"type": "network", "path": f"{ns}/net"},  # the pod task's: the VM's
                    {"type": "mount"},
                    {"type": "user", "path": f"{ns}/user"},
                    {"type": "cgroup", "path": f"{ns}/cgroup"},
                ],
                "resources": {"memory": {"limit": 1 << 28}},
            },
        }
    )


def test_shared_namespaces_point_at_the_guest_sandbox() -> None:
    out = join_pod_namespaces(cri_container_spec(), 17)
    expected = [
        {"type": "pid", "path": f"{GUEST}/proc/17/ns/pid"},
        {"type": "ipc", "path": f"{GUEST}/proc/17/ns/ipc"},
        {"type": "uts", "path": f"{GUEST}/proc/17/ns/uts"},
        {"type": "network"},
        {"type": "mount"},
        {"type": "user"},
        {"type": "cgroup"},
    ]
    assert out.to_dict()["linux"]["namespaces"] == expected
    assert out.namespaces[0] == Namespace("pid", f"{GUEST}/proc/17/ns/pid")
    # the rest of the spec is untouched
    assert out.process == {"args": ["sh"]}
    assert out.to_dict()["linux"]["resources"] == {"memory": {"limit": 1 << 28}}


def test_the_guest_spec_keeps_the_joined_namespaces() -> None:
    """The agent's spec (carapace.guest.spec) understands what join_pod_namespaces makes:
    the sandbox's guest namespaces joined, the VM's network namespace, the others new."""
    joined = join_pod_namespaces(cri_container_spec(), 17)
    out = guest_spec(joined.to_dict(), "c1", "/run/carapace/c1/rootfs")
    by_type = {ns["type"]: ns for ns in out["linux"]["namespaces"]}
    assert by_type["pid"] == {"type": "pid", "path": "/proc/17/ns/pid"}
    assert by_type["ipc"] == {"type": "ipc", "path": "/proc/17/ns/ipc"}
    assert by_type["uts"] == {"type": "uts", "path": "/proc/17/ns/uts"}
    assert by_type["network"] == {"type": "network", "path": "/proc/1/ns/net"}
    for kind in ("mount", "user", "cgroup"):
        assert "path" not in by_type.get(kind, {}), kind


@pytest.mark.parametrize("pid", [0, -1])
def test_without_a_sandbox_pid_paths_are_dropped(pid: int) -> None:
    out = join_pod_namespaces(cri_container_spec(), pid)
    assert out.to_dict()["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "network"},
        {"type": "mount"},
        {"type": "user"},
        {"type": "cgroup"},
    ]


def test_namespaces_without_paths_stay_new() -> None:
    namespaces: list[dict[str, Any]] = [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}]
    spec = Spec.from_dict({"process": {}, "linux": {"namespaces": namespaces}})
    out = join_pod_namespaces(spec, 17)
    assert out.to_dict()["linux"]["namespaces"] == namespaces


def test_spec_without_linux_section() -> None:
    out = join_pod_namespaces(Spec.from_dict({"process": {"args": ["true"]}}), 17)
    assert out.to_dict()["linux"]["namespaces"] == []
    assert out.namespaces == ()
    assert out.process == {"args": ["true"]}


def test_input_is_not_mutated() -> None:
    spec = cri_container_spec()
    before = spec.to_dict()
    out = join_pod_namespaces(spec, 17)
    assert spec.to_dict() == before
    assert spec.namespaces[0].path == "/proc/4242/ns/pid"
    assert out is not spec


@pytest.mark.parametrize("value", ["maybe", "yes", "2", ""])
def test_boolean_flag_values_are_gos(value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"-debug=.*accepted: .*true"):
        parse_args([f"-debug={value}", "start"])


def test_three_dashes_is_not_a_flag() -> None:
    with pytest.raises(InvalidArgument, match="---id"):
        parse_args(["---id", "x", "start"])


def test_defaults_mount_option_means_nothing() -> None:
    assert mount_options(["defaults"]) == (0, "")
    assert mount_options(["defaults", "ro"]) == (linux.MS_RDONLY, "")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("runtimeoptions.v1.Options", True),
        ("type.googleapis.com/runtimeoptions.v1.Options", True),
        ("evil.runtimeoptions.v1.Options", False),
        ("containerd.runc.v1.Options", False),
    ],
)
def test_is_type(url: str, expected: bool) -> None:
    assert is_type(url, "runtimeoptions.v1.Options") is expected
