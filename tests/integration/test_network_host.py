"""carapace.network on a real kernel, without a VM: the test makes a network namespace
standing for the pod's (what CNI would make: a veth with addresses, MTU 1400, routes, a
permanent neighbour) and a second one for the other end of the veth (the host's side:
the test talks to nothing but its own namespaces). Then discover, attach (tap + tc
mirred both ways, frames through the tap's fd), stats and teardown.

Root; addresses only in 10.199.0.0/16 and fd00:199::/64. Run under the machine-wide
lock: ``flock /tmp/carapace-integration.lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from carapace.errors import AlreadyExists, HostError, InvalidArgument
from carapace.network import discover, netns, stats, tcfilter
from carapace.network.model import Interface, IPAddress, Neighbor, NetworkConfig, Route

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

#: ioctl: the size of the virtio-net header a tap with IFF_VNET_HDR reads and writes.
TUNGETVNETHDRSZ = 0x800454D7
#: An ethertype for local experiments (IEEE 802): no stack answers it.
ETH_TEST = 0x88B5


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr}"
    return r.stdout


def ip_json(ns: str, *argv: str) -> Any:
    return json.loads(sh("ip", "-n", ns, "-j", *argv) or "[]")


def mac_of(ns: str, dev: str) -> str:
    return str(ip_json(ns, "link", "show", "dev", dev)[0]["address"])


@dataclass
class Pod:
    """The pod's namespace (``ns``) and the other end's (``peer``), with their paths."""

    ns: str
    peer: str
    fds: list[int] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.ns}"

    @property
    def peer_path(self) -> str:
        return f"/var/run/netns/{self.peer}"

    def add_veth(self, pod_dev: str, peer_dev: str, net: int) -> None:
        """A veth pair as CNI (or Multus) makes one: ``pod_dev`` in the pod's namespace
        with 10.199.<net>.2/24, MTU 1400, up; ``peer_dev`` with 10.199.<net>.1/24."""
        sh("ip", "-n", self.peer, "link", "add", peer_dev, "type", "veth", "peer", "name",
           pod_dev, "netns", self.ns)  # fmt: skip
        for ns, dev, host in ((self.ns, pod_dev, 2), (self.peer, peer_dev, 1)):
            sh("ip", "-n", ns, "link", "set", dev, "mtu", "1400", "up")
            sh("ip", "-n", ns, "addr", "add", f"10.199.{net}.{host}/24", "dev", dev)

    def attach(self, plan: tuple[tcfilter.TapLink, ...]) -> tuple[tcfilter.AttachedTap, ...]:
        attached = tcfilter.attach(self.path, plan)
        self.fds += [a.fd for a in attached]
        return attached

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


@pytest.fixture
def pod() -> Iterator[Pod]:
    p = Pod(f"carapace-test-{os.getpid()}-pod", f"carapace-test-{os.getpid()}-peer")
    sh("ip", "netns", "add", p.ns)
    try:
        sh("ip", "netns", "add", p.peer)
        sh("ip", "-n", p.ns, "link", "set", "lo", "up")
        p.add_veth("eth0", "v0", 0)
        sh("ip", "-n", p.ns, "addr", "add", "fd00:199::2/64", "dev", "eth0", "nodad")
        sh("ip", "-n", p.peer, "addr", "add", "fd00:199::1/64", "dev", "v0", "nodad")
        sh("ip", "-n", p.ns, "route", "add", "default", "via", "10.199.0.1")
        sh("ip", "-n", p.ns, "route", "add", "10.199.5.0/24", "via", "10.199.0.1", "mtu", "1300")
        sh("ip", "-n", p.ns, "neigh", "add", "10.199.0.1", "lladdr", mac_of(p.peer, "v0"),
           "dev", "eth0", "nud", "permanent")  # fmt: skip
        yield p
    finally:
        p.close_fds()
        with contextlib.suppress(Exception):
            tcfilter.teardown(p.path, ["tap0_carapace", "tap1_carapace"], ["eth0", "net1"])
        for ns in (p.ns, p.peer):  # the veths go with their namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def expected(pod: Pod) -> NetworkConfig:
    return NetworkConfig(
        interfaces=(
            Interface(
                "eth0",
                mac_of(pod.ns, "eth0"),
                1400,
                (IPAddress(4, "10.199.0.2", 24), IPAddress(6, "fd00:199::2", 64)),
            ),
        ),
        routes=(
            Route("10.199.0.0/24", "", "eth0", "10.199.0.2", 253, 0, 4),
            Route("fd00:199::/64", "", "eth0", "", 0, 0, 6),
            Route("", "10.199.0.1", "eth0", "", 0, 0, 4),
            Route("10.199.5.0/24", "10.199.0.1", "eth0", "", 0, 1300, 4),
        ),
        neighbors=(Neighbor("10.199.0.1", mac_of(pod.peer, "v0"), "eth0"),),
    )


def test_discover_reads_what_cni_made(pod: Pod) -> None:
    assert discover.discover(pod.path) == expected(pod)
    # the same from a coroutine, the event loop's thread never leaving its namespace
    before = os.readlink("/proc/thread-self/ns/net")
    dumped = asyncio.run(netns.run_in_netns_async(pod.path, discover.dump_netns))
    assert discover.parse_network(*dumped) == expected(pod)
    assert os.readlink("/proc/thread-self/ns/net") == before


def tc_filters(pod: Pod, dev: str) -> str:
    return sh("ip", "netns", "exec", pod.ns, "tc", "filter", "show", "dev", dev, "ingress")


def qdiscs(pod: Pod, dev: str) -> str:
    return sh("ip", "netns", "exec", pod.ns, "tc", "qdisc", "show", "dev", dev)


def links(ns: str) -> set[str]:
    return {link["ifname"] for link in ip_json(ns, "link", "show")}


def frame(dst: str, src: str, text: bytes) -> bytes:
    payload = text.ljust(46, b"\0")
    return (
        bytes.fromhex(dst.replace(":", ""))
        + bytes.fromhex(src.replace(":", ""))
        + (struct.pack("!H", ETH_TEST) + payload)
    )


def peer_socket(pod: Pod, dev: str) -> socket.socket:
    """A raw socket on the peer's end of the veth, for the test's ethertype only."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TEST))
        s.bind((dev, ETH_TEST))
        s.settimeout(5)
        return s

    return netns.run_in_netns(pod.peer_path, make)


