"""Pod networking through containerd's CRI and the rig's bridge CNI: a carapace pod's
guest gets the address, MTU and routes CNI gave the pod's network namespace, the pod
files CRI writes (resolv.conf from the DNSConfig, hostname, a kubelet-style hosts
file), TCP between carapace pods, a runc pod and the host both ways, a CNI MTU of 1400,
and what is left once containerd cleaned up after a killed QEMU or a killed shim.

Traffic goes only between this module's pods and the rig's bridge on the host. A VM
boot costs seconds under TCG, so the tests that only look share three pods (module
fixture ``net``: two carapace pods serving with busybox httpd, one runc pod); the MTU
and fault tests make their own.

The MTU case: CRI (containerd 1.6) loads the first conf file of its conf_dir
(``max_conf_num = 1``) and reloads when the directory changes, so ``cni_mtu`` puts a
copy of the rig's conflist with the bridge plugin's ``"mtu": 1400`` first in the
directory (same network name, bridge and IPAM store: addresses do not clash with the
other pods'), waits until CRI reports it loaded, and takes it out afterwards. The
bridge lowers its own MTU to its smallest port's while that pod lives and takes the
old one back when the port goes (Linux's automatic bridge MTU).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cri_api as api
import pytest

from carapace.network.tcfilter import traces
from carapace.shim.command import socket_path

from ..conftest import RUN_ROOT
from ..procs import processes, qemu_of
from .rig import (
    BRIDGE,
    BUSYBOX_IMAGE,
    POD_SUBNET,
    ContainerdRig,
    CriClient,
    netns_names,
    pod_config,
)

PORT = 8080
SERVE = "mkdir -p /www && echo hello-{name} > /www/index.html && exec httpd -f -p {port} -h /www"
DNS = api.DNSConfig(servers=["10.96.0.10"], searches=["svc.test"], options=["ndots:2"])
BIG = 10 << 20  # the file the host fetches from a pod
PREFIX = ipaddress.ip_network(POD_SUBNET).prefixlen
#: What ``attach`` makes in a pod's namespace with one interface (labelled by traces()).
CARAPACE_MADE = ("tap0_carapace", "eth0 ingress redirect")
MTU_CONF = "05-carapace-test-mtu.conflist"  # sorts before the rig's 10-carapace-test


def wait_for(what: str, cond: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def in_netns(netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={netns}", *argv], capture_output=True, text=True, timeout=30
    )


@dataclass(frozen=True)
class Link:
    mtu: int
    mac: str


def link_in(netns: str, name: str) -> Link | None:
    """A link's MTU and MAC in a network namespace (None if it has no such link)."""
    r = in_netns(netns, "ip", "-o", "link", "show", "dev", name)
    if r.returncode != 0:
        return None
    mtu = re.search(r" mtu (\d+) ", r.stdout)
    mac = re.search(r"link/ether ([0-9a-f:]{17})", r.stdout)
    assert mtu and mac, r.stdout
    return Link(int(mtu.group(1)), mac.group(1))


