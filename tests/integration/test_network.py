"""Pod networking in real VMs: --net none (loopback only), --net user with a port
forward, and a network namespace's interfaces (a veth pair the test makes, as CNI
would) reaching the guest through a tap and tc mirred, with one added and removed
while the pod runs. Traffic goes only between the host and namespaces made here."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import carapace
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec

from .conftest import CARAPACE

NETNS = "carapace-test-net"
HOST_IP, POD_IP = "10.197.0.1", "10.197.0.2"
HOST_IP2, POD_IP2 = "10.197.1.1", "10.197.1.2"
SERVE = (
    "mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && exec httpd -f -p {port} -h /tmp/www"
)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def fetch(url: str, timeout: float = 60.0) -> bytes:
    """GET ``url``, retrying while the server in the guest starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return bytes(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def in_netns(*args: str) -> str:
    return sh("ip", "netns", "exec", NETNS, *args)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with one veth pair into it (host 10.197.0.1/24, pod side
    10.197.0.2/24 named eth0, MTU 1400, default route via the host), as CNI makes it."""
    subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "delete", "cpt-host0"], capture_output=True)
    sh("ip", "netns", "add", NETNS)
    try:
        sh(
            "ip",
            "link",
            "add",
            "cpt-host0",
            "mtu",
            "1400",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            "1400",
            "netns",
            NETNS,
        )
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", "cpt-host0")
        sh("ip", "link", "set", "cpt-host0", "up")
        in_netns("ip", "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        in_netns("ip", "link", "set", "eth0", "up")
        in_netns("ip", "link", "set", "lo", "up")
        in_netns("ip", "route", "add", "default", "via", HOST_IP)
        yield f"/var/run/netns/{NETNS}"
    finally:
        for link in ("cpt-host0", "cpt-host1"):
            subprocess.run(["ip", "link", "delete", link], capture_output=True)
        subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)


def carapace_made() -> str:
    """Taps and tc filters of carapace's in the test's namespace."""
    links = in_netns("ip", "-o", "link", "show")
    filters = in_netns("tc", "filter", "show", "dev", "eth0", "ingress")
    return "\n".join(line for line in links.splitlines() if "_carapace" in line) + filters


@contextmanager
def serving(sb: carapace.Sandbox, cid: str, text: str, port: int = 80) -> Iterator[None]:
    """A container of ``sb`` running busybox httpd on ``port`` with ``text`` as index."""
    spec = Spec.from_dict(default_spec(["sh", "-c", SERVE.format(text=text, port=port)]))
    sb.call_async(lambda s: s.create_container(cid, spec, s.image().rootfs))
    try:
        sb.call_async(lambda s: s.start_container(cid))
        yield
    finally:
        sb.call_async(lambda s: s.kill(cid, 9))
        sb.call_async(lambda s: s.wait(cid))
        sb.call_async(lambda s: s.remove_container(cid))


def test_no_network_is_loopback_only() -> None:
    r = subprocess.run(
        [CARAPACE, "run", "--net", "none", "--", "ls", "/sys/class/net"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["lo"]


def test_user_network_forwards_a_host_port() -> None:
    with carapace.Sandbox(net="user", ports={18080: 80}) as sb:
        addr = sb.run(["ip", "-o", "-4", "addr", "show", "eth0"]).text
        assert "10.0.2.15/24" in addr
        with serving(sb, "web", "hello-user"):
            assert fetch("http://127.0.0.1:18080/index.html") == b"hello-user\n"


def test_bad_net_is_refused_before_anything_starts() -> None:
    r = subprocess.run(
        [CARAPACE, "run", "--net", "bridge", "--", "true"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "accepted: none, user, netns:PATH" in r.stderr
    r = subprocess.run(
        [CARAPACE, "run", "-p", "8080:80", "--", "true"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "need --net user" in r.stderr


def test_a_netns_reaches_the_guest_and_back(netns: str) -> None:
    with carapace.Sandbox(net=f"netns:{netns}") as sb:
        out = sb.run(["sh", "-c", "ip -o addr show eth0; cat /sys/class/net/eth0/mtu; ip route"])
        assert f"{POD_IP}/24" in out.text, out.text
        assert "\n1400\n" in out.text
        assert f"default via {HOST_IP}" in out.text
        # the veth keeps its address; the tap and the two redirects are carapace's
        assert POD_IP in in_netns("ip", "-o", "addr", "show", "eth0")
        assert "tap0_carapace" in carapace_made()
        with serving(sb, "web", "hello-netns"):
            assert fetch(f"http://{POD_IP}/index.html") == b"hello-netns\n"
        assert sb.run(["ping", "-c", "1", "-W", "5", HOST_IP]).exit_code == 0

        # a second interface, attached after the pod started (as podman does)
        sh("ip", "link", "add", "cpt-host1", "type", "veth", "peer", "name", "eth1", "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP2}/24", "dev", "cpt-host1")
        sh("ip", "link", "set", "cpt-host1", "up")
        in_netns("ip", "addr", "add", f"{POD_IP2}/24", "dev", "eth1")
        in_netns("ip", "link", "set", "eth1", "up")
        iface = sb.call_async(lambda s: s.add_interface(netns, "eth1"))
        assert iface.name == "eth1" and [a.address for a in iface.addresses] == [POD_IP2]
        with serving(sb, "web2", "hello-eth1"):
            assert fetch(f"http://{POD_IP2}/index.html") == b"hello-eth1\n"
        sb.call_async(lambda s: s.remove_interface("eth1"))
        assert sb.run(["ls", "/sys/class/net"]).text.split() == ["eth0", "lo"]
        assert "tap1_carapace" not in carapace_made()
    # carapace removed what it made; the namespace and the veths are CNI's, left alone
    assert carapace_made() == ""
    assert POD_IP in in_netns("ip", "-o", "addr", "show", "eth0")
