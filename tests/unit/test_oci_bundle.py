"""The OCI edge (carapace.oci.bundle): Bundle.load reads config.json once and checks it;
Spec is the typed, frozen view (container type, pod id, derived specs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from carapace.errors import InvalidArgument, NotFound
from carapace.oci import Bundle, Namespace, Spec
from carapace.oci.spec import default_spec
from carapace.protocols.contract import (
    CRI_CONTAINER_TYPE,
    CRI_SANDBOX_ID,
    DOCKER_CONTAINER_TYPE,
    DOCKER_SANDBOX_ID,
)


def make_bundle(tmp_path: Path, spec: object, rootfs: str | None = "rootfs") -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    if rootfs is not None:
        (bundle / rootfs).mkdir()
    return bundle


def spec_of(**fields: Any) -> dict[str, Any]:
    """A minimal valid spec with ``fields`` on top."""
    return {"ociVersion": "1.0.2", "process": {"args": ["sh"]}, **fields}


# --- Bundle.load -------------------------------------------------------------------------


def test_load_bundle(tmp_path: Path) -> None:
    spec = default_spec(["sh"])
    bundle = make_bundle(tmp_path, spec)
    loaded = Bundle.load(bundle)
    assert loaded.path == bundle
    assert loaded.spec.to_dict() == spec
    assert loaded.rootfs == bundle / "rootfs"


def test_load_bundle_takes_a_string(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, default_spec(["sh"]))
    assert Bundle.load(str(bundle)).rootfs == bundle / "rootfs"


def test_load_bundle_relative_root_path(tmp_path: Path) -> None:
    spec = default_spec(["sh"])
    spec["root"]["path"] = "my-root"
    bundle = make_bundle(tmp_path, spec, rootfs="my-root")
    assert Bundle.load(bundle).rootfs == bundle / "my-root"


def test_load_bundle_root_path_normalised_inside(tmp_path: Path) -> None:
    spec = default_spec(["sh"])
    spec["root"]["path"] = "./x/../rootfs/"
    bundle = make_bundle(tmp_path, spec)
    assert Bundle.load(bundle).rootfs == bundle / "rootfs"


def test_an_absolute_root_path_is_only_for_a_runtime_cli(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spec = default_spec(["sh"])
    spec["root"]["path"] = str(elsewhere)
    bundle = make_bundle(tmp_path, spec, rootfs=None)
    assert Bundle.load(bundle, rootfs_inside=False).rootfs == elsewhere  # Podman's way
    with pytest.raises(InvalidArgument, match="outside the bundle"):
        Bundle.load(bundle)  # a shim mounts and unmounts it: it stays in the bundle


@pytest.mark.parametrize("root", ["/", "/proc/1/root", "/sys", "/dev/shm", "link-to-root"])
@pytest.mark.parametrize("inside", [True, False])
def test_a_rootfs_that_is_the_host_is_refused(tmp_path: Path, root: str, inside: bool) -> None:
    """root.path "/" once made the shim's delete unmount / of its mount namespace."""
    spec = default_spec(["sh"])
    spec["root"]["path"] = root
    bundle = make_bundle(tmp_path, spec, rootfs=None)
    (bundle / "link-to-root").symlink_to("/")
    with pytest.raises(InvalidArgument, match=r"root\.path"):
        Bundle.load(bundle, check_rootfs=False, rootfs_inside=inside)


def test_load_bundle_without_root_uses_rootfs(tmp_path: Path) -> None:
    spec = default_spec(["sh"])
    del spec["root"]
    bundle = make_bundle(tmp_path, spec)
    assert Bundle.load(bundle).rootfs == bundle / "rootfs"


@pytest.mark.parametrize(
    "root", ["..", ".", "../outside", "rootfs/../../outside", "a/../../b", "escape"]
)
def test_root_path_may_not_leave_the_bundle(tmp_path: Path, root: str) -> None:
    spec = default_spec(["sh"])
    spec["root"]["path"] = root
    bundle = make_bundle(tmp_path, spec)
    (tmp_path / "outside").mkdir()
    (bundle / "escape").symlink_to(tmp_path / "outside")  # a symlink out of the bundle
    with pytest.raises(InvalidArgument) as exc:
        Bundle.load(bundle, check_rootfs=False)
    msg = str(exc.value)
    assert repr(root) in msg and "outside the bundle" in msg and str(bundle) in msg


def test_load_bundle_missing_config(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as exc:
        Bundle.load(tmp_path)
    assert str(tmp_path) in str(exc.value)
    assert "no config.json" in str(exc.value)


def test_load_bundle_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "rootfs").mkdir()
    with pytest.raises(InvalidArgument, match=r"config\.json is not valid JSON"):
        Bundle.load(tmp_path)