def bridge_gateway() -> str:
    """The rig's bridge address (isGateway): the pods' default gateway."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", BRIDGE], capture_output=True, text=True
    ).stdout
    m = re.search(r"inet ([0-9.]+)/", out)
    assert m, f"no IPv4 address on {BRIDGE}: {out!r}"
    assert ipaddress.ip_address(m.group(1)) in ipaddress.ip_network(POD_SUBNET)
    return m.group(1)


def host_get(url: str, timeout: float = 60.0) -> bytes:
    """GET ``url`` from the host, never through a proxy, retrying while httpd starts."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(url, timeout=30) as r:
                return bytes(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def carapace_traces(netns: str) -> set[str]:
    """carapace's taps and tc redirects in ``netns``, without the namespace label."""
    return {t.split(": ", 1)[1] for t in traces(netns)}


def shim_of(containerd: ContainerdRig, pod_id: str) -> list[int]:
    ours = set(containerd.shim_pids())
    return [pid for pid, argv in processes() if pid in ours and pod_id.encode() in argv]


def shim_socket(containerd: ContainerdRig, pod_id: str) -> Path:
    return Path(socket_path(str(containerd.socket), "k8s.io", pod_id))


class Pod:
    """A CRI pod (RunPodSandbox) and its containers (busybox)."""

    def __init__(
        self,
        cri: CriClient,
        name: str,
        handler: str,
        log_dir: Path,
        dns: api.DNSConfig | None = None,
    ) -> None:
        self.cri = cri
        self.name = name
        self.handler = handler
        self.config = pod_config(name, str(log_dir))
        if dns is not None:
            self.config.dns_config.CopyFrom(dns)
        self.id = cri.runtime.RunPodSandbox(
            api.RunPodSandboxRequest(config=self.config, runtime_handler=handler), timeout=300
        ).pod_sandbox_id
        self.removed = False

    def status(self, verbose: bool = False) -> Any:
        return self.cri.runtime.PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=self.id, verbose=verbose), timeout=30
        )

    @property
    def ip(self) -> str:
        return str(self.status().status.network.ip)

    def netns(self) -> str:
        """The pod's network namespace (CRI's, under /var/run/netns) as its spec names it."""
        info = json.loads(self.status(verbose=True).info["info"])
        [path] = [
            ns["path"]
            for ns in info["runtimeSpec"]["linux"]["namespaces"]
            if ns["type"] == "network"
        ]
        assert path.startswith("/var/run/netns/"), path
        return str(path)

    def container(
        self,
        name: str,
        command: list[str],
        mounts: Sequence[Any] = (),
        pid: int | None = None,
    ) -> str:
        """A started container. ``pid``: its pid namespace as the kubelet asks it
        (CONTAINER, the kubelet's default, or POD: shareProcessNamespace); None sends no
        security context."""
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name),
            image=api.ImageSpec(image=BUSYBOX_IMAGE),
            command=command,
            log_path=f"{self.name}-{name}.log",
            mounts=list(mounts),
        )
        if pid is not None:
            config.linux.security_context.namespace_options.CopyFrom(
                api.NamespaceOption(network=api.NamespaceMode.POD, pid=pid)
            )
        return self.start(config)

    def start(self, config: Any) -> str:
        """Create and start a container of ``config`` (an api.ContainerConfig); its id."""
        cid = self.cri.runtime.CreateContainer(
            api.CreateContainerRequest(
                pod_sandbox_id=self.id, config=config, sandbox_config=self.config
            ),
            timeout=120,
        ).container_id
        self.cri.runtime.StartContainer(api.StartContainerRequest(container_id=cid), timeout=120)
        return str(cid)

    def exec(self, cid: str, cmd: list[str], timeout: int = 60) -> tuple[int, str, str]:
        r = self.cri.runtime.ExecSync(
            api.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=timeout + 30
        )
        return r.exit_code, r.stdout.decode(), r.stderr.decode()

    def out(self, cid: str, cmd: list[str], timeout: int = 60) -> str:
        """The stdout of ``cmd``, which must succeed."""
        code, out, err = self.exec(cid, cmd, timeout)
        assert code == 0, f"{cmd} in {self.name}: exit {code}: {err}{out}"
        return out

    def spec_mounts(self, cid: str) -> dict[str, str]:
        """destination -> host source of the container's bind mounts (its OCI spec)."""
        r = self.cri.runtime.ContainerStatus(
            api.ContainerStatusRequest(container_id=cid, verbose=True), timeout=30
        )
        spec = json.loads(r.info["info"])["runtimeSpec"]
        return {m["destination"]: m.get("source", "") for m in spec.get("mounts", [])}

    def remove(self) -> None:
        if self.removed:
            return
        rt = self.cri.runtime
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=self.id), timeout=300)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=self.id), timeout=300)
        self.removed = True


def fetch_in(pod: Pod, cid: str, url: str) -> str:
    """``wget -O- url`` in a container of ``pod`` (retried while the server starts).
    Not ``wget -T``: Debian's busybox 1.35 wget segfaults with it; ``timeout`` instead."""
    script = f"for i in $(seq 10); do timeout 20 wget -q -O- {url} && exit 0; sleep 1; done; exit 1"
    return pod.out(cid, ["sh", "-c", script], timeout=150)


def serve(name: str) -> list[str]:
    return ["sh", "-c", SERVE.format(name=name, port=PORT)]


def kubelet_hosts(ip: str, hostname: str) -> str:
    """The hosts file the kubelet writes and mounts at /etc/hosts (CRI's own has no pod
    entry: the kubelet's etc-hosts mount supplies it)."""
    return (
        "# Kubernetes-managed hosts file.\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "fe00::0\tip6-localnet\n"
        "fe00::1\tip6-allnodes\n"
        "fe00::2\tip6-allrouters\n"
        f"{ip}\t{hostname}\n"
    )


