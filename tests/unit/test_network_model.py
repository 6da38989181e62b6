"""carapace.network.model: the pod's network as the guest is told it (pure), and the
rule that the guest never imports the host's network package."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import carapace
from carapace.errors import InvalidArgument
from carapace.network.model import (
    Interface,
    IPAddress,
    Neighbor,
    NetworkConfig,
    Route,
    tap_index,
    tap_name,
)
from carapace.protocols import agent_pb2 as pb

ETH0 = Interface(
    name="eth0",
    mac="0A:58:0A:F4:00:05",
    mtu=1400,
    addresses=(IPAddress(4, "10.244.0.5", 24), IPAddress(6, "fd00:10:244::5", 64)),
)
CONFIG = NetworkConfig(
    interfaces=(ETH0,),
    routes=(
        Route(dest="10.244.0.0/24", device="eth0", source="10.244.0.5", scope=253),
        Route(dest="", gateway="10.244.0.1", device="eth0", mtu=1300),
        Route(dest="fd00:10:244::/64", device="eth0", family=6),
    ),
    neighbors=(Neighbor("10.244.0.1", "02:00:00:00:00:01", "eth0"),),
)


def test_interface_to_pb() -> None:
    assert ETH0.mac == "0a:58:0a:f4:00:05"  # lower case: how the guest finds the NIC
    assert ETH0.to_pb() == pb.Interface(
        name="eth0",
        mac="0a:58:0a:f4:00:05",
        mtu=1400,
        addresses=[
            pb.IPAddress(family=4, address="10.244.0.5", prefix_len=24),
            pb.IPAddress(family=6, address="fd00:10:244::5", prefix_len=64),
        ],
    )


def test_requests_of_a_config() -> None:
    assert CONFIG.interface_requests() == [pb.UpdateInterfaceRequest(interface=ETH0.to_pb())]
    routes = CONFIG.routes_request().routes.routes
    assert [(r.dest, r.gateway, r.device, r.scope, r.mtu, r.family) for r in routes] == [
        ("10.244.0.0/24", "", "eth0", 253, 0, 4),
        ("", "10.244.0.1", "eth0", 0, 1300, 4),
        ("fd00:10:244::/64", "", "eth0", 0, 0, 6),
    ]
    assert routes[0].source == "10.244.0.5"
    assert CONFIG.neighbors_request() == pb.AddARPNeighborsRequest(
        neighbors=[pb.ARPNeighbor(address="10.244.0.1", mac="02:00:00:00:00:01", device="eth0")]
    )


def test_record_round_trip_through_json() -> None:
    rec = json.loads(json.dumps(CONFIG.to_record()))
    assert NetworkConfig.from_record(rec) == CONFIG
    assert rec["interfaces"][0]["addresses"][1] == {
        "family": 6,
        "address": "fd00:10:244::5",
        "prefix_len": 64,
    }


def test_select_keeps_an_interface_with_its_routes_and_neighbours() -> None:
    eth1 = Interface("net1", "02:00:00:00:01:02", 1500, (IPAddress.parse("10.199.1.2/24"),))
    both = NetworkConfig(
        interfaces=(ETH0, eth1),
        routes=(*CONFIG.routes, Route(dest="10.199.1.0/24", device="net1", scope=253)),
        neighbors=CONFIG.neighbors,
    )
    only = both.select(["net1"])
    assert only.interfaces == (eth1,)
    assert only.routes == (Route(dest="10.199.1.0/24", device="net1", scope=253),)
    assert only.neighbors == ()
    with pytest.raises(InvalidArgument, match="no interface net9"):
        both.select(["net9"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: IPAddress(5, "10.0.0.1", 24),
        lambda: IPAddress(4, "fd00::1", 64),
        lambda: IPAddress(4, "10.0.0.1/24", 24),
        lambda: IPAddress(4, "10.0.0.1", 33),
        lambda: IPAddress.parse("10.0.0.300/24"),
        lambda: Interface("eth0", "not-a-mac", 1500),
        lambda: Interface("eth0", "02:00:00:00:00:01", 20),
        lambda: Interface("a-name-longer-than-15", "02:00:00:00:00:01", 1500),
        lambda: Route(dest="fd00::/64", family=4),
        lambda: Route(gateway="10.0.0.1", family=6),
        lambda: Neighbor("nope", "02:00:00:00:00:01", "eth0"),
        lambda: NetworkConfig(interfaces=(ETH0, ETH0)),
    ],
)
def test_bad_values_are_refused(make: object) -> None:
    with pytest.raises(InvalidArgument):
        make()  # type: ignore[operator]


def test_tap_names() -> None:
    assert tap_name(0) == "tap0_carapace"
    assert tap_name(999) == "tap999_carapace"  # 15 characters: the longest a name may be
    assert len(tap_name(999)) == 15
    assert tap_index("tap12_carapace") == 12
    assert tap_index("tap_carapace") is None
    assert tap_index("eth0") is None
    assert tap_index("tap0_carapacex") is None
    with pytest.raises(InvalidArgument):
        tap_name(1000)


def test_the_guest_never_imports_the_host_network_package() -> None:
    guest = Path(carapace.__file__).parent / "guest"
    for path in guest.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if n == "carapace.network" or n.startswith("carapace.network.")]
            assert not bad, f"{path.name} imports {bad}"
            assert "pyroute2" not in {n.split(".")[0] for n in names}, path.name
