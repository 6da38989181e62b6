"""carapace.network.discover's parsing: rtnetlink dumps (as pyroute2 0.9 gives them,
recorded from a namespace CNI-like set up, plus entries a namespace can also hold) into
a NetworkConfig."""

from __future__ import annotations

from typing import Any

from carapace.network.discover import (
    parse_addresses,
    parse_neighbors,
    parse_network,
    parse_routes,
)
from carapace.network.model import Interface, IPAddress, Neighbor, NetworkConfig, Route


def link(
    index: int, name: str, mac: str, mtu: int = 1500, ifi_type: int = 1, flags: int = 4099
) -> dict[str, Any]:
    return {
        "family": 0,
        "ifi_type": ifi_type,
        "index": index,
        "flags": flags,
        "attrs": [["IFLA_IFNAME", name], ["IFLA_MTU", mtu], ["IFLA_ADDRESS", mac]],
        "event": "RTM_NEWLINK",
    }


LINKS: list[dict[str, Any]] = [
    link(1, "lo", "00:00:00:00:00:00", 65536, ifi_type=772, flags=65609),
    link(2, "eth0", "3a:ac:34:51:9b:06", 1400),
    link(3, "bare0", "5a:c4:50:99:c9:db", flags=4098),  # no address: not the pod's
    link(4, "tap0_carapace", "1e:2b:2d:6b:33:b9"),  # carapace's own
    link(5, "tunl0", "0.0.0.0", 1480, ifi_type=768),  # a tunnel device the netns is born with
    link(6, "net1", "02:00:0a:c7:01:02", 9000),  # a second interface (Multus)
]


def addr(
    index: int, family: int, address: str, prefixlen: int, scope: int = 0, local: bool = True
) -> dict[str, Any]:
    attrs = [["IFA_ADDRESS", address]]
    if local and family == 2:
        attrs.append(["IFA_LOCAL", address])
    return {
        "family": family,
        "prefixlen": prefixlen,
        "flags": 128,
        "scope": scope,
        "index": index,
        "attrs": attrs,
        "event": "RTM_NEWADDR",
    }


ADDRS = [
    addr(1, 2, "127.0.0.1", 8, scope=254),
    addr(2, 2, "10.199.0.2", 24),
    addr(4, 2, "10.199.9.1", 24),
    addr(1, 10, "::1", 128, scope=254),
    addr(2, 10, "fd00:199::2", 64),
    addr(2, 10, "fe80::38ac:34ff:fe51:9b06", 64, scope=253),  # link-local: the guest makes its own
    addr(6, 2, "10.199.1.2", 24),
    addr(3, 10, "fe80::58c4:50ff:fe99:c9db", 64, scope=253),
]


def route(
    family: int, dst_len: int, *attrs: list[Any], table: int = 254, **fields: int
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "family": family,
        "dst_len": dst_len,
        "src_len": 0,
        "tos": 0,
        "table": table,
        "proto": 3,
        "scope": 0,
        "type": 1,
        "flags": 0,
        "attrs": [["RTA_TABLE", table], *attrs],
        "event": "RTM_NEWROUTE",
    }
    msg.update(fields)
    return msg


ROUTES = [
    # recorded
    route(2, 0, ["RTA_GATEWAY", "10.199.0.1"], ["RTA_OIF", 2]),
    route(
        2,
        24,
        ["RTA_DST", "10.199.0.0"],
        ["RTA_PREFSRC", "10.199.0.2"],
        ["RTA_OIF", 2],
        proto=2,
        scope=253,
    ),
    route(
        2,
        24,
        ["RTA_DST", "10.199.5.0"],
        ["RTA_METRICS", {"attrs": [["RTAX_MTU", 1300]]}],
        ["RTA_GATEWAY", "10.199.0.1"],
        ["RTA_OIF", 2],
    ),
    route(2, 24, ["RTA_DST", "10.199.9.0"], ["RTA_OIF", 4], scope=253),  # through carapace's tap
    route(10, 64, ["RTA_DST", "fd00:199::"], ["RTA_PRIORITY", 256], ["RTA_OIF", 2], proto=2),
    # what a namespace can also hold
    route(10, 64, ["RTA_DST", "fe80::"], ["RTA_OIF", 2], proto=2),  # link-local
    route(10, 8, ["RTA_DST", "ff00::"], ["RTA_OIF", 2], table=255, type=5),  # multicast
    route(2, 32, ["RTA_DST", "10.199.0.2"], ["RTA_OIF", 2], table=255, type=2),  # local
    route(2, 24, ["RTA_DST", "10.199.7.0"], ["RTA_OIF", 2], table=100),  # another table
    route(2, 32, ["RTA_DST", "10.199.0.9"], ["RTA_OIF", 2], flags=0x200),  # cached
    route(2, 24, ["RTA_DST", "10.199.8.0"], type=6),  # unreachable, no device
    route(10, 0, ["RTA_GATEWAY", "fe80::1"], ["RTA_OIF", 2]),  # IPv6 default via a router
    route(2, 24, ["RTA_DST", "10.199.1.0"], ["RTA_OIF", 6], scope=253),
]


