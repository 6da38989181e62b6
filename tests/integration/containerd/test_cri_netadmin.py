"""NET_ADMIN and privileged containers of a carapace pod through containerd's CRI.

A container granted NET_ADMIN makes a bridge, a veth pair, iptables NAT and filter
rules (iptables-nft, as Debian ships it, in the nettools test image) that act, and a
tap on the /dev/net/tun it was given (as a device plugin gives it); the kernel modules
these need are not loaded when the pod starts but on the guest kernel's request, by
the image's modprobe. A container of the same pod without the capability is
refused the same. A privileged container (which, with the runtime's
``privileged_without_host_devices = true``, gets none of the host's devices; and, in
containerd 1.6, no device cgroup leave beyond the default ones either) makes links too.

One pod (a VM boot costs seconds under TCG) with three containers serves every test:
``netadmin`` (NET_ADMIN added), ``plain`` (containerd's default capabilities) and
``privileged``. The containers of a pod share its network namespace, so the links and
rules one makes are the pod's: each test uses names of its own.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cri_api as api
import pytest

from .rig import NETTOOLS_IMAGE, ContainerdRig, CriClient, pod_config
from .test_cri_network import (  # the module's leak check: relative to a shared pod
    Pod,
    assert_pod_gone,
    containerd_left_clean,  # noqa: F401
)

IP = "/usr/sbin/ip"  # iproute2's (busybox's sh would run its own ip applet for "ip")
IPTABLES = "/usr/sbin/iptables"  # iptables-nft
LEGACY = "/usr/sbin/iptables-legacy"
#: Modules a workload needs that must not be loaded before it asks (lsmod names).
ON_REQUEST = ("bridge", "veth", "nf_tables", "nft_chain_nat", "nf_nat", "xt_REDIRECT", "tun")
SLEEP = ["sleep", "3600"]
TUN = "/dev/net/tun"  # misc 10:200, the same numbers in the guest
NAT_RULE = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80", "-j", "REDIRECT"]
NAT_RULE += ["--to-ports", "8080"]
REFUSED = re.compile(r"Operation not permitted|Permission denied")


class PrivilegedPod(Pod):
    """A carapace pod whose sandbox is privileged, as the kubelet asks it when one of
    its containers is (CRI refuses a privileged container in any other)."""

    def __init__(self, cri: CriClient, name: str, log_dir: Path) -> None:
        self.cri = cri
        self.name = name
        self.handler = "carapace"
        self.config = pod_config(name, str(log_dir))
        self.config.linux.security_context.privileged = True
        self.id = cri.runtime.RunPodSandbox(
            api.RunPodSandboxRequest(config=self.config, runtime_handler=self.handler),
            timeout=300,
        ).pod_sandbox_id
        self.removed = False


@dataclass
class NetPod:
    pod: Pod
    netadmin: str
    plain: str
    privileged: str
    modules_at_start: set[str]  # /proc/modules before any test ran a command

    def run(self, cid: str, cmd: list[str], timeout: int = 120) -> tuple[int, str, str]:
        return self.pod.exec(cid, cmd, timeout)

    def out(self, cid: str, cmd: list[str], timeout: int = 120) -> str:
        return self.pod.out(cid, cmd, timeout)


def start(
    pod: Pod,
    name: str,
    security: api.LinuxContainerSecurityContext,
    devices: tuple[api.Device, ...] = (),
) -> str:
    """A started container of ``pod`` from the nettools image, sleeping."""
    config = api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name),
        image=api.ImageSpec(image=NETTOOLS_IMAGE),
        command=SLEEP,
        log_path=f"{pod.name}-{name}.log",
        devices=list(devices),
    )
    config.linux.security_context.CopyFrom(security)
    return pod.start(config)


def loaded_modules(text: str) -> set[str]:
    return {line.split()[0] for line in text.splitlines() if line.strip()}


def links(netpod: NetPod) -> dict[str, str]:
    """name -> the link's line of ``ip -o link`` (as the netadmin container sees them)."""
    out = netpod.out(netpod.netadmin, [IP, "-o", "link", "show"])
    found = {}
    for line in out.splitlines():
        m = re.match(r"\d+: ([^:@]+)[@:]", line)
        if m:
            found[m.group(1)] = line
    return found