def read_tap(fd: int, want: bytes, hdr: int) -> bytes:
    """The first frame read from the tap that carries ``want`` (the kernel sends its own
    frames out of the tap too), without its virtio-net header."""
    for _ in range(50):
        ready, _, _ = select.select([fd], [], [], 5)
        assert ready, "nothing came out of the tap"
        data = os.read(fd, 65536)
        if want in data:
            assert data[:hdr] == bytes(hdr), "the virtio-net header of a plain frame is zeros"
            return data[hdr:]
    raise AssertionError("the frame never came out of the tap")


def test_attach_joins_the_veth_and_the_tap_both_ways(pod: Pod) -> None:
    config = discover.discover(pod.path)
    plan = tcfilter.plan_taps(config)
    eth0_mac = mac_of(pod.ns, "eth0")
    assert plan == (tcfilter.TapLink("tap0_carapace", "eth0", eth0_mac, 1400),)
    (tap,) = pod.attach(plan)
    assert (tap.tap, tap.veth, tap.mac, tap.mtu) == ("tap0_carapace", "eth0", eth0_mac, 1400)
    assert not os.get_inheritable(tap.fd)  # the caller passes it with pass_fds

    (link,) = ip_json(pod.ns, "link", "show", "dev", "tap0_carapace")
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    assert "mirred (Egress Redirect to device tap0_carapace)" in tc_filters(pod, "eth0")
    assert "mirred (Egress Redirect to device eth0)" in tc_filters(pod, "tap0_carapace")
    assert "protocol all" in tc_filters(pod, "eth0")
    assert discover.discover(pod.path) == expected(pod)  # the tap is not the pod's interface
    hdr = struct.unpack("i", fcntl.ioctl(tap.fd, TUNGETVNETHDRSZ, bytes(4)))[0]
    assert hdr == 10  # struct virtio_net_hdr (QEMU sets 12 for mergeable rx buffers)

    peer_mac = mac_of(pod.peer, "v0")
    with peer_socket(pod, "v0") as s:
        # the guest sends: written to the tap, out of the veth, seen at its other end
        out = frame(peer_mac, eth0_mac, b"carapace: tap to veth")
        os.write(tap.fd, bytes(hdr) + out)
        while (got := s.recv(65536)) != out:
            assert b"carapace" not in got
        # the guest receives: sent into the veth from its other end, read from the tap
        back = frame(eth0_mac, peer_mac, b"carapace: veth to tap")
        s.send(back)
        assert read_tap(tap.fd, b"veth to tap", hdr) == back

    (counted,) = stats.read_stats(pod.path, plan)
    assert counted.name == "eth0"
    assert counted.tx_packets >= 1 and counted.tx_bytes >= len(out)  # what the guest sent
    assert counted.rx_packets >= 1 and counted.rx_bytes >= len(back)  # what it received

    with pytest.raises(AlreadyExists, match="tap0_carapace exists"):
        tcfilter.attach(pod.path, plan)

    tcfilter.teardown(pod.path, [tap.tap], [tap.veth])
    assert "tap0_carapace" not in links(pod.ns)
    assert "ingress" not in qdiscs(pod, "eth0")
    assert tc_filters(pod, "eth0") == ""
    assert {"eth0", "lo"} <= links(pod.ns)  # the veth and the namespace stay
    assert pod.ns in sh("ip", "netns", "list")
    assert discover.discover(pod.path) == expected(pod)
    tcfilter.teardown(pod.path, [tap.tap], [tap.veth])  # again: nothing to do
    assert stats.read_stats(pod.path, plan) == ()


