"""The agent's network verbs against a real kernel, without a VM: a network namespace
of the test's own stands for the guest, a veth in it for the VM's NIC (MAC known), its
peer in a second namespace for the gateway. The verbs run in a subprocess inside the
namespace (``ip netns exec``), through the agent's error guard, as the agent runs them;
``ip -j`` then says what the kernel has. Root; addresses only in 10.198.0.0/16 and
fd00:198::/64, traffic only between the two namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf import json_format

from carapace.protocols import agent_pb2 as pb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

NIC_MAC = "02:00:00:c6:00:05"
GW_MAC = "02:00:00:c6:00:01"

#: Runs [method, request as a dict] pairs through NetworkService and the agent's
#: guard; prints [{"reply": ...} or {"code": ..., "message": ...}] as JSON.
RUNNER = """
import asyncio, json, sys
from google.protobuf import json_format
from carapace.guest import sysinit
from carapace.guest.network import NetworkService
from carapace.guest.server import guard
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import TtrpcError

svc = NetworkService()
methods = {
    "UpdateInterface": (pb.UpdateInterfaceRequest, svc.update_interface),
    "UpdateRoutes": (pb.UpdateRoutesRequest, svc.update_routes),
    "AddARPNeighbors": (pb.AddARPNeighborsRequest, svc.add_arp_neighbors),
    "ListInterfaces": (pb.ListInterfacesRequest, svc.list_interfaces),
    "ListRoutes": (pb.ListRoutesRequest, svc.list_routes),
}
out = []
for method, req in json.loads(sys.argv[1]):
    if method == "loopback_up":
        sysinit.loopback_up()
        out.append({})
        continue
    kind, handler = methods[method]
    try:
        reply = asyncio.run(guard(method, handler)(json_format.ParseDict(req, kind())))
        out.append({"reply": json_format.MessageToDict(reply, preserving_proto_field_name=True)})
    except TtrpcError as e:
        out.append({"code": e.code.name, "message": e.message})
