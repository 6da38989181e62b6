"""Read what CNI made in a pod's network namespace: its interfaces, their addresses,
the main table's routes through them and their permanent neighbour entries.

``discover`` dumps the namespace with pyroute2; ``parse_network`` turns the dumped
rtnetlink messages into a ``NetworkConfig`` (pure: it takes pyroute2's messages or
plain dicts of the same shape, ``{"index": 2, ..., "attrs": [["IFLA_IFNAME", "eth0"],
...]}``).

Kept, as Kata keeps them:

* interfaces: every Ethernet link except loopback and carapace's own taps
  (``tapN_carapace``) that has an address; a link without one (the tunnel devices a
  namespace is born with, ``tunl0``, ``sit0``...) is not the pod's;
* addresses: IPv4 and IPv6, except IPv6 link-local (fe80::/10: the guest makes its own);
* routes: unicast routes of the main table through a kept interface (default routes,
  link routes, routes through a gateway; route MTU from RTAX_MTU), except IPv6
  link-local destinations and multipath routes; link routes come first, so the guest
  can add a route through a gateway after the route that reaches that gateway;
* neighbours: entries in state PERMANENT on a kept interface.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from carapace.network.model import (
    Interface,
    IPAddress,
    Neighbor,
    NetworkConfig,
    Route,
    tap_index,
)
from carapace.network.netns import run_in_netns

Message = Mapping[str, Any]

ARPHRD_ETHER = 1
IFF_LOOPBACK = 0x8
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTM_F_CLONED = 0x200
NUD_PERMANENT = 0x80
_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")
_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}


def attr(msg: Message, name: str) -> Any:
    """The value of the netlink attribute ``name`` of a message, or None."""
    for pair in msg.get("attrs", ()):
        if pair[0] == name:
            return pair[1]
    return None


def _link_local6(address: str) -> bool:
    return ipaddress.IPv6Network(address, strict=False).subnet_of(_LINK_LOCAL6)


def parse_addresses(addrs: Iterable[Message]) -> dict[int, list[IPAddress]]:
    """ifindex → its addresses (IPv6 link-local left out), in the dump's order."""
    out: dict[int, list[IPAddress]] = {}
    for msg in addrs:
        family = _FAMILIES.get(msg.get("family", 0))
        if family is None:
            continue
        # IFA_LOCAL is the address itself (IFA_ADDRESS is the peer on a point-to-point link)
        address = attr(msg, "IFA_LOCAL") or attr(msg, "IFA_ADDRESS")
        if not address or (family == 6 and _link_local6(address)):
            continue
        out.setdefault(int(msg["index"]), []).append(
            IPAddress(family, str(address), int(msg["prefixlen"]))
        )
    return out


def parse_interfaces(
    links: Iterable[Message], addresses: Mapping[int, list[IPAddress]]
) -> dict[int, Interface]:
    """ifindex → Interface, for the links that are the pod's (see the module's doc)."""
    out: dict[int, Interface] = {}
    for msg in links:
        name = attr(msg, "IFLA_IFNAME")
        mac = attr(msg, "IFLA_ADDRESS")
        index = int(msg["index"])
        if (
            not name
            or name == "lo"
            or msg.get("flags", 0) & IFF_LOOPBACK
            or tap_index(name) is not None
            or msg.get("ifi_type", ARPHRD_ETHER) != ARPHRD_ETHER
            or not mac
            or not addresses.get(index)
        ):
            continue
        out[index] = Interface(
            name=str(name),
            mac=str(mac),
            mtu=int(attr(msg, "IFLA_MTU") or 1500),
            addresses=tuple(addresses[index]),
        )
    return out


def _route_mtu(msg: Message) -> int:
    metrics = attr(msg, "RTA_METRICS")
    if not metrics:
        return 0
    return int(attr(metrics, "RTAX_MTU") or 0)


def parse_routes(routes: Iterable[Message], devices: Mapping[int, str]) -> list[Route]:
    """The main table's unicast routes through ``devices`` (ifindex → name); link
    routes (no gateway) first, then the others, each in the dump's order."""
    out: list[Route] = []
    for msg in routes:
        family = _FAMILIES.get(msg.get("family", 0))
        table = attr(msg, "RTA_TABLE") or msg.get("table", 0)
        oif = attr(msg, "RTA_OIF")
        if (
            family is None
            or table != RT_TABLE_MAIN
            or msg.get("type", RTN_UNICAST) != RTN_UNICAST
            or msg.get("flags", 0) & RTM_F_CLONED
            or oif not in devices
        ):
            continue
        dst_len = int(msg.get("dst_len", 0))
        dst = attr(msg, "RTA_DST")
        dest = f"{ipaddress.ip_network(f'{dst}/{dst_len}', strict=False)}" if dst_len else ""
        if family == 6 and dest and _link_local6(dest):
            continue
        out.append(
            Route(
                dest=dest,
                gateway=str(attr(msg, "RTA_GATEWAY") or ""),
                device=devices[oif],
                source=str(attr(msg, "RTA_PREFSRC") or ""),
                scope=int(msg.get("scope", 0)),
                mtu=_route_mtu(msg),
                family=family,
            )
        )
    return sorted(out, key=lambda r: r.gateway != "")


def parse_neighbors(neighbors: Iterable[Message], devices: Mapping[int, str]) -> list[Neighbor]:
    """The PERMANENT neighbour entries on ``devices`` (ifindex → name)."""
    out: list[Neighbor] = []
    for msg in neighbors:
        index = int(msg.get("ifindex", 0))
        address, mac = attr(msg, "NDA_DST"), attr(msg, "NDA_LLADDR")
        if (
            _FAMILIES.get(msg.get("family", 0)) is None
            or not msg.get("state", 0) & NUD_PERMANENT
            or index not in devices
            or not address
            or not mac
        ):
            continue
        out.append(Neighbor(str(address), str(mac), devices[index]))
    return out


def parse_network(
    links: Iterable[Message],
    addrs: Iterable[Message],
    routes: Iterable[Message],
    neighbors: Iterable[Message],
) -> NetworkConfig:
    """A NetworkConfig from the dumps of links, addresses, routes and neighbours."""
    interfaces = parse_interfaces(links, parse_addresses(addrs))
    devices = {index: iface.name for index, iface in interfaces.items()}
    return NetworkConfig(
        interfaces=tuple(interfaces[i] for i in sorted(interfaces)),
        routes=tuple(parse_routes(routes, devices)),
        neighbors=tuple(parse_neighbors(neighbors, devices)),
    )


Dump = tuple[list[Message], list[Message], list[Message], list[Message]]


def dump_netns() -> Dump:
    """Links, addresses, main-table routes and neighbours of the calling thread's
    network namespace (run it through ``run_in_netns``)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return (
            list(ipr.get_links()),
            list(ipr.get_addr()),
            list(ipr.get_routes(table=RT_TABLE_MAIN)),
            list(ipr.get_neighbours()),
        )


def discover(netns_path: str) -> NetworkConfig:
    """What CNI made in the network namespace at ``netns_path`` (blocking: from a
    coroutine, call it through ``asyncio.to_thread``)."""
    return parse_network(*run_in_netns(netns_path, dump_netns))
