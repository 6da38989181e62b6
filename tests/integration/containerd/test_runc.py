"""The test containerd with runc: ctr and a CRI pod. These prove the rig and stay as
the runc half of the "mixed node" tests (runc and carapace pods on one containerd)."""

from __future__ import annotations

import ipaddress
import uuid
from pathlib import Path

import cri_api as api

from .conftest import CtrFn
from .rig import (
    BUSYBOX_IMAGE,
    NAMESPACES,
    PAUSE_IMAGE,
    POD_SUBNET,
    RUNC,
    ContainerdRig,
    CriClient,
    pod_config,
)


def test_images_imported(containerd: ContainerdRig, ctr: CtrFn, cri: CriClient) -> None:
    for ns in NAMESPACES:
        names = ctr("images", "ls", "-q", namespace=ns).stdout.split()
        assert {BUSYBOX_IMAGE, PAUSE_IMAGE} <= set(names), (ns, names)
        # unpacked for the snapshotter CRI and ctr use
        out = ctr("images", "check", namespace=ns).stdout
        assert out.count("complete") >= 2, out
    images = cri.image.ListImages(api.ListImagesRequest(), timeout=30).images
    tags = {t for i in images for t in i.repo_tags}
    assert {BUSYBOX_IMAGE, PAUSE_IMAGE} <= tags


def test_ctr_run_runc(ctr: CtrFn) -> None:
    cid = f"runc-{uuid.uuid4().hex[:8]}"
    r = ctr("run", "--rm", "--runtime", RUNC, BUSYBOX_IMAGE, cid, "echo", "hello", timeout=60)
    assert r.stdout == "hello\n"
    assert r.stderr == ""


def test_cri_pod_with_runc(cri: CriClient, tmp_path: Path) -> None:
    rt = cri.runtime
    config = pod_config("runc-pod", str(tmp_path))
    pod_id = rt.RunPodSandbox(
        api.RunPodSandboxRequest(config=config, runtime_handler="runc"), timeout=120
    ).pod_sandbox_id
    try:
        status = rt.PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30
        ).status
        assert status.state == api.PodSandboxState.SANDBOX_READY
        assert status.runtime_handler == "runc"
        assert ipaddress.ip_address(status.network.ip) in ipaddress.ip_network(POD_SUBNET)

        cid = rt.CreateContainer(
            api.CreateContainerRequest(
                pod_sandbox_id=pod_id,
                config=api.ContainerConfig(
                    metadata=api.ContainerMetadata(name="sleeper"),
                    image=api.ImageSpec(image=BUSYBOX_IMAGE),
                    command=["sleep", "3600"],
                    log_path="sleeper.log",
                ),
                sandbox_config=config,
            ),
            timeout=60,
        ).container_id
        rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=60)

        r = rt.ExecSync(api.ExecSyncRequest(container_id=cid, cmd=["echo", "hi"], timeout=30))
        assert (r.exit_code, r.stdout, r.stderr) == (0, b"hi\n", b"")
        # the pod network: eth0 holds the pod IP, loopback is up (containerd adds it)
        r = rt.ExecSync(api.ExecSyncRequest(container_id=cid, cmd=["ip", "-o", "addr"], timeout=30))
        assert r.exit_code == 0, r.stderr
        assert f"inet {status.network.ip}/" in r.stdout.decode()
        assert "inet 127.0.0.1/8" in r.stdout.decode()
        r = rt.ExecSync(api.ExecSyncRequest(container_id=cid, cmd=["hostname"], timeout=30))
        assert r.stdout == b"runc-pod\n"
    finally:
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
    assert not rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30).items
    assert not rt.ListContainers(api.ListContainersRequest(), timeout=30).containers