def test_a_tap_goes_with_its_last_fd(pod: Pod) -> None:
    """Not persistent: once QEMU and carapace closed it (a SIGKILL does too), the tap is
    gone; the veth's ingress qdisc waits for teardown (the leak check sees it)."""
    (tap,) = pod.attach(tcfilter.plan_taps(discover.discover(pod.path)))
    pod.close_fds()
    assert "tap0_carapace" not in links(pod.ns)
    assert "Redirect to device" in tc_filters(pod, "eth0")
    assert tcfilter.traces(pod.path) == {f"{pod.path}: eth0 ingress redirect"}
    tcfilter.teardown(pod.path, [tap.tap], [tap.veth])
    assert "ingress" not in qdiscs(pod, "eth0")
    assert tcfilter.traces(pod.path) == set()


def test_a_second_interface_gets_the_next_tap(pod: Pod) -> None:
    pod.add_veth("net1", "v1", 1)  # as Multus adds one
    config = discover.discover(pod.path)
    assert [i.name for i in config.interfaces] == ["eth0", "net1"]
    assert Route("10.199.1.0/24", "", "net1", "10.199.1.2", 253, 0, 4) in config.routes
    (first,) = pod.attach(tcfilter.plan_taps(config.select(["eth0"])))
    # added later (hot-add): the next free name
    plan = tcfilter.plan_taps(config.select(["net1"]), taken=[first.tap])
    (second,) = pod.attach(plan)
    assert (second.tap, second.veth, second.mtu) == ("tap1_carapace", "net1", 1400)
    assert "Redirect to device tap1_carapace" in tc_filters(pod, "net1")
    assert "Redirect to device net1" in tc_filters(pod, "tap1_carapace")
    assert "Redirect to device tap0_carapace" in tc_filters(pod, "eth0")
    tcfilter.teardown(pod.path, ["tap0_carapace", "tap1_carapace"], ["eth0", "net1"])
    assert not {"tap0_carapace", "tap1_carapace"} & links(pod.ns)
    assert "ingress" not in qdiscs(pod, "eth0") + qdiscs(pod, "net1")


def test_a_failure_half_way_undoes_what_was_made(pod: Pod) -> None:
    pod.add_veth("net1", "v1", 1)
    good, second = tcfilter.plan_taps(discover.discover(pod.path))
    bad = tcfilter.TapLink(second.tap, second.veth, second.mac, 70000)  # an MTU no link takes
    with pytest.raises(HostError, match="set tap1_carapace up with MTU 70000"):
        pod.attach((good, bad))
    assert not {"tap0_carapace", "tap1_carapace"} & links(pod.ns)
    assert "ingress" not in qdiscs(pod, "eth0") + qdiscs(pod, "net1")
    with pytest.raises(InvalidArgument, match="names one link twice"):
        pod.attach((good, good))


def test_an_ingress_qdisc_carapace_did_not_add_is_left_alone(pod: Pod) -> None:
    sh("ip", "netns", "exec", pod.ns, "tc", "qdisc", "add", "dev", "eth0", "ingress")
    plan = tcfilter.plan_taps(discover.discover(pod.path))
    with pytest.raises(AlreadyExists, match=r"eth0 has an ingress qdisc \(ingress\) already"):
        pod.attach(plan)
    assert "tap0_carapace" not in links(pod.ns)
    tcfilter.teardown(pod.path, ["tap0_carapace"], ["eth0"])  # as a release after it would
    assert "ingress" in qdiscs(pod, "eth0")


def test_the_host_network_namespace_is_refused() -> None:
    for path in ("/proc/self/ns/net", "/proc/1/ns/net"):
        with pytest.raises(InvalidArgument, match=path):
            discover.discover(path)
    plan = (tcfilter.TapLink("tap0_carapace", "eth0", "02:00:00:00:00:01", 1500),)
    with pytest.raises(InvalidArgument, match="/proc/self/ns/net is the host's own"):
        tcfilter.attach("/proc/self/ns/net", plan)
    with pytest.raises(InvalidArgument, match="host's own"):
        tcfilter.teardown("/proc/self/ns/net", ["tap0_carapace"], ["eth0"])


def test_teardown_of_a_namespace_that_is_gone_is_no_error(pod: Pod) -> None:
    tcfilter.teardown(f"/var/run/netns/carapace-test-{os.getpid()}-none", ["tap0_carapace"], [])
    pod.attach(tcfilter.plan_taps(discover.discover(pod.path)))
    pod.close_fds()
    path = pod.path
    sh("ip", "netns", "del", pod.ns)
    tcfilter.teardown(path, ["tap0_carapace"], ["eth0"])
