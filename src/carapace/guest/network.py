"""The guest's network as the host asks for it: UpdateInterface, UpdateRoutes,
AddARPNeighbors, ListInterfaces and ListRoutes (Kata's agent calls), through rtnetlink
(guest/netlink.py says why netlink by hand rather than busybox ``ip``).

Containers share the VM's network namespace (guest/spec.py), so what is configured
here, in the agent's namespace, is what they see.

* UpdateInterface finds the NIC by MAC (any case), sets the MTU, renames it (down
  first: the kernel renames only a link that is down; up again if the rename fails),
  brings it up, then makes its addresses exactly the given ones (those not asked for
  are deleted, the missing added). IPv6 addresses are added with IFA_F_NODAD: usable
  at once, without the second or more of duplicate address detection, as CNI's IPAM
  already made them unique. The kernel's IPv6 link-local address (fe80::/10) is
  kept: neighbour discovery needs it.
* UpdateRoutes deletes the main-table routes of the interfaces carapace configured
  (and of those the new routes name), except the kernel's own (proto kernel: those
  of the addresses), then adds the given ones, link routes before gateway routes,
  each created or replacing the same route. A route without gateway and with scope
  0 gets scope link, as ``ip route add`` does.
* AddARPNeighbors adds permanent neighbour entries (IPv4 ARP, IPv6 ND).

Every request is checked whole before anything changes: a malformed MAC, address,
CIDR or name is InvalidArgument (the value and what is accepted), an unknown MAC or
device NotFound; a refusal of the kernel is NetlinkError (its errno and text).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol

from carapace.errors import InvalidArgument, NotFound
from carapace.guest import netlink as nl
from carapace.guest.netlink import Address, Link, Message, Netlink, NetlinkError, RouteEntry
from carapace.guest.sysinit import need_modules
from carapace.protocols import agent_pb2 as pb

log = logging.getLogger("carapace.agent")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_FAMILY = {0: 0, 4: nl.AF_INET, 6: nl.AF_INET6}
_VERSION = {nl.AF_INET: 4, nl.AF_INET6: 6}
_LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")
IFNAMSIZ = 16


class Rtnl(Protocol):
    """What the operations need of a netlink socket (a fake in unit tests)."""

    def request(self, req: nl.Request, what: str) -> None: ...

    def dump(self, req: nl.Request) -> list[Message]: ...


# -- checking the host's values (pure) --------------------------------------------------


def parse_mac(text: str, what: str = "MAC") -> bytes:
    if not _MAC_RE.match(text):
        raise InvalidArgument(
            f"{what} {text!r} is not a MAC address; accepted: six hex pairs separated "
            "by ':', e.g. 02:42:0a:c6:00:05"
        )
    return bytes.fromhex(text.replace(":", ""))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _family(value: int, what: str) -> int:
    if value not in _FAMILY:
        raise InvalidArgument(f"{what}: family {value}; accepted: 4, 6 (or 0: from the address)")
    return _FAMILY[value]


def parse_ip(text: str, what: str, family: int = 0) -> IP:
    """An IP address (``family``: AF_INET/AF_INET6 it must be, 0: either)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(
            f"{what} {text!r} is not an IP address; accepted: IPv4 like 10.198.0.5 or "
            "IPv6 like fd00:198::5, without a prefix length"
        ) from None
    if family and _af(ip) != family:
        raise InvalidArgument(f"{what} {text!r} is not an IPv{_VERSION[family]} address")
    return ip


def _af(ip: IP | ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return nl.AF_INET if ip.version == 4 else nl.AF_INET6


def check_ifname(name: str) -> str:
    """An interface name the kernel takes (dev_valid_name)."""
    if (
        not name
        or len(name.encode()) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in name for c in "/:")
        or any(c.isspace() for c in name)
    ):
        raise InvalidArgument(
            f"interface name {name!r} is not accepted; accepted: 1 to 15 characters, "
            "none of '/', ':' or whitespace, not '.' or '..'"
        )
    return name


def interface_addresses(iface: pb.Interface) -> list[tuple[bytes, int]]:
    """(packed address, prefix length) of each address of ``iface``."""
    out: list[tuple[bytes, int]] = []
    for a in iface.addresses:
        what = f"interface {iface.mac} address"
        ip = parse_ip(a.address, what, _family(a.family, f"{what} {a.address!r}"))
        if not 1 <= a.prefix_len <= ip.max_prefixlen:
            raise InvalidArgument(
                f"{what} {a.address}/{a.prefix_len}: prefix length {a.prefix_len}; "
                f"accepted: 1 to {ip.max_prefixlen}"
            )
        out.append((ip.packed, a.prefix_len))
    return out