def neigh(ifindex: int, family: int, dst: str, mac: str, state: int) -> dict[str, Any]:
    return {
        "family": family,
        "ifindex": ifindex,
        "state": state,
        "flags": 0,
        "ndm_type": 1,
        "attrs": [["NDA_DST", dst], ["NDA_LLADDR", mac]],
        "event": "RTM_NEWNEIGH",
    }


NEIGHBORS = [
    neigh(2, 2, "10.199.0.1", "02:00:00:00:00:01", 128),  # permanent
    neigh(2, 10, "ff02::16", "33:33:00:00:00:16", 64),  # NOARP: the kernel's
    neigh(2, 2, "10.199.0.7", "02:00:00:00:00:07", 2),  # REACHABLE: learnt
    neigh(4, 2, "10.199.9.7", "02:00:00:00:00:09", 128),  # on carapace's tap
    neigh(2, 10, "fd00:199::1", "02:00:00:00:00:01", 128),
]


def test_parse_network_keeps_what_cni_made() -> None:
    config = parse_network(LINKS, ADDRS, ROUTES, NEIGHBORS)
    assert config == NetworkConfig(
        interfaces=(
            Interface(
                "eth0",
                "3a:ac:34:51:9b:06",
                1400,
                (IPAddress(4, "10.199.0.2", 24), IPAddress(6, "fd00:199::2", 64)),
            ),
            Interface("net1", "02:00:0a:c7:01:02", 9000, (IPAddress(4, "10.199.1.2", 24),)),
        ),
        routes=(
            # link routes first, so a gateway is reachable before a route through it
            Route("10.199.0.0/24", "", "eth0", "10.199.0.2", 253, 0, 4),
            Route("fd00:199::/64", "", "eth0", "", 0, 0, 6),
            Route("10.199.1.0/24", "", "net1", "", 253, 0, 4),
            Route("", "10.199.0.1", "eth0", "", 0, 0, 4),
            Route("10.199.5.0/24", "10.199.0.1", "eth0", "", 0, 1300, 4),
            Route("", "fe80::1", "eth0", "", 0, 0, 6),
        ),
        neighbors=(
            Neighbor("10.199.0.1", "02:00:00:00:00:01", "eth0"),
            Neighbor("fd00:199::1", "02:00:00:00:00:01", "eth0"),
        ),
    )


def test_an_empty_namespace_has_nothing() -> None:
    assert parse_network(LINKS[:1], ADDRS[:1], [], []) == NetworkConfig()


def test_addresses_leave_out_ipv6_link_local_and_take_ifa_local() -> None:
    # on a point-to-point link IFA_ADDRESS is the peer's; IFA_LOCAL is the interface's
    ptp = addr(7, 2, "10.199.3.1", 32)
    ptp["attrs"] = [["IFA_ADDRESS", "10.199.3.9"], ["IFA_LOCAL", "10.199.3.1"]]
    got = parse_addresses([*ADDRS, ptp])
    assert got[2] == [IPAddress(4, "10.199.0.2", 24), IPAddress(6, "fd00:199::2", 64)]
    assert 3 not in got
    assert got[7] == [IPAddress(4, "10.199.3.1", 32)]


def test_routes_and_neighbours_only_through_the_devices_given() -> None:
    assert parse_routes(ROUTES, {6: "net1"}) == [Route("10.199.1.0/24", "", "net1", "", 253)]
    assert parse_neighbors(NEIGHBORS, {6: "net1"}) == []


def test_route_with_a_host_destination_keeps_its_prefix() -> None:
    msg = route(2, 32, ["RTA_DST", "10.199.0.1"], ["RTA_OIF", 2], scope=253)
    assert parse_routes([msg], {2: "eth0"})[0].dest == "10.199.0.1/32"
