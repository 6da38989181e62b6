"""The pod's network on the sandbox's side (carapace.sandbox.network) with a fake
agent: what NICs the VM gets and what the guest is told, per mode."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from carapace.hypervisor import PortForward, UserNic
from carapace.protocols import agent_pb2 as pb
from carapace.sandbox.netplan import NetworkPlan
from carapace.sandbox.network import PodNetwork, local_mac, vhost_net_usable
from carapace.sandbox.state import SandboxRecord


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def update_interface(self, iface: pb.Interface) -> pb.Interface:
        self.calls.append(("update_interface", iface))
        return iface

    async def update_routes(self, routes: list[pb.Route]) -> list[pb.Route]:
        self.calls.append(("update_routes", routes))
        return routes

    async def add_arp_neighbors(self, neighbors: list[pb.ARPNeighbor]) -> None:
        self.calls.append(("add_arp_neighbors", neighbors))


def network(plan: NetworkPlan, tmp_path: Path) -> PodNetwork:
    return PodNetwork(plan, SandboxRecord("p", str(tmp_path)), "p")


def test_user_mode_boots_one_nic_and_tells_the_guest_slirps_addresses(tmp_path: Path) -> None:
    net = network(NetworkPlan("user", "", (PortForward(18080, 80),)), tmp_path)
    agent = FakeAgent()

    async def go() -> None:
        (nic,) = await net.prepare()
        assert isinstance(nic, UserNic) and nic.forwards == (PortForward(18080, 80),)
        await net.configure(agent)  # type: ignore[arg-type]
        (name, iface), (what, routes) = agent.calls
        assert name == "update_interface" and what == "update_routes"
        assert (iface.name, iface.mac, iface.mtu) == ("eth0", nic.mac, 1500)
        assert [(a.address, a.prefix_len) for a in iface.addresses] == [("10.0.2.15", 24)]
        assert [(r.dest, r.gateway, r.device) for r in routes] == [("", "10.0.2.2", "eth0")]

    asyncio.run(go())


def test_no_network_has_no_nic_and_tells_the_guest_nothing(tmp_path: Path) -> None:
    net = network(NetworkPlan("none"), tmp_path)
    agent = FakeAgent()

    async def go() -> None:
        assert await net.prepare() == ()
        await net.configure(agent)  # type: ignore[arg-type]
        assert agent.calls == []
        assert net.stats() == ()

    asyncio.run(go())


def test_local_macs_are_unicast_and_locally_administered() -> None:
    macs = {local_mac() for _ in range(50)}
    assert len(macs) == 50
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01 and len(mac.split(":")) == 6


def test_vhost_net_is_used_only_where_it_opens(tmp_path: Path) -> None:
    assert vhost_net_usable(str(tmp_path / "no-such-device")) is False