def assert_pod_gone(containerd: ContainerdRig, pod_id: str) -> None:
    wait_for(f"pod {pod_id}'s QEMU to end", lambda: not qemu_of(pod_id), 60)
    wait_for(f"pod {pod_id}'s shim to end", lambda: not shim_of(containerd, pod_id), 60)
    assert not (RUN_ROOT / pod_id).exists(), f"run dir of {pod_id} left"
    assert not shim_socket(containerd, pod_id).exists()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def containerd_left_clean(
    containerd: ContainerdRig, request: pytest.FixtureRequest
) -> Iterator[None]:
    """As the package conftest's, but relative to what existed before the test: the
    module's shared pods (``net``) outlive each test that uses them."""
    before, netns_before = containerd.inventory(), netns_names()
    yield
    after = containerd.inventory()
    left = {k: sorted(set(v) - set(before.get(k, ()))) for k, v in after.items()}
    left = {k: v for k, v in left.items() if v}
    new_netns = sorted(netns_names() - netns_before)
    if left:
        cri = containerd.cri()
        try:
            for pod_id in left.get("cri pods", []):
                cri.runtime.StopPodSandbox(
                    api.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=300
                )
                cri.runtime.RemovePodSandbox(
                    api.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=300
                )
        finally:
            cri.close()
    assert not left and not new_netns, (
        f"{request.node.name} left behind in containerd: {left}; network namespaces: {new_netns}"
    )


@dataclass
class Net:
    vm1: Pod  # carapace, DNSConfig, kubelet-style /etc/hosts; serves hello-vm-1
    web1: str
    vm2: Pod  # carapace; serves hello-vm-2
    web2: str
    runc: Pod  # runc; serves hello-runc
    webr: str
    hosts: str  # the hosts file mounted at /etc/hosts in web1


