"""A CRI pod asking for a host namespace (hostNetwork, hostPID, hostIPC: CRI leaves the
namespace out of the pause container's spec) is refused by the shim in the pod's
words, before any sandbox is made."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_shim_service import POD, Pod, run

from carapace.errors import InvalidArgument
from carapace.oci import Spec
from carapace.protocols.contract import CRI_CONTAINER_TYPE, CRI_SANDBOX_ID
from carapace.resources import check_pod_namespaces
from carapace.ttrpc import Code, TtrpcError

#: The namespaces containerd's CRI lists in a pod sandbox's spec.
CRI_POD = ("pid", "ipc", "uts", "mount", "network")


def pause_spec(*types: str) -> dict[str, object]:
    return {"linux": {"namespaces": [{"type": t} for t in types]}}


def spec_with(*types: str) -> Spec:
    return Spec.from_dict(
        {"process": {"args": ["/pause"]}, "root": {"path": "rootfs"}} | pause_spec(*types)
    )


@pytest.mark.parametrize(
    ("host", "gone", "field"),
    [
        ("network", ("network", "uts"), "hostNetwork: true"),
        ("pid", ("pid",), "hostPID: true"),
        ("ipc", ("ipc",), "hostIPC: true"),
    ],
)
def test_each_host_namespace_is_refused_naming_the_pod_field(
    host: str, gone: tuple[str, ...], field: str
) -> None:
    spec = spec_with(*(t for t in CRI_POD if t not in gone))
    with pytest.raises(InvalidArgument) as e:
        check_pod_namespaces(spec.namespaces, "p" * 64)
    msg = str(e.value)
    assert msg.startswith(f"pod {'p' * 64} asks for the host's {' and '.join(gone)} namespace")
    assert f"({field})" in msg
    assert "a VM pod has its own kernel and cannot share a namespace with the host" in msg
    assert "accepted: a pod without hostNetwork, hostPID or hostIPC" in msg


def test_all_three_named_once_each() -> None:
    with pytest.raises(InvalidArgument) as e:
        check_pod_namespaces(spec_with("mount").namespaces, "p1")
    msg = str(e.value)
    assert "the host's network and ipc and pid and uts namespaces" in msg
    assert "(hostNetwork: true, hostIPC: true, hostPID: true)" in msg


def test_a_pod_with_its_own_namespaces_passes() -> None:
    check_pod_namespaces(spec_with(*CRI_POD).namespaces, "p1")
    # no list at all is not CRI's shape: the sandbox's plan refuses it in OCI's words
    check_pod_namespaces(spec_with().namespaces, "p1")


def test_the_shim_refuses_the_pod_before_anything_is_made(tmp_path: Path) -> None:
    async def go() -> None:
        pod = Pod(tmp_path)
        annotations = {CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: POD}
        with pytest.raises(TtrpcError) as e:
            await pod.create(POD, annotations, **pause_spec("ipc", "uts", "mount", "network"))
        assert e.value.code == Code.INVALID_ARGUMENT
        assert f"pod {POD} asks for the host's pid namespace (hostPID: true)" in str(e.value)
        assert pod.sandboxes == []
        assert pod.service.containers == {}
        assert pod.events.topics() == []
        await pod.service.close()

    run(go())