def address_scope(ip: bytes) -> int:
    """The scope ``ip addr add`` gives: host for loopback, link for link-local."""
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        return nl.RT_SCOPE_HOST
    if addr.is_link_local:
        return nl.RT_SCOPE_LINK
    return nl.RT_SCOPE_UNIVERSE


def route_entry(route: pb.Route, index_of: Callable[[str], int]) -> RouteEntry:
    """The netlink route of ``route``; ``index_of`` names a device's index."""
    what = f"route {route.dest or 'default'}"
    family = _family(route.family, what)
    dst = None
    if route.dest:
        try:
            dst = ipaddress.ip_network(route.dest, strict=True)
        except ValueError as e:
            raise InvalidArgument(
                f"route destination {route.dest!r} is not a network ({e}); accepted: '' "
                "for the default route, or a CIDR like 10.198.0.0/24 or fd00:198::/64"
            ) from None
        family = _check_family(family, _af(dst), what, route.dest)
    gateway = parse_ip(route.gateway, f"{what} gateway") if route.gateway else None
    if gateway is not None:
        family = _check_family(family, _af(gateway), what, route.gateway)
    source = parse_ip(route.source, f"{what} source") if route.source else None
    if source is not None:
        family = _check_family(family, _af(source), what, route.source)
    if not family:
        raise InvalidArgument(f"{what} has no address to tell its family by; give family 4 or 6")
    if route.scope > 255:
        raise InvalidArgument(f"{what}: scope {route.scope}; accepted: 0 to 255")
    if not route.device and gateway is None:
        raise InvalidArgument(f"{what}: a route without gateway needs a device")
    scope = route.scope
    if scope == nl.RT_SCOPE_UNIVERSE and gateway is None:
        scope = nl.RT_SCOPE_LINK
    return RouteEntry(
        family=family,
        dst=dst.network_address.packed if dst is not None and dst.prefixlen else b"",
        dst_len=dst.prefixlen if dst is not None else 0,
        gateway=gateway.packed if gateway is not None else b"",
        oif=index_of(route.device) if route.device else 0,
        prefsrc=source.packed if source is not None else b"",
        scope=scope,
        mtu=route.mtu,
    )


def _check_family(family: int, seen: int, what: str, value: str) -> int:
    if family and family != seen:
        raise InvalidArgument(
            f"{what}: {value!r} is IPv{_VERSION[seen]} but the route is IPv{_VERSION[family]}"
        )
    return seen


# -- reading the guest's network --------------------------------------------------------


def links(rtnl: Rtnl) -> list[Link]:
    msgs = rtnl.dump(nl.dump_request(nl.RTM_GETLINK))
    return sorted(
        (nl.parse_link(m.body) for m in msgs if m.kind == nl.RTM_NEWLINK), key=lambda x: x.index
    )


def addresses(rtnl: Rtnl) -> list[Address]:
    msgs = rtnl.dump(nl.dump_request(nl.RTM_GETADDR))
    return [nl.parse_address(m.body) for m in msgs if m.kind == nl.RTM_NEWADDR]


def routes(rtnl: Rtnl) -> list[RouteEntry]:
    """The unicast routes of the main table, IPv4 and IPv6."""
    out: list[RouteEntry] = []
    for family in (nl.AF_INET, nl.AF_INET6):
        for m in rtnl.dump(nl.dump_request(nl.RTM_GETROUTE, family)):
            if m.kind != nl.RTM_NEWROUTE:
                continue
            r = nl.parse_route(m.body)
            if r.table == nl.RT_TABLE_MAIN and r.kind == nl.RTN_UNICAST:
                out.append(r)
    return out


def to_interface(link: Link, addrs: Iterable[Address]) -> pb.Interface:
    return pb.Interface(
        name=link.name,
        mac=format_mac(link.mac),
        mtu=link.mtu,
        up=link.up,
        addresses=[
            pb.IPAddress(
                family=_VERSION[a.family],
                address=str(ipaddress.ip_address(a.address)),
                prefix_len=a.prefix_len,
            )
            for a in addrs
            if a.index == link.index and a.family in _VERSION
        ],
    )