@pytest.fixture(scope="module")
def netpod(containerd: ContainerdRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetPod]:
    images = containerd.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split()
    if NETTOOLS_IMAGE not in images:
        pytest.fail(
            f"{NETTOOLS_IMAGE} is not in the test containerd: scripts/build-test-images "
            "builds it from the host's iproute2 and iptables (scripts/install-deps.sh)"
        )
    cri: CriClient = containerd.cri()
    pod = PrivilegedPod(cri, "netadmin", tmp_path_factory.mktemp("cri-netadmin"))
    try:
        netadmin = start(
            pod,
            "netadmin",
            api.LinuxContainerSecurityContext(
                capabilities=api.Capability(add_capabilities=["NET_ADMIN"])
            ),
            # as a device plugin hands it: the node, and the device cgroup's leave
            (api.Device(container_path=TUN, host_path=TUN, permissions="rwm"),),
        )
        plain = start(pod, "plain", api.LinuxContainerSecurityContext())
        privileged = start(pod, "privileged", api.LinuxContainerSecurityContext(privileged=True))
        modules = loaded_modules(pod.out(plain, ["cat", "/proc/modules"]))
        yield NetPod(pod, netadmin, plain, privileged, modules)
    finally:
        try:
            pod.remove()
        finally:
            cri.close()
    assert_pod_gone(containerd, pod.id)


def test_workload_modules_are_not_loaded_at_start(netpod: NetPod) -> None:
    assert netpod.modules_at_start, "no module loaded at all: /proc/modules unread?"
    assert "virtio_net" in netpod.modules_at_start  # the agent's own, for the pod network
    assert not set(ON_REQUEST) & netpod.modules_at_start