@pytest.fixture(scope="module")
def net(containerd: ContainerdRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    cri = containerd.cri()
    logs = tmp_path_factory.mktemp("cri-net")
    made: list[Pod] = []
    try:
        vm1 = Pod(cri, "net-vm-1", "carapace", logs, dns=DNS)
        made.append(vm1)
        hosts = kubelet_hosts(vm1.ip, vm1.name)
        (logs / "etc-hosts").write_text(hosts)
        web1 = vm1.container(
            "web",
            serve("vm-1"),
            [api.Mount(container_path="/etc/hosts", host_path=str(logs / "etc-hosts"))],
        )
        vm2 = Pod(cri, "net-vm-2", "carapace", logs)
        made.append(vm2)
        web2 = vm2.container("web", serve("vm-2"))
        runc = Pod(cri, "net-runc", "runc", logs)
        made.append(runc)
        webr = runc.container("web", serve("runc"))
        yield Net(vm1, web1, vm2, web2, runc, webr, hosts)
    finally:
        try:
            for pod in reversed(made):
                pod.remove()
        finally:
            cri.close()
    for pod in made:
        assert_pod_gone(containerd, pod.id)


@contextlib.contextmanager
def cni_mtu(containerd: ContainerdRig, cri: CriClient, mtu: int) -> Iterator[None]:
    """The rig's CNI network with the bridge plugin's ``mtu`` while in the block."""
    conf = containerd.cni_conflist()
    conf["plugins"][0]["mtu"] = mtu
    path = containerd.cni_conf_dir / MTU_CONF
    tmp = path.with_suffix(".tmp")  # libcni reads only .conf, .conflist and .json
    tmp.write_text(json.dumps(conf, indent=2) + "\n")
    tmp.rename(path)  # one fsnotify event with the whole file
    try:
        wait_for(f"CRI to load the CNI config with mtu {mtu}", lambda: loaded_mtu(cri) == mtu, 30)
        yield
    finally:
        path.unlink(missing_ok=True)
        wait_for("CRI to load the rig's CNI config again", lambda: loaded_mtu(cri) is None, 30)


def loaded_mtu(cri: CriClient) -> int | None:
    """The bridge plugin's mtu in the CNI network CRI has loaded (None: not set)."""
    info = cri.runtime.Status(api.StatusRequest(verbose=True), timeout=30).info
    config = json.loads(info["cniconfig"])
    for network in config["Networks"]:
        source = json.loads(network["Config"]["Source"])
        for plugin in source.get("plugins", []):
            if plugin.get("type") == "bridge":
                mtu = plugin.get("mtu")
                return None if mtu is None else int(mtu)
    raise AssertionError(f"no bridge network in CRI's CNI config: {config}")


# -- one pod: address, MTU, routes, pod files ---------------------------------------------


def test_guest_eth0_has_the_pod_ip_mtu_and_default_route(net: Net) -> None:
    pod, cid = net.vm1, net.web1
    status = pod.status().status
    assert status.state == api.PodSandboxState.SANDBOX_READY
    ip = status.network.ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(POD_SUBNET)
    netns = pod.netns()
    veth = link_in(netns, "eth0")
    assert veth is not None
    assert veth.mtu == 1500  # the rig's bridge plugin sets no mtu: the kernel's default

    addr = pod.out(cid, ["ip", "-o", "-4", "addr", "show", "eth0"])
    assert f"inet {ip}/{PREFIX} " in addr, addr
    assert pod.out(cid, ["cat", "/sys/class/net/eth0/mtu"]) == f"{veth.mtu}\n"
    # the guest NIC has the veth's MAC (the veth keeps its address and MAC)
    assert pod.out(cid, ["cat", "/sys/class/net/eth0/address"]) == f"{veth.mac}\n"
    routes = pod.out(cid, ["ip", "route"])
    assert re.search(rf"^default via {re.escape(bridge_gateway())} dev eth0\b", routes, re.M), (
        routes
    )
    assert pod.out(cid, ["ls", "/sys/class/net"]).split() == ["eth0", "lo"]
    # what joins them on the host: carapace's tap and redirect in the pod's namespace
    assert carapace_traces(netns) == set(CARAPACE_MADE)
    tap = link_in(netns, "tap0_carapace")
    assert tap is not None and tap.mtu == veth.mtu


def test_resolv_conf_hostname_and_hosts_are_the_pods(net: Net) -> None:
    pod, cid = net.vm1, net.web1
    resolv = pod.out(cid, ["cat", "/etc/resolv.conf"])
    words = [line.split() for line in resolv.splitlines() if line.strip()]
    assert [w[1:] for w in words if w[0] == "nameserver"] == [[s] for s in DNS.servers], resolv
    assert [w[1:] for w in words if w[0] == "search"] == [list(DNS.searches)], resolv
    assert [w[1:] for w in words if w[0] == "options"] == [list(DNS.options)], resolv
    # byte for byte what CRI wrote for the pod (the source of the spec's bind)
    mounts = pod.spec_mounts(cid)
    assert resolv == Path(mounts["/etc/resolv.conf"]).read_text()

    assert pod.out(cid, ["hostname"]) == f"{pod.name}\n"
    assert pod.out(cid, ["cat", "/etc/hostname"]) == Path(mounts["/etc/hostname"]).read_text()
    assert Path(mounts["/etc/hostname"]).read_text() == f"{pod.name}\n"

    # the kubelet's hosts file (the pod's own entry) ...
    hosts = pod.out(cid, ["cat", "/etc/hosts"])
    assert hosts == net.hosts
    assert f"{pod.ip}\t{pod.name}\n" in hosts
    # ... and, without one, the hosts file CRI writes for the pod
    other = net.vm2.out(net.web2, ["cat", "/etc/hosts"])
    source = net.vm2.spec_mounts(net.web2)["/etc/hosts"]
    assert other == Path(source).read_text()
    assert re.search(r"^127\.0\.0\.1\s+localhost\b", other, re.M), other
    # the other pod got no DNSConfig: CRI gave it the host's resolv.conf, not vm-1's
    assert "svc.test" not in net.vm2.out(net.web2, ["cat", "/etc/resolv.conf"])


# -- traffic ----------------------------------------------------------------------------------


def test_carapace_pods_reach_each_other_both_ways(net: Net) -> None:
    assert fetch_in(net.vm1, net.web1, f"http://{net.vm2.ip}:{PORT}/index.html") == "hello-vm-2\n"
    assert fetch_in(net.vm2, net.web2, f"http://{net.vm1.ip}:{PORT}/index.html") == "hello-vm-1\n"


def test_runc_and_carapace_pods_reach_each_other_both_ways(net: Net) -> None:
    assert fetch_in(net.runc, net.webr, f"http://{net.vm1.ip}:{PORT}/index.html") == "hello-vm-1\n"
    assert fetch_in(net.vm1, net.web1, f"http://{net.runc.ip}:{PORT}/index.html") == "hello-runc\n"


def test_host_fetches_10mib_from_a_carapace_pod(net: Net) -> None:
    pod, cid = net.vm1, net.web1
    out = pod.out(
        cid,
        ["sh", "-c", f"head -c {BIG} /dev/urandom > /www/big && sha256sum /www/big"],
        timeout=120,
    )
    digest = out.split()[0]
    assert re.fullmatch(r"[0-9a-f]{64}", digest), out
    try:
        data = host_get(f"http://{pod.ip}:{PORT}/big")
    finally:
        pod.exec(cid, ["rm", "-f", "/www/big"])
    assert len(data) == BIG
    assert hashlib.sha256(data).hexdigest() == digest


# -- MTU ----------------------------------------------------------------------------------------


def test_cni_mtu_1400_reaches_the_guest(
    containerd: ContainerdRig, cri: CriClient, tmp_path: Path
) -> None:
    bridge_mtu = link_in("/proc/self/ns/net", BRIDGE)
    assert bridge_mtu is not None
    with cni_mtu(containerd, cri, 1400):
        pod = Pod(cri, "net-mtu", "carapace", tmp_path)
    try:
        cid = pod.container("k", ["sleep", "3600"])
        netns = pod.netns()
        veth, tap = link_in(netns, "eth0"), link_in(netns, "tap0_carapace")
        assert veth is not None and veth.mtu == 1400
        assert tap is not None and tap.mtu == 1400
        assert pod.out(cid, ["cat", "/sys/class/net/eth0/mtu"]) == "1400\n"
        addr = pod.out(cid, ["ip", "-o", "-4", "addr", "show", "eth0"])
        assert f"inet {pod.ip}/{PREFIX} " in addr, addr
        # a full-size frame crosses tap, veth and bridge (1372 + 28 = 1400 bytes of IP)
        gateway = bridge_gateway()
        ping = pod.exec(cid, ["ping", "-c", "1", "-W", "10", "-s", "1372", gateway])
        assert ping[0] == 0, ping
    finally:
        pod.remove()
    assert_pod_gone(containerd, pod.id)
    # the bridge took its MTU back with the 1400 port gone (the other tests' pods)
    assert link_in("/proc/self/ns/net", BRIDGE) == bridge_mtu


# -- faults -------------------------------------------------------------------------------------


@contextlib.contextmanager
def kept_netns(path: str) -> Iterator[str]:
    """``path``'s namespace kept alive (by an fd) after CRI removes it; a path to it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


EXITED = api.ContainerState.CONTAINER_EXITED


def container_state(cri: CriClient, cid: str) -> int:
    req = api.ContainerStatusRequest(container_id=cid)
    return int(cri.runtime.ContainerStatus(req, timeout=30).status.state)


def fault_then_cleanup(
    containerd: ContainerdRig,
    cri: CriClient,
    tmp_path: Path,
    name: str,
    victim: Callable[[Pod], int],
) -> None:
    """A carapace pod with a container; ``victim(pod)`` is SIGKILLed; containerd notices
    and cleans up on its own (it deletes the dead tasks, or runs the shim's ``delete``):
    before StopPodSandbox, CNI's veth is still there and nothing of carapace's is; then
    StopPodSandbox + RemovePodSandbox leave no QEMU, shim, run dir, tap or namespace."""
    pod = Pod(cri, name, "carapace", tmp_path)
    try:
        cid = pod.container("k", ["sleep", "3600"])
        netns = pod.netns()
        assert carapace_traces(netns) == set(CARAPACE_MADE)  # what must go
        with kept_netns(netns) as kept:
            os.kill(victim(pod), signal.SIGKILL)
            wait_for(
                "the pod to be NOTREADY",
                lambda: pod.status().status.state == api.PodSandboxState.SANDBOX_NOTREADY,
            )
            # CRI has handled the container's exit (RemovePodSandbox refuses a container
            # CRI still counts as running; the kubelet would retry, the test waits)
            wait_for("the container to be EXITED", lambda: container_state(cri, cid) == EXITED)
            wait_for("the pod's QEMU to end", lambda: not qemu_of(pod.id))
            wait_for("the pod's run dir to go", lambda: not (RUN_ROOT / pod.id).exists())
            # CNI's veth is still there (the netns too); carapace's tap and redirect not
            assert link_in(netns, "eth0") is not None
            assert carapace_traces(netns) == set()

            pod.remove()
            assert_pod_gone(containerd, pod.id)
            assert not Path(netns).exists()  # CRI removed the pod's namespace
            assert carapace_traces(kept) == set()  # and nothing of ours lives on in it
    finally:
        pod.remove()


def test_qemu_killed_then_stop_and_remove_leave_nothing(
    containerd: ContainerdRig, cri: CriClient, tmp_path: Path
) -> None:
    def qemu(pod: Pod) -> int:
        [pid] = qemu_of(pod.id)
        return pid

    fault_then_cleanup(containerd, cri, tmp_path, "net-qemu-kill", qemu)


def test_shim_killed_then_stop_and_remove_leave_nothing(
    containerd: ContainerdRig, cri: CriClient, tmp_path: Path
) -> None:
    def shim(pod: Pod) -> int:
        [pid] = shim_of(containerd, pod.id)
        return pid

    fault_then_cleanup(containerd, cri, tmp_path, "net-shim-kill", shim)
