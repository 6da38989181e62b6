"""Pods started from VM templates through containerd's CRI, as the kubelet starts them:
the runtime handler ``carapace-template`` (rig.py) is carapace with ``[factory]
template = true``. Two pods restored from one template are each a VM of their own
(own boot_id, own QEMU restored with ``-incoming``), get their CNI address and reach
the host and each other; removing them leaves nothing, and the template stays for the
next pod."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from carapace.factory import TemplateStore

from ..procs import processes, qemu_of
from .rig import TEMPLATE_HANDLER, ContainerdRig, CriClient
from .test_cri_network import PORT, Pod, assert_pod_gone, fetch_in, host_get, serve

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def restored(pod_id: str) -> bool:
    """Whether the pod's QEMU was started to receive a saved VM (not booted)."""
    [pid] = qemu_of(pod_id)
    argv = dict(processes())[pid]
    return b"-incoming" in argv


@pytest.fixture
def pods(containerd: ContainerdRig, cri: CriClient, tmp_path: Path) -> Iterator[tuple[Pod, Pod]]:
    made: list[Pod] = []
    try:
        for name in ("tpl-1", "tpl-2"):
            made.append(Pod(cri, name, TEMPLATE_HANDLER, tmp_path))
        yield made[0], made[1]
    finally:
        for p in made:
            p.remove()
        for p in made:
            assert_pod_gone(containerd, p.id)


def test_two_pods_from_one_template_are_two_vms_on_the_pod_network(
    containerd: ContainerdRig, pods: tuple[Pod, Pod]
) -> None:
    a, b = pods
    assert restored(a.id) and restored(b.id), "a pod booted cold (see the containerd log)"
    templates = TemplateStore(containerd.template_dir).templates()
    assert len(templates) == 1, templates
    web_a, web_b = a.container("web", serve("tpl-1")), b.container("web", serve("tpl-2"))
    boot_a = a.out(web_a, ["cat", "/proc/sys/kernel/random/boot_id"]).strip()
    boot_b = b.out(web_b, ["cat", "/proc/sys/kernel/random/boot_id"]).strip()
    assert UUID.fullmatch(boot_a) and UUID.fullmatch(boot_b), (boot_a, boot_b)
    assert boot_a != boot_b
    assert a.ip != b.ip
    # each got its CNI address in its guest, and the host reaches it there
    assert f"inet {a.ip}/" in a.out(web_a, ["ip", "-4", "addr", "show", "eth0"])
    assert host_get(f"http://{a.ip}:{PORT}/index.html") == b"hello-tpl-1\n"
    assert host_get(f"http://{b.ip}:{PORT}/index.html") == b"hello-tpl-2\n"
    # and the pods reach each other
    assert fetch_in(a, web_a, f"http://{b.ip}:{PORT}/index.html") == "hello-tpl-2\n"
    assert fetch_in(b, web_b, f"http://{a.ip}:{PORT}/index.html") == "hello-tpl-1\n"


def test_ctr_run_from_a_template(containerd: ContainerdRig) -> None:
    """``ctr run --runtime-config-path`` picks the template configuration for one
    container: it runs in a VM restored from the rig's template."""
    out = containerd.ctr(
        "run",
        "--rm",
        "--runtime",
        "io.containerd.carapace.v2",
        "--runtime-config-path",
        str(containerd.template_config),
        "carapace.local/busybox:latest",
        "tpl-ctr",
        "sh",
        "-c",
        "cat /proc/sys/kernel/random/boot_id; cat /proc/cmdline",
        timeout=300,
    ).stdout
    boot_id, cmdline = out.splitlines()[:2]
    assert UUID.fullmatch(boot_id), out
    # a clone runs the template's kernel, booted with every module loaded at start
    assert "carapace.modules=all" in cmdline.split(), cmdline
    assert TemplateStore(containerd.template_dir).templates()