def test_net_admin_makes_a_bridge_and_a_veth_pair(netpod: NetPod) -> None:
    c = netpod.netadmin
    netpod.out(c, [IP, "link", "add", "br0", "type", "bridge"])
    netpod.out(c, [IP, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
    netpod.out(c, [IP, "link", "set", "v0", "master", "br0"])
    found = links(netpod)
    assert "br0" in found and "v0" in found and "v1" in found, found
    assert "master br0" in found["v0"]
    assert "v1@v0" in found["v1"]
    modules = loaded_modules(netpod.out(c, ["cat", "/proc/modules"]))
    assert {"bridge", "veth"} <= modules


def test_net_admin_adds_iptables_rules_that_work(netpod: NetPod) -> None:
    c = netpod.netadmin
    netpod.out(c, [IPTABLES, *NAT_RULE])
    netpod.out(c, [IPTABLES, "-A", "INPUT", "-j", "ACCEPT"])
    assert "-A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080" in netpod.out(
        c, [IPTABLES, "-t", "nat", "-S", "OUTPUT"]
    )
    assert "-A INPUT -j ACCEPT" in netpod.out(c, [IPTABLES, "-S", "INPUT"]).splitlines()
    assert iptables_backend(netpod.out(c, [IPTABLES, "-V"])) == "nf_tables"
    # and the NAT rule acts: port 80 on the loopback reaches a server on 8080
    serve = "mkdir -p /www && echo redirected > /www/index.html && httpd -p 8080 -h /www"
    netpod.out(c, ["sh", "-c", serve])
    fetch = "for i in $(seq 20); do wget -q -O- http://127.0.0.1:80/ && exit 0; sleep 1; done"
    assert netpod.out(c, ["sh", "-c", fetch + "; exit 1"], timeout=180) == "redirected\n"
    modules = loaded_modules(netpod.out(c, ["cat", "/proc/modules"]))
    assert {"nf_tables", "nft_chain_nat", "nf_nat", "nf_conntrack"} <= modules


def test_net_admin_adds_iptables_legacy_rules(netpod: NetPod) -> None:
    """iptables-legacy loads ip_tables itself (its own modprobe, in the container, which
    cannot): the agent loads it for a container with CAP_NET_ADMIN, and the kernel asks
    for the table's module (iptable_nat) from there."""
    c = netpod.netadmin
    modules = loaded_modules(netpod.out(c, ["cat", "/proc/modules"]))
    log = netpod.out(netpod.privileged, ["dmesg"])[-3000:]
    assert {"ip_tables", "ip6_tables"} <= modules, log
    rule = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "81"]
    netpod.out(c, [LEGACY, *rule, "-j", "REDIRECT", "--to-ports", "8081"])
    assert "-A OUTPUT -p tcp -m tcp --dport 81 -j REDIRECT --to-ports 8081" in netpod.out(
        c, [LEGACY, "-t", "nat", "-S", "OUTPUT"]
    )
    assert iptables_backend(netpod.out(c, [LEGACY, "-V"])) == "legacy"
    modules = loaded_modules(netpod.out(c, ["cat", "/proc/modules"]))
    assert {"ip_tables", "iptable_nat"} <= modules


def iptables_backend(version: str) -> str:
    m = re.search(r"\((\w+)\)", version)
    assert m, version
    return m.group(1)


def test_without_net_admin_the_same_is_refused(netpod: NetPod) -> None:
    c = netpod.plain
    for cmd in (
        [IP, "link", "add", "br9", "type", "bridge"],
        [IP, "link", "add", "v8", "type", "veth", "peer", "name", "v9"],
        [IPTABLES, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "81", "-j", "ACCEPT"],
    ):
        code, out, err = netpod.run(c, cmd)
        assert code != 0, f"{cmd} succeeded without NET_ADMIN: {out}"
        assert REFUSED.search(err), f"{cmd}: {err!r}"
    found = links(netpod)
    assert not {"br9", "v8", "v9"} & set(found)
    nat = netpod.out(netpod.netadmin, [IPTABLES, "-t", "nat", "-S", "OUTPUT"])
    assert "--dport 81" not in nat
    # and the capability is indeed absent (CapEff has no bit 12, CAP_NET_ADMIN)
    status = netpod.out(c, ["cat", "/proc/self/status"])
    [cap_eff] = re.findall(r"^CapEff:\s*([0-9a-f]+)$", status, re.M)
    assert not int(cap_eff, 16) & (1 << 12)


def test_net_admin_makes_a_tap_on_a_device_it_was_given(netpod: NetPod) -> None:
    # tun loads when its node is first opened (char-major-10-200)
    assert "tun" not in loaded_modules(netpod.out(netpod.netadmin, ["cat", "/proc/modules"]))
    netpod.out(netpod.netadmin, [IP, "tuntap", "add", "tap0", "mode", "tap"])
    assert "tap0" in links(netpod)
    assert "tun" in loaded_modules(netpod.out(netpod.netadmin, ["cat", "/proc/modules"]))
    # the plain container neither has the node nor may make a link
    code, _, err = netpod.run(netpod.plain, [IP, "tuntap", "add", "tap9", "mode", "tap"])
    assert code != 0 and "tap9" not in links(netpod), err


def test_privileged_container_makes_links(netpod: NetPod) -> None:
    c = netpod.privileged
    status = netpod.out(c, ["cat", "/proc/self/status"])
    [cap_eff] = re.findall(r"^CapEff:\s*([0-9a-f]+)$", status, re.M)
    assert int(cap_eff, 16) & (1 << 21)  # CAP_SYS_ADMIN: every capability
    netpod.out(c, [IP, "link", "add", "br1", "type", "bridge"])
    netpod.out(c, [IP, "link", "add", "vx1", "type", "vxlan", "id", "42", "dstport", "4789"])
    found = links(netpod)
    assert {"br1", "vx1"} <= set(found), found
    # the kernel asked the image's modprobe (carapace.guest.modprobe) for what it lacked
    log = netpod.out(c, ["dmesg"])
    requests = re.findall(r"carapace-modprobe: (\S+): loaded (.*)", log)
    asked = {name for name, _ in requests}
    assert {"rtnl-link-bridge", "rtnl-link-vxlan"} <= asked, log
    for line in log.splitlines():
        if "carapace-modprobe" in line:
            print(line)


def test_privileged_container_gets_no_host_device(
    netpod: NetPod, containerd: ContainerdRig
) -> None:
    # the runtime's setting (carapace.cli.install.SNIPPET, which the rig registers)...
    config = tomllib.loads(containerd.config_path.read_text())
    runtimes = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtimes["carapace"]["privileged_without_host_devices"] is True
    # ...keeps the host's devices (/dev/kvm, disks, loops) out of the spec
    r = netpod.pod.cri.runtime.ContainerStatus(
        api.ContainerStatusRequest(container_id=netpod.privileged, verbose=True), timeout=30
    )
    spec = json.loads(r.info["info"])["runtimeSpec"]
    assert spec["process"]["capabilities"]["effective"].count("CAP_SYS_ADMIN") == 1
    devices = [d["path"] for d in spec["linux"].get("devices") or []]
    assert not [d for d in devices if re.match(r"/dev/(sd|vd|nvme|loop|dm-|kvm|mapper)", d)]
    listing = netpod.out(netpod.privileged, ["ls", "/dev"]).split()
    assert "kvm" not in listing and not [d for d in listing if d.startswith(("sd", "nvme"))]
