"""Pure path and value computations of the host cgroup layer (carapace.hostcgroup):
OCI cgroupsPath in both forms, and the file/value pairs per cgroup version."""

from __future__ import annotations

import pytest

from carapace.errors import InvalidArgument
from carapace.hostcgroup import expand_slice, parse_cgroups_path
from carapace.hostcgroup.cgroupspath import CgroupsPath, clean_path, unit_name
from carapace.hostcgroup.files import (
    cfs_quota_us,
    controller_name,
    cpu_limit_writes,
    memory_limit_writes,
    parse_cpu_usage_ns,
    subtree_control_write,
    threads_file,
)

# ------------------------------------------------------------------ cgroupsPath


@pytest.mark.parametrize(
    ("value", "form", "path"),
    [
        ("/kubepods/pod1/container1", "cgroupfs", "/kubepods/pod1/container1"),
        ("/kubepods/pod1/", "cgroupfs", "/kubepods/pod1"),
        ("//kubepods//pod1/./c", "cgroupfs", "/kubepods/pod1/c"),
        ("/../../etc", "cgroupfs", "/etc"),
        ("kubepods/pod1", "cgroupfs", "kubepods/pod1"),
        ("../../x/y", "cgroupfs", "x/y"),
        ("", "cgroupfs", ""),
        (
            "kubepods-besteffort-pod123.slice:cri-containerd:abc",
            "systemd",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod123.slice/"
            "cri-containerd-abc.scope",
        ),
        ("system.slice:docker:1234", "systemd", "/system.slice/docker-1234.scope"),
        (":docker:1234", "systemd", "/system.slice/docker-1234.scope"),
        ("-.slice:p:n", "systemd", "/p-n.scope"),
        ("user-1000.slice:p:my.slice", "systemd", "/user.slice/user-1000.slice/my.slice"),
        ("machine.slice::n", "systemd", "/machine.slice/-n.scope"),
    ],
)
def test_cgroups_path_forms(value: str, form: str, path: str) -> None:
    parsed = parse_cgroups_path(value)
    assert (parsed.form, parsed.path) == (form, path)


@pytest.mark.parametrize(
    "value",
    [
        "a:b",  # two parts
        "a.slice:b:c:d",  # four parts
        "kubepods.slice:cri-containerd:",  # empty name
        "kubepods.slice:a/b:c",  # '/' in prefix
        "kubepods.slice:p:a/b",  # '/' in name
        "kubepods:cri-containerd:abc",  # slice without .slice
        "kube--pods.slice:p:n",  # empty dash component
        "-kube.slice:p:n",
        "kube-.slice:p:n",
        "a/b.slice:p:n",
        ".slice:p:n",
        "/a\x00b",
    ],
)
def test_bad_cgroups_paths_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_cgroups_path(value)


@pytest.mark.parametrize(
    ("slice_name", "expanded"),
    [
        ("system.slice", "/system.slice"),
        ("test-a-b.slice", "/test.slice/test-a.slice/test-a-b.slice"),
        ("-.slice", "/"),
        ("a.b-c.slice", "/a.b.slice/a.b-c.slice"),
    ],
)
def test_expand_slice_as_runc(slice_name: str, expanded: str) -> None:
    assert expand_slice(slice_name) == expanded