def to_route(r: RouteEntry, names: dict[int, str]) -> pb.Route:
    dest = ""
    if r.dst_len:
        dest = f"{ipaddress.ip_address(r.dst)}/{r.dst_len}"
    return pb.Route(
        dest=dest,
        gateway=str(ipaddress.ip_address(r.gateway)) if r.gateway else "",
        device=names.get(r.oif, ""),
        source=str(ipaddress.ip_address(r.prefsrc)) if r.prefsrc else "",
        scope=r.scope,
        mtu=r.mtu,
        family=_VERSION.get(r.family, 0),
    )


def list_interfaces(rtnl: Rtnl) -> list[pb.Interface]:
    """Every interface of the guest (lo included), by index."""
    addrs = addresses(rtnl)
    return [to_interface(link, addrs) for link in links(rtnl)]


def list_routes(rtnl: Rtnl) -> list[pb.Route]:
    names = {link.index: link.name for link in links(rtnl)}
    return [to_route(r, names) for r in routes(rtnl)]


def _index_of(found: list[Link]) -> Callable[[str], int]:
    by_name = {link.name: link.index for link in found}

    def index_of(name: str) -> int:
        if name not in by_name:
            raise NotFound(
                f"interface {name!r} not found in the guest; interfaces: "
                + ", ".join(sorted(by_name))
            )
        return by_name[name]

    return index_of


# -- changing it ------------------------------------------------------------------------


def update_interface(rtnl: Rtnl, iface: pb.Interface) -> tuple[int, pb.Interface]:
    """Configure the NIC with ``iface.mac`` as ``iface`` says; (its index, the
    interface as it now is)."""
    mac = parse_mac(iface.mac, "interface MAC")
    name = check_ifname(iface.name) if iface.name else ""
    wanted = interface_addresses(iface)
    found = links(rtnl)
    link = next((x for x in found if x.mac == mac), None)
    if link is None:
        raise NotFound(
            f"no interface with MAC {iface.mac} in the guest; MACs: "
            + ", ".join(f"{format_mac(x.mac)} ({x.name})" for x in found if x.mac)
        )
    index, current = link.index, link.name
    if iface.mtu and iface.mtu != link.mtu:
        rtnl.request(nl.link_request(index, mtu=iface.mtu), f"set {current} MTU {iface.mtu}")
    if name and name != current:
        if link.up:
            rtnl.request(nl.link_request(index, up=False), f"set {current} down to rename it")
        try:
            rtnl.request(nl.link_request(index, name=name), f"rename {current} to {name}")
        except NetlinkError:
            if link.up:  # as it was
                rtnl.request(nl.link_request(index, up=True), f"set {current} up again")
            raise
        current = name
    rtnl.request(nl.link_request(index, up=True), f"set {current} up")
    _set_addresses(rtnl, index, current, wanted)
    now = next((x for x in links(rtnl) if x.index == index), None)
    if now is None:
        raise NotFound(f"interface {current} ({iface.mac}) went away while being configured")
    return index, to_interface(now, addresses(rtnl))


def _set_addresses(rtnl: Rtnl, index: int, name: str, wanted: list[tuple[bytes, int]]) -> None:
    have = [a for a in addresses(rtnl) if a.index == index and a.family in _VERSION]
    for a in have:
        if (a.address, a.prefix_len) in wanted:
            continue
        if a.family == nl.AF_INET6 and ipaddress.IPv6Address(a.address) in _LINK_LOCAL_V6:
            continue  # the kernel's link-local address: neighbour discovery needs it
        text = f"{ipaddress.ip_address(a.address)}/{a.prefix_len}"
        try:
            rtnl.request(
                nl.address_request(nl.RTM_DELADDR, index, a.address, a.prefix_len),
                f"delete address {text} of {name}",
            )
        except NetlinkError as e:
            if e.errno != errno.EADDRNOTAVAIL:  # went with its primary (IPv4)
                raise
    present = {(a.address, a.prefix_len) for a in have}
    for address, prefix_len in wanted:
        if (address, prefix_len) in present:
            continue
        text = f"{ipaddress.ip_address(address)}/{prefix_len}"
        rtnl.request(
            nl.address_request(nl.RTM_NEWADDR, index, address, prefix_len, address_scope(address)),
            f"add address {text} to {name}",
        )