def test_load_bundle_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()  # a directory: reading it fails
    with pytest.raises(InvalidArgument, match=r"cannot read config\.json"):
        Bundle.load(tmp_path)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"ociVersion": "1.0.2"}, "process"),
        ({"process": "sh"}, "process"),
        ({"process": None}, "process"),
        (["process"], "the document"),
        (3, "the document"),
    ],
)
def test_load_bundle_without_process(tmp_path: Path, spec: object, named: str) -> None:
    bundle = make_bundle(tmp_path, spec)
    with pytest.raises(InvalidArgument) as exc:
        Bundle.load(bundle)
    msg = str(exc.value)
    assert named in msg and "accepted" in msg and str(bundle) in msg


def test_load_bundle_missing_rootfs(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, default_spec(["sh"]), rootfs=None)
    with pytest.raises(NotFound) as exc:
        Bundle.load(bundle)
    assert str(bundle / "rootfs") in str(exc.value)
    assert "not a directory" in str(exc.value)


def test_load_bundle_rootfs_is_a_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, default_spec(["sh"]), rootfs=None)
    (bundle / "rootfs").write_text("")
    with pytest.raises(NotFound, match="not a directory"):
        Bundle.load(bundle)


def test_load_bundle_rootfs_not_checked_for_a_shim(tmp_path: Path) -> None:
    """The shim mounts the rootfs after reading the bundle."""
    bundle = make_bundle(tmp_path, default_spec(["sh"]), rootfs=None)
    assert Bundle.load(bundle, check_rootfs=False).rootfs == bundle / "rootfs"


# --- wrong types name the field ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"annotations": ["a=b"]}, "annotations"),
        ({"annotations": {"a": 1}}, "annotations['a']"),
        ({"hostname": 7}, "hostname"),
        ({"root": "rootfs"}, "root"),
        ({"root": {"path": 1}}, "root.path"),
        ({"process": {"terminal": "yes"}}, "process.terminal"),
        ({"linux": []}, "linux"),
        ({"linux": {"cgroupsPath": 5}}, "linux.cgroupsPath"),
        ({"linux": {"namespaces": {"pid": ""}}}, "linux.namespaces"),
        ({"linux": {"namespaces": ["pid"]}}, "linux.namespaces[0]"),
        ({"linux": {"namespaces": [{"path": "/x"}]}}, "linux.namespaces[0].type"),
        ({"linux": {"namespaces": [{"type": "pid", "path": 3}]}}, "linux.namespaces[0].path"),
        ({"linux": {"resources": [1]}}, "linux.resources"),
        ({"linux": {"resources": {"files": 5}}}, "linux.resources.files"),
        ({"linux": {"resources": {"files": {"limit": -1}}}}, "linux.resources.files.limit"),
        ({"linux": {"resources": {"files": {"limit": "many"}}}}, "linux.resources.files.limit"),
        ({"linux": {"resources": {"files": {"limit": True}}}}, "linux.resources.files.limit"),
    ],
)
def test_wrong_types_name_the_field(tmp_path: Path, fields: dict[str, Any], named: str) -> None:
    spec = {**spec_of(), **fields}
    bundle = make_bundle(tmp_path, spec)
    with pytest.raises(InvalidArgument) as exc:
        Bundle.load(bundle)
    msg = str(exc.value)
    assert f": {named} is" in msg or f": {named} (" in msg, msg
    assert "accepted" in msg
    assert str(bundle) in msg


# --- the typed view --------------------------------------------------------------------------


def test_typed_fields() -> None:
    spec = Spec.from_dict(
        spec_of(
            annotations={"a": "1"},
            hostname="box",
            root={"path": "r"},
            linux={
                "cgroupsPath": "/kubepods/pod1/c1",
                "namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/9/ns/ipc"}],
                "resources": {"memory": {"limit": 1 << 28}, "files": {"limit": "2048"}},
            },
            process={"args": ["sh"], "terminal": True},
        )
    )
    assert spec.annotations == {"a": "1"}
    assert spec.hostname == "box"
    assert spec.root_path == "r"
    assert spec.terminal is True
    assert spec.cgroups_path == "/kubepods/pod1/c1"
    assert spec.namespaces == (Namespace("pid"), Namespace("ipc", "/proc/9/ns/ipc"))
    assert spec.resources is not None and spec.resources["memory"] == {"limit": 1 << 28}
    assert spec.files_limit == 2048
    assert spec.process == {"args": ["sh"], "terminal": True}


def test_defaults_of_a_minimal_spec() -> None:
    spec = Spec.from_dict(spec_of(process={"args": ["sh"], "terminal": None}))
    assert spec.annotations == {}
    assert spec.hostname == ""
    assert spec.root_path == "rootfs"
    assert spec.terminal is False
    assert spec.cgroups_path == ""
    assert spec.namespaces == ()
    assert spec.resources is None
    assert spec.files_limit is None


def test_default_spec_is_a_valid_spec() -> None:
    spec = Spec.from_dict(default_spec(["echo", "hi"], terminal=True, hostname="h"))
    assert spec.terminal is True
    assert spec.hostname == "h"
    assert {ns.type for ns in spec.namespaces} >= {"pid", "mount"}