@pytest.mark.parametrize(
    "slice_name",
    [
        "",
        "slice",
        ".slice",
        "a.scope",
        "a--b.slice",
        "-a.slice",
        "a-.slice",
        "a/b.slice",
        "--.slice",
    ],
)
def test_expand_slice_refuses_what_runc_refuses(slice_name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid systemd slice name"):
        expand_slice(slice_name)


def test_unit_name_is_a_scope_unless_a_slice() -> None:
    assert unit_name("cri-containerd", "abc") == "cri-containerd-abc.scope"
    assert unit_name("ignored", "x.slice") == "x.slice"


def test_clean_path_matches_runc_cleanpath() -> None:
    assert clean_path("") == ""
    assert clean_path("..") == "."
    assert clean_path("a/../../b") == "b"
    assert clean_path("/a/b/../c") == "/a/c"


def test_relative_and_parent() -> None:
    p = parse_cgroups_path("/kubepods/pod1/container1")
    assert p.absolute
    assert p.relative_to_root() == "kubepods/pod1/container1"
    assert p.parent() == CgroupsPath("cgroupfs", "/kubepods/pod1")
    rel = parse_cgroups_path("pod1/c1")
    assert not rel.absolute
    with pytest.raises(InvalidArgument, match="relative"):
        rel.relative_to_root()
    assert rel.under("/runtime").path == "/runtime/pod1/c1"
    assert parse_cgroups_path("../../c").under("/runtime").path == "/runtime/c"
    with pytest.raises(InvalidArgument):
        rel.under("runtime")
    assert parse_cgroups_path("/a").parent().path == "/"
    with pytest.raises(InvalidArgument):
        parse_cgroups_path("a").parent()
    systemd = parse_cgroups_path("kubepods-pod1.slice:cri-containerd:abc")
    assert systemd.parent().path == "/kubepods.slice/kubepods-pod1.slice"
    assert (
        systemd.relative_to_root() == "kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope"
    )


# ------------------------------------------------------------------ files per version


@pytest.mark.parametrize(
    ("version", "cpus", "period", "writes"),
    [
        ("v1", 0.5, 100_000, [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000")]),
        ("v1", None, 100_000, [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "-1")]),
        ("v1", 2, 50_000, [("cpu.cfs_period_us", "50000"), ("cpu.cfs_quota_us", "100000")]),
        ("v1", 0.29, 100_000, [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "29000")]),
        ("v2", 0.5, 100_000, [("cpu.max", "50000 100000")]),
        ("v2", None, 100_000, [("cpu.max", "max 100000")]),
        ("v2", 1.5, 1_000_000, [("cpu.max", "1500000 1000000")]),
        ("v2", 0.01, 100_000, [("cpu.max", "1000 100000")]),
    ],
)
def test_cpu_limit_writes(
    version: str, cpus: float | None, period: int, writes: list[tuple[str, str]]
) -> None:
    assert cpu_limit_writes(version, cpus, period) == writes  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cpus", "period", "match"),
    [
        (0, 100_000, "positive"),
        (-1, 100_000, "positive"),
        (float("nan"), 100_000, "positive"),
        (float("inf"), 100_000, "positive"),
        (True, 100_000, "number"),
        ("1", 100_000, "number"),
        (0.005, 100_000, "minimum is 1000 us"),
        (1, 999, "range"),
        (1, 1_000_001, "range"),
        (1, 1.5, "integer"),
    ],
)
def test_cpu_limit_errors(cpus: object, period: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        cfs_quota_us(cpus, period)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version", "limit", "writes"),
    [
        ("v1", 512 << 20, [("memory.limit_in_bytes", "536870912")]),
        ("v1", None, [("memory.limit_in_bytes", "-1")]),
        ("v2", 512 << 20, [("memory.max", "536870912")]),
        ("v2", None, [("memory.max", "max")]),
    ],
)
def test_memory_limit_writes(
    version: str, limit: int | None, writes: list[tuple[str, str]]
) -> None:
    assert memory_limit_writes(version, limit) == writes  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1G"])
def test_memory_limit_errors(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="memory limit"):
        memory_limit_writes("v1", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version", "given", "name"),
    [
        ("v1", "blkio", "blkio"),
        ("v1", "io", "blkio"),
        ("v1", "cpuacct", "cpuacct"),
        ("v2", "blkio", "io"),
        ("v2", "cpuacct", "cpu"),
        ("v2", "memory", "memory"),
    ],
)
def test_controller_names_per_version(version: str, given: str, name: str) -> None:
    assert controller_name(version, given) == name  # type: ignore[arg-type]


def test_unknown_controller() -> None:
    for version in ("v1", "v2"):
        with pytest.raises(InvalidArgument, match="unknown cgroup controller 'cpux'"):
            controller_name(version, "cpux")


def test_usage_threads_and_subtree_values() -> None:
    assert parse_cpu_usage_ns("v1", "123456789\n") == 123456789
    assert parse_cpu_usage_ns("v2", "usage_usec 1064649\nuser_usec 5\n") == 1064649000
    with pytest.raises(ValueError):
        parse_cpu_usage_ns("v2", "user_usec 5\n")
    assert threads_file("v1") == "tasks"
    assert threads_file("v2") == "cgroup.threads"
    assert subtree_control_write({"memory", "cpu"}) == "+cpu +memory"