def update_routes(rtnl: Rtnl, wanted: list[pb.Route], configured: set[int]) -> list[pb.Route]:
    """Replace the routes of the ``configured`` interfaces (and of those ``wanted``
    names) with ``wanted``; the main table's routes as they now are."""
    found = links(rtnl)
    index_of = _index_of(found)
    names = {link.index: link.name for link in found}
    entries = [route_entry(r, index_of) for r in wanted]
    replaced = configured | {e.oif for e in entries if e.oif}
    for r in routes(rtnl):
        if r.oif not in replaced or r.protocol == nl.RTPROT_KERNEL:
            continue
        try:
            rtnl.request(nl.route_request(nl.RTM_DELROUTE, r), f"delete {_describe(r, names)}")
        except NetlinkError as e:
            if e.errno != errno.ESRCH:  # gone already (with an address, or a link)
                raise
    for entry in sorted(entries, key=lambda x: bool(x.gateway)):  # link routes first
        rtnl.request(nl.route_request(nl.RTM_NEWROUTE, entry), f"add {_describe(entry, names)}")
    return list_routes(rtnl)


def _describe(r: RouteEntry, names: dict[int, str]) -> str:
    route = to_route(r, names)
    text = f"route {route.dest or 'default'}"
    if route.gateway:
        text += f" via {route.gateway}"
    if route.device:
        text += f" dev {route.device}"
    if route.mtu:
        text += f" mtu {route.mtu}"
    return text


def add_neighbors(rtnl: Rtnl, neighbors: list[pb.ARPNeighbor]) -> None:
    """Permanent neighbour entries (checked all before any is added)."""
    index_of = _index_of(links(rtnl))
    entries = []
    for n in neighbors:
        ip = parse_ip(n.address, "neighbour address")
        what = f"neighbour {n.address}"
        mac = parse_mac(n.mac, f"{what} MAC")
        if not n.device:
            raise InvalidArgument(f"{what}: no device; give the interface's name in the guest")
        entries.append((index_of(n.device), ip, mac, f"add {what} lladdr {n.mac} dev {n.device}"))
    for index, ip, mac, what in entries:
        rtnl.request(nl.neighbour_request(index, ip.packed, mac), what)


# -- the service ------------------------------------------------------------------------


class NetworkService:
    """The network verbs of the agent API. Each call opens its own netlink socket;
    netlink answers at once, so the calls run on the event loop."""

    def __init__(self, netlink: Callable[[], AbstractContextManager[Rtnl]] = Netlink) -> None:
        self._netlink = netlink
        #: indexes of the interfaces UpdateInterface configured (their routes are
        #: the ones UpdateRoutes replaces)
        self.configured: set[int] = set()

    def _rtnl(self) -> AbstractContextManager[Rtnl]:
        """A netlink socket, once the NIC driver is loaded (at the first network verb:
        a NIC plugged before that waits unbound until then)."""
        need_modules("net")
        return self._netlink()

    async def update_interface(self, req: pb.UpdateInterfaceRequest) -> pb.Interface:
        with self._rtnl() as rtnl:
            index, iface = update_interface(rtnl, req.interface)
        self.configured.add(index)
        log.info("interface %s (%s) configured: mtu %d, %d addresses",
                 iface.name, iface.mac, iface.mtu, len(iface.addresses))  # fmt: skip
        return iface

    async def update_routes(self, req: pb.UpdateRoutesRequest) -> pb.Routes:
        with self._rtnl() as rtnl:
            now = update_routes(rtnl, list(req.routes.routes), self.configured)
        log.info("routes updated: %d asked, %d in the main table", len(req.routes.routes), len(now))
        return pb.Routes(routes=now)

    async def add_arp_neighbors(self, req: pb.AddARPNeighborsRequest) -> pb.Empty:
        with self._rtnl() as rtnl:
            add_neighbors(rtnl, list(req.neighbors))
        return pb.Empty()

    async def list_interfaces(self, req: pb.ListInterfacesRequest) -> pb.Interfaces:
        with self._rtnl() as rtnl:
            return pb.Interfaces(interfaces=list_interfaces(rtnl))

    async def list_routes(self, req: pb.ListRoutesRequest) -> pb.Routes:
        with self._rtnl() as rtnl:
            return pb.Routes(routes=list_routes(rtnl))