def test_the_view_is_frozen_and_copies() -> None:
    data = spec_of(annotations={"a": "1"})
    spec = Spec.from_dict(data)
    data["annotations"]["a"] = "changed"  # the caller's dict is not shared
    assert spec.annotations == {"a": "1"}
    out = spec.to_dict()
    out["process"]["args"].append("x")  # nor is what to_dict gives
    assert spec.to_dict()["process"]["args"] == ["sh"]
    spec.process["args"].append("y")
    assert spec.process["args"] == ["sh"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.hostname = "x"  # type: ignore[misc]


def test_fields_carapace_does_not_read_travel_on() -> None:
    data = spec_of(mounts=[{"destination": "/x", "type": "tmpfs"}], vendor={"k": [1, 2]})
    assert Spec.from_dict(data).to_dict() == data


# --- derived specs -----------------------------------------------------------------------------


def test_with_terminal() -> None:
    spec = Spec.from_dict(spec_of())
    on = spec.with_terminal(True)
    assert on.terminal is True and on.to_dict()["process"]["terminal"] is True
    assert spec.terminal is False and "terminal" not in spec.to_dict()["process"]


def test_with_args() -> None:
    spec = Spec.from_dict(spec_of())
    args = ["echo", "hi"]
    out = spec.with_args(args)
    assert out.process["args"] == ["echo", "hi"]
    args.append("more")
    assert out.process["args"] == ["echo", "hi"]
    assert spec.process["args"] == ["sh"]


def test_with_annotations_merges_once() -> None:
    spec = Spec.from_dict(spec_of(annotations={"a": "1", "b": "2"}))
    out = spec.with_annotations({"b": "3", "c": "4"})
    assert out.annotations == {"a": "1", "b": "3", "c": "4"}
    assert out.to_dict()["annotations"] == {"a": "1", "b": "3", "c": "4"}
    assert spec.annotations == {"a": "1", "b": "2"}
    assert spec.with_annotations({}) is spec
    bare = Spec.from_dict(spec_of())
    assert "annotations" not in bare.with_annotations({}).to_dict()


@pytest.mark.parametrize("linux", [None, {}, {"namespaces": [{"type": "pid"}]}])
def test_with_namespaces(linux: dict[str, Any] | None) -> None:
    spec = Spec.from_dict(spec_of(linux=linux))
    out = spec.with_namespaces((Namespace("ipc", "guest:/proc/3/ns/ipc"), Namespace("uts")))
    assert out.namespaces == (Namespace("ipc", "guest:/proc/3/ns/ipc"), Namespace("uts"))
    assert out.to_dict()["linux"]["namespaces"] == [
        {"type": "ipc", "path": "guest:/proc/3/ns/ipc"},
        {"type": "uts"},
    ]
    assert spec.to_dict()["linux"] == linux


# --- the pod a container belongs to ---------------------------------------------------------


def annotated(annotations: dict[str, str] | None) -> Spec:
    return Spec.from_dict(spec_of(annotations=annotations))


def cri(kind: str, sandbox: str) -> Spec:
    return annotated({CRI_CONTAINER_TYPE: kind, CRI_SANDBOX_ID: sandbox})


def test_cri_sandbox_container_makes_its_pod() -> None:
    spec = cri("sandbox", "pod1")
    assert spec.container_type == "sandbox"
    assert spec.pod_id("pod1") == "pod1"
    assert spec.is_pod_sandbox("pod1") is True


def test_cri_container_joins_its_sandbox() -> None:
    spec = cri("container", "pod1")
    assert spec.container_type == "container"
    assert spec.pod_id("c1") == "pod1"
    assert spec.is_pod_sandbox("c1") is False


def test_dockershim_annotations_as_in_openeulers_examples() -> None:
    """``--annotation io.kubernetes.docker.type=podsandbox`` makes a pod;
    ``io.kubernetes.docker.type=container`` + ``io.kubernetes.sandbox.id=<pod>`` joins it."""
    pause = annotated({DOCKER_CONTAINER_TYPE: "podsandbox"})
    assert (pause.pod_id("p1"), pause.is_pod_sandbox("p1")) == ("p1", True)
    c = annotated({DOCKER_CONTAINER_TYPE: "container", DOCKER_SANDBOX_ID: "p1"})
    assert (c.pod_id("c1"), c.is_pod_sandbox("c1")) == ("p1", False)


@pytest.mark.parametrize("annotations", [None, {}, {"org.example": "x"}])
def test_plain_container_is_its_own_pod(annotations: dict[str, str] | None) -> None:
    """``ctr run``: no CRI annotations, the container is a pod of one."""
    spec = annotated(annotations)
    assert spec.container_type == ""
    assert spec.pod_id("c1") == "c1"
    assert spec.is_pod_sandbox("c1") is True


def test_is_pause_only_for_marked_sandbox_containers() -> None:
    assert cri("sandbox", "p1").is_pause
    assert annotated({DOCKER_CONTAINER_TYPE: "podsandbox"}).is_pause
    assert not cri("container", "p1").is_pause
    assert not annotated(None).is_pause  # ctr run: a pod of one, its own workload