print(json.dumps(out))
"""


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr}"
    return r.stdout


@dataclass
class Guest:
    ns: str  # the namespace standing for the guest
    gw: str  # the gateway's namespace

    def call(self, *calls: tuple[str, Any]) -> list[dict[str, Any]]:
        """Run the calls in one agent process (its configured interfaces carry over)."""
        wire = [
            [m, json_format.MessageToDict(r) if hasattr(r, "DESCRIPTOR") else r] for m, r in calls
        ]
        out = sh("ip", "netns", "exec", self.ns, sys.executable, "-c", RUNNER, json.dumps(wire))
        result: list[dict[str, Any]] = json.loads(out)
        return result

    def ip(self, *args: str) -> Any:
        return json.loads(sh("ip", "-j", "-n", self.ns, *args) or "[]")


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest(f"carapace-test-net-{os.getpid()}", f"carapace-test-gw-{os.getpid()}")
    try:
        sh("ip", "netns", "add", g.ns)
        sh("ip", "netns", "add", g.gw)
        # the "NIC": up, under another name, with an address that must go
        sh("ip", "-n", g.ns, "link", "add", "nic0", "address", NIC_MAC, "type", "veth",
           "peer", "name", "gw0", "address", GW_MAC, "netns", g.gw)  # fmt: skip
        sh("ip", "-n", g.ns, "link", "set", "nic0", "up")
        sh("ip", "-n", g.ns, "addr", "add", "10.198.9.9/24", "dev", "nic0")
        sh("ip", "-n", g.gw, "link", "set", "gw0", "up")
        sh("ip", "-n", g.gw, "addr", "add", "10.198.0.1/24", "dev", "gw0")
        sh("ip", "-n", g.gw, "addr", "add", "fd00:198::1/64", "dev", "gw0", "nodad")
        yield g
    finally:
        for ns in (g.ns, g.gw):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    names = sh("ip", "netns", "list")
    assert g.ns not in names and g.gw not in names


ETH0 = pb.Interface(
    name="eth0",
    mac=NIC_MAC.upper(),  # any case
    mtu=1450,
    addresses=[
        pb.IPAddress(family=4, address="10.198.0.5", prefix_len=24),
        pb.IPAddress(family=6, address="fd00:198::5", prefix_len=64),
    ],
)
ROUTES = pb.UpdateRoutesRequest(
    routes=pb.Routes(
        routes=[
            pb.Route(gateway="10.198.0.1", device="eth0", family=4),
            pb.Route(dest="10.198.5.0/24", device="eth0", mtu=1400, family=4),
            pb.Route(gateway="fd00:198::1", device="eth0", family=6),
            pb.Route(dest="fd00:199::/64", device="eth0", mtu=1400, family=6),
        ]
    )
)
NEIGHBORS = pb.AddARPNeighborsRequest(
    neighbors=[
        pb.ARPNeighbor(address="10.198.0.1", mac=GW_MAC, device="eth0"),
        pb.ARPNeighbor(address="fd00:198::1", mac=GW_MAC, device="eth0"),
    ]
)


def addresses(guest: Guest, dev: str) -> dict[str, list[str]]:
    """address/prefix -> its flags (tentative, nodad, ...) of ``dev``."""
    (link,) = guest.ip("addr", "show", "dev", dev)
    return {
        f"{a['local']}/{a['prefixlen']}": [k for k, v in a.items() if v is True]
        for a in link["addr_info"]
    }


def test_configure_a_nic_as_the_pod_s_eth0(guest: Guest) -> None:
    r = guest.call(
        ("loopback_up", {}),
        ("UpdateInterface", pb.UpdateInterfaceRequest(interface=ETH0)),
        ("UpdateRoutes", ROUTES),
        ("AddARPNeighbors", NEIGHBORS),
        ("ListInterfaces", pb.ListInterfacesRequest()),
        ("ListRoutes", pb.ListRoutesRequest()),
    )
    assert all("code" not in x for x in r), r
    iface = r[1]["reply"]
    assert (iface["name"], iface["mac"], iface["mtu"], iface["up"]) == ("eth0", NIC_MAC, 1450, True)
    assert {(a["address"], a["prefix_len"]) for a in iface["addresses"]} >= {
        ("10.198.0.5", 24), ("fd00:198::5", 64),
    }  # fmt: skip

    # what the kernel has: renamed, MTU, up, exactly the addresses asked (and link-local)
    (link,) = guest.ip("link", "show", "dev", "eth0")
    assert (link["address"], link["mtu"]) == (NIC_MAC, 1450)
    assert "UP" in link["flags"]
    assert guest.ip("link", "show", "dev", "lo")[0]["flags"].count("UP") == 1
    addrs = addresses(guest, "eth0")
    assert {a for a in addrs if not a.startswith("fe80:")} == {"10.198.0.5/24", "fd00:198::5/64"}
    assert "tentative" not in addrs["fd00:198::5/64"]  # usable at once (no DAD)

    routes = {(x["dst"], x.get("gateway", "")): x for x in guest.ip("route", "show")}
    assert routes["default", "10.198.0.1"]["dev"] == "eth0"
    assert routes["10.198.5.0/24", ""]["metrics"] == [{"mtu": 1400}]
    assert routes["10.198.5.0/24", ""]["scope"] == "link"
    assert routes["10.198.0.0/24", ""]["protocol"] == "kernel"  # the address's, kept
    routes6 = {(x["dst"], x.get("gateway", "")): x for x in guest.ip("-6", "route", "show")}
    assert routes6["default", "fd00:198::1"]["dev"] == "eth0"
    assert routes6["fd00:199::/64", ""]["metrics"] == [{"mtu": 1400}]

    neighbours = {n["dst"]: n for n in guest.ip("neigh", "show", "dev", "eth0")}
    for gw in ("10.198.0.1", "fd00:198::1"):
        assert (neighbours[gw]["lladdr"], neighbours[gw]["state"]) == (GW_MAC, ["PERMANENT"])

    # the replies say the same as the kernel
    listed = {i["name"]: i for i in r[4]["reply"]["interfaces"]}
    assert set(listed) == {"lo", "eth0"} and listed["eth0"]["mtu"] == 1450
    reported = {
        (x.get("dest", ""), x.get("gateway", ""), x.get("mtu", 0)) for x in r[5]["reply"]["routes"]
    }
    assert {("", "10.198.0.1", 0), ("10.198.5.0/24", "", 1400), ("", "fd00:198::1", 0),
            ("fd00:199::/64", "", 1400)} <= reported  # fmt: skip
    assert r[2]["reply"] == r[5]["reply"]  # UpdateRoutes answers the routes now present

    # traffic: both address families reach the gateway at once
    for cmd in (["ping"], ["ping6"]):
        target = "10.198.0.1" if cmd == ["ping"] else "fd00:198::1"
        sh("ip", "netns", "exec", guest.ns, "/bin/busybox", *cmd, "-c", "1", "-W", "5", target)


def test_update_routes_again_replaces_the_old_ones(guest: Guest) -> None:
    guest.call(
        ("UpdateInterface", pb.UpdateInterfaceRequest(interface=ETH0)), ("UpdateRoutes", ROUTES)
    )
    again = pb.UpdateRoutesRequest(
        routes=pb.Routes(
            routes=[pb.Route(dest="10.198.6.0/24", gateway="10.198.0.1", device="eth0")]
        )
    )
    (changed,) = guest.call(("UpdateRoutes", again))
    assert "reply" in changed, changed
    v4 = {(x["dst"], x.get("gateway", "")) for x in guest.ip("route", "show")}
    assert v4 == {("10.198.0.0/24", ""), ("10.198.6.0/24", "10.198.0.1")}
    v6 = {x["dst"] for x in guest.ip("-6", "route", "show")}
    assert v6 == {"fd00:198::/64", "fe80::/64"}  # the kernel's only


def test_update_interface_a_second_time_keeps_what_is_as_asked(guest: Guest) -> None:
    smaller = pb.Interface()
    smaller.CopyFrom(ETH0)
    del smaller.addresses[1]
    smaller.mtu = 1400
    r = guest.call(
        ("UpdateInterface", pb.UpdateInterfaceRequest(interface=ETH0)),
        ("UpdateRoutes", ROUTES),
        ("UpdateInterface", pb.UpdateInterfaceRequest(interface=smaller)),
    )
    assert all("reply" in x for x in r), r
    (link,) = guest.ip("link", "show", "dev", "eth0")
    assert link["mtu"] == 1400
    assert {a for a in addresses(guest, "eth0") if not a.startswith("fe80:")} == {"10.198.0.5/24"}
    # the IPv4 address stayed, so did the routes through it
    assert ("default", "10.198.0.1") in {
        (x["dst"], x.get("gateway", "")) for x in guest.ip("route", "show")
    }


def test_refusals_answer_their_code(guest: Guest) -> None:
    def update(mac: str) -> tuple[str, pb.UpdateInterfaceRequest]:
        return ("UpdateInterface", pb.UpdateInterfaceRequest(interface=pb.Interface(mac=mac)))

    unknown, malformed, unreachable, bad_device = guest.call(
        update("02:00:00:c6:09:09"),
        update("02:00:00:c6:09"),
        ("UpdateRoutes", pb.UpdateRoutesRequest(routes=pb.Routes(routes=[
            pb.Route(gateway="10.99.0.1", device="nic0", family=4)]))),
        ("AddARPNeighbors", pb.AddARPNeighborsRequest(neighbors=[
            pb.ARPNeighbor(address="10.198.0.1", mac=GW_MAC, device="eth9")])),
    )  # fmt: skip
    assert unknown["code"] == "NOT_FOUND"
    assert unknown["message"].startswith("no interface with MAC 02:00:00:c6:09:09 in the guest")
    assert f"{NIC_MAC} (nic0)" in unknown["message"]
    assert malformed["code"] == "INVALID_ARGUMENT"
    assert "'02:00:00:c6:09' is not a MAC address; accepted" in malformed["message"]
    assert unreachable == {
        "code": "INTERNAL",
        "message": "add route default via 10.99.0.1 dev nic0: Network is unreachable "
        "(ENETUNREACH): Nexthop has invalid gateway",
    }
    assert bad_device["code"] == "NOT_FOUND"
    assert "interface 'eth9' not found in the guest; interfaces: lo, nic0" in bad_device["message"]
    # nothing changed
    (link,) = guest.ip("link", "show", "dev", "nic0")
    assert link["mtu"] == 1500
    assert set(addresses(guest, "nic0")) - {a for a in addresses(guest, "nic0") if "fe80" in a} == {
        "10.198.9.9/24"
    }
