"""VM templates with real VMs ([factory] template = true): the first pod builds the
template, the next ones restore it. Two pods restored from one template must not share
what a VM must own: their random streams, boot_id, MAC and clock; each gets the size it
asked for, its network (a namespace each, as CNI makes them) and its volumes. A changed
VM shape or image makes another template; a pod a template cannot fit boots cold."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import carapace
from carapace.config import Config, load_config
from carapace.factory import TemplateStore
from carapace.image.store import current_image

PODS = {"a": ("10.198.0.1", "10.198.0.2"), "b": ("10.198.1.1", "10.198.1.2")}
PROBE = (
    "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n';"
    " echo; date +%s; cat /sys/class/net/eth0/address; nproc;"
    " grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2"
)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    """The default configuration with templates on, in a template dir of the test's."""
    cfg = load_config()
    cfg.factory.template = True
    root = Path(f"/dev/shm/carapace-test-templates-{os.getpid()}")
    cfg.factory.template_dir = str(root / "templates")
    yield cfg
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[dict[str, str]]:
    """A network namespace per pod, each with a veth pair into it (host side
    10.198.N.1/24, pod side 10.198.N.2/24 named eth0, default route via the host)."""
    made: dict[str, str] = {}
    try:
        for name, (host_ip, pod_ip) in PODS.items():
            ns, host = f"carapace-tpl-{name}", f"cpt-tpl{name}"
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            subprocess.run(["ip", "link", "delete", host], capture_output=True)
            sh("ip", "netns", "add", ns)
            made[name] = f"/var/run/netns/{ns}"
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "addr", "add", f"{host_ip}/24", "dev", host)
            sh("ip", "link", "set", host, "up")
            for cmd in (
                ("ip", "addr", "add", f"{pod_ip}/24", "dev", "eth0"),
                ("ip", "link", "set", "eth0", "up"),
                ("ip", "link", "set", "lo", "up"),
                ("ip", "route", "add", "default", "via", host_ip),
            ):
                sh("ip", "netns", "exec", ns, *cmd)
        yield made
    finally:
        for name in PODS:
            subprocess.run(["ip", "link", "delete", f"cpt-tpl{name}"], capture_output=True)
            subprocess.run(["ip", "netns", "delete", f"carapace-tpl-{name}"], capture_output=True)


def probe(sb: carapace.Sandbox) -> tuple[dict[str, str], float, float]:
    """What the pod's guest says of itself, and the host's clock around asking it."""
    before = time.time()
    out = sb.run(["sh", "-c", PROBE])
    after = time.time()
    assert out.exit_code == 0, out.text
    boot_id, rand, clock, mac, cpus, mem_kib = out.text.split()
    seen = {"boot_id": boot_id, "random": rand, "clock": clock, "mac": mac}
    seen |= {"cpus": cpus, "mem_kib": mem_kib}
    return seen, before, after


def test_two_pods_restored_from_one_template_are_their_own(
    config: Config, netns: dict[str, str], tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "hello").write_text("from the host\n")
    store = TemplateStore(Path(config.factory.template_dir))
    with carapace.Sandbox(
        config=config, memory="1G", net=f"netns:{netns['a']}", volumes={str(vol): "/data"}
    ) as a:
        assert a.template, "the first pod did not start from a template"
        assert [t.key for t in store.templates()] == [a.template]
        with carapace.Sandbox(
            config=config, memory="1G", net=f"netns:{netns['b']}", volumes={str(vol): "/data"}
        ) as b:
            assert b.template == a.template
            pa, before_a, after_a = probe(a)
            pb, before_b, after_b = probe(b)
            for what in ("boot_id", "random", "mac"):
                assert pa[what] != pb[what], f"both clones have the same {what}: {pa[what]}"
            assert a.boot_id == pa["boot_id"] and b.boot_id == pb["boot_id"]
            for seen, before, after in ((pa, before_a, after_a), (pb, before_b, after_b)):
                # the clock was set to the host's (the template's is from when it was
                # saved): within 1 s, the guest's whole seconds being up to 1 s behind
                assert before - 2 < int(seen["clock"]) <= after + 1, (seen, before, after)
                assert seen["cpus"] == "1"
                assert 900_000 < int(seen["mem_kib"]) <= 1024 * 1024, seen
            for sb, name in ((a, "a"), (b, "b")):
                host_ip = PODS[name][0]
                ping = sb.run(["ping", "-c", "1", "-W", "5", host_ip])
                assert ping.exit_code == 0, ping.text
                assert sb.run(["cat", "/data/hello"]).text == "from the host\n"
                wrote = sb.run(["sh", "-c", f"echo from {name} > /data/from-{name}"])
                assert wrote.exit_code == 0, wrote.text
                assert (vol / f"from-{name}").read_text() == f"from {name}\n"
    # restoring used the template, it did not change it: still one, still complete
    assert [t.key for t in store.templates()] == [a.template]


def test_another_shape_or_image_makes_another_template(config: Config, tmp_path: Path) -> None:
    store = TemplateStore(Path(config.factory.template_dir))
    with carapace.Sandbox(config=config, cpus=1, memory="1G") as first:
        key = first.template
    assert key
    with carapace.Sandbox(config=config, cpus=2, memory="1536M") as bigger:
        assert bigger.template and bigger.template != key
        out = bigger.run(["sh", "-c", "nproc; grep MemTotal /proc/meminfo"]).text.split()
        assert out[0] == "2" and 1_400_000 < int(out[2]) <= 1536 * 1024, out
    # a new initrd (the same bytes, another file) is another image
    img = current_image(config.image_dir)
    assert img is not None
    initrd = tmp_path / "initrd.img"
    shutil.copyfile(img.initrd, initrd)
    cfg = load_config()
    cfg.factory = config.factory
    cfg.hypervisor.kernel, cfg.hypervisor.initrd = str(img.kernel), str(initrd)
    with carapace.Sandbox(config=cfg, cpus=1, memory="1G") as rebuilt:
        assert rebuilt.template and rebuilt.template not in (key, bigger.template)
    assert {key, bigger.template, rebuilt.template} <= {t.key for t in store.templates()}


def test_a_pod_the_template_cannot_fit_boots_cold(config: Config) -> None:
    # user-mode networking cannot be hot-added into a restored VM
    with carapace.Sandbox(config=config, net="user") as sb:
        assert sb.template == ""
        assert sb.run(["ip", "-o", "-4", "addr", "show", "eth0"]).exit_code == 0
