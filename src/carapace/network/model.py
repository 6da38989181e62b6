"""The pod's network as carapace reads it from a network namespace and tells the guest
(pure: stdlib and the agent's messages).

An ``Interface`` is named as the guest will name it (the pod's own name, e.g. ``eth0``,
the veth's name in the namespace); a ``Route`` or ``Neighbor`` names its interface the
same way. ``to_pb`` gives the agent API's message; ``to_record``/``from_record`` give
JSON-able dicts (for ``state.json`` or a test's expectations).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from carapace.errors import InvalidArgument
from carapace.protocols import agent_pb2 as pb

_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

#: The taps carapace makes in a pod's network namespace: tap0_carapace, tap1_carapace, ...
TAP_SUFFIX = "_carapace"
_TAP_RE = re.compile(r"tap([0-9]{1,3})_carapace")
#: The most taps one namespace can have (an interface name has at most 15 characters).
MAX_TAPS = 1000


def tap_name(index: int) -> str:
    """The name of carapace's tap number ``index`` (0-999)."""
    if not 0 <= index < MAX_TAPS:
        raise InvalidArgument(f"tap index {index}; accepted: 0 to {MAX_TAPS - 1}")
    return f"tap{index}{TAP_SUFFIX}"


def tap_index(name: str) -> int | None:
    """The index of a carapace tap's name, None for any other name."""
    m = _TAP_RE.fullmatch(name)
    return int(m[1]) if m else None


def normal_mac(mac: str) -> str:
    """``aa:bb:cc:dd:ee:ff`` in lower case (how the guest finds a NIC)."""
    text = mac.strip().lower()
    if not _MAC_RE.fullmatch(text):
        raise InvalidArgument(f"MAC address {mac!r}; accepted: six hex bytes, aa:bb:cc:dd:ee:ff")
    return text


def family_of(address: str) -> int:
    """4 or 6 for an address or a CIDR."""
    try:
        return ipaddress.ip_interface(address).version
    except ValueError:
        raise InvalidArgument(f"{address!r} is not an IP address or CIDR") from None


@dataclass(frozen=True)
class IPAddress:
    family: int  # 4 or 6
    address: str  # without the prefix length
    prefix_len: int

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise InvalidArgument(f"address family {self.family}; accepted: 4, 6")
        if family_of(self.address) != self.family or "/" in self.address:
            raise InvalidArgument(
                f"{self.address!r} is not an IPv{self.family} address (without a prefix)"
            )
        if not 0 <= self.prefix_len <= (32 if self.family == 4 else 128):
            raise InvalidArgument(f"prefix length {self.prefix_len} of {self.address}")

    @classmethod
    def parse(cls, cidr: str) -> IPAddress:
        """From ``10.0.0.2/24`` or ``fd00::2/64``."""
        try:
            iface = ipaddress.ip_interface(cidr)
        except ValueError:
            raise InvalidArgument(f"{cidr!r} is not an address with a prefix length") from None
        return cls(iface.version, str(iface.ip), iface.network.prefixlen)

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefix_len}"

    def to_pb(self) -> pb.IPAddress:
        return pb.IPAddress(family=self.family, address=self.address, prefix_len=self.prefix_len)

    def to_record(self) -> dict[str, Any]:
        return {"family": self.family, "address": self.address, "prefix_len": self.prefix_len}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> IPAddress:
        return cls(int(rec["family"]), str(rec["address"]), int(rec["prefix_len"]))


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str
    mtu: int
    addresses: tuple[IPAddress, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normal_mac(self.mac))
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if not self.name or len(self.name) > 15 or "/" in self.name:
            raise InvalidArgument(f"interface name {self.name!r}; accepted: 1-15 characters")
        if not 68 <= self.mtu <= 65535:
            raise InvalidArgument(f"interface {self.name}: MTU {self.mtu}; accepted: 68-65535")

    def to_pb(self) -> pb.Interface:
        return pb.Interface(
            name=self.name,
            mac=self.mac,
            mtu=self.mtu,
            addresses=[a.to_pb() for a in self.addresses],
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mac": self.mac,
            "mtu": self.mtu,
            "addresses": [a.to_record() for a in self.addresses],
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Interface:
        return cls(
            name=str(rec["name"]),
            mac=str(rec["mac"]),
            mtu=int(rec["mtu"]),
            addresses=tuple(IPAddress.from_record(a) for a in rec.get("addresses", ())),
        )


@dataclass(frozen=True)
class Route:
    dest: str = ""  # CIDR; "" is the default route
    gateway: str = ""  # "" for a link route
    device: str = ""  # the interface's name
    source: str = ""  # preferred source address, or ""
    scope: int = 0  # rtnetlink scope (0 universe, 253 link)
    mtu: int = 0  # route MTU, 0 for none
    family: int = 4

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise InvalidArgument(f"route family {self.family}; accepted: 4, 6")
        for what, value in (("dest", self.dest), ("gateway", self.gateway)):
            if value and family_of(value) != self.family:
                raise InvalidArgument(f"route {what} {value!r} is not IPv{self.family}")

    @property
    def is_default(self) -> bool:
        return self.dest == ""

    def to_pb(self) -> pb.Route:
        return pb.Route(
            dest=self.dest,
            gateway=self.gateway,
            device=self.device,
            source=self.source,
            scope=self.scope,
            mtu=self.mtu,
            family=self.family,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "dest": self.dest,
            "gateway": self.gateway,
            "device": self.device,
            "source": self.source,
            "scope": self.scope,
            "mtu": self.mtu,
            "family": self.family,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Route:
        return cls(
            dest=str(rec.get("dest", "")),
            gateway=str(rec.get("gateway", "")),
            device=str(rec.get("device", "")),
            source=str(rec.get("source", "")),
            scope=int(rec.get("scope", 0)),
            mtu=int(rec.get("mtu", 0)),
            family=int(rec.get("family", 4)),
        )


@dataclass(frozen=True)
class Neighbor:
    address: str  # IPv4 or IPv6
    mac: str
    device: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normal_mac(self.mac))
        family_of(self.address)

    def to_pb(self) -> pb.ARPNeighbor:
        return pb.ARPNeighbor(address=self.address, mac=self.mac, device=self.device)

    def to_record(self) -> dict[str, Any]:
        return {"address": self.address, "mac": self.mac, "device": self.device}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Neighbor:
        return cls(str(rec["address"]), str(rec["mac"]), str(rec["device"]))


@dataclass(frozen=True)
class NetworkConfig:
    """What the guest must have: interfaces, then routes (link routes before the routes
    through a gateway on them), then static neighbours."""

    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "interfaces", tuple(self.interfaces))
        object.__setattr__(self, "routes", tuple(self.routes))
        object.__setattr__(self, "neighbors", tuple(self.neighbors))
        names = [i.name for i in self.interfaces]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"interface names repeat: {names}")

    def select(self, names: Iterable[str]) -> NetworkConfig:
        """Only the interfaces named (in this config's order), their routes and neighbours."""
        wanted = set(names)
        missing = wanted - {i.name for i in self.interfaces}
        if missing:
            raise InvalidArgument(
                f"no interface {', '.join(sorted(missing))}; "
                f"the namespace has: {', '.join(i.name for i in self.interfaces) or 'none'}"
            )
        return NetworkConfig(
            tuple(i for i in self.interfaces if i.name in wanted),
            tuple(r for r in self.routes if r.device in wanted),
            tuple(n for n in self.neighbors if n.device in wanted),
        )

    def interface_requests(self) -> list[pb.UpdateInterfaceRequest]:
        return [pb.UpdateInterfaceRequest(interface=i.to_pb()) for i in self.interfaces]

    def routes_request(self) -> pb.UpdateRoutesRequest:
        return pb.UpdateRoutesRequest(routes=pb.Routes(routes=[r.to_pb() for r in self.routes]))

    def neighbors_request(self) -> pb.AddARPNeighborsRequest:
        return pb.AddARPNeighborsRequest(neighbors=[n.to_pb() for n in self.neighbors])

    def to_record(self) -> dict[str, Any]:
        return {
            "interfaces": [i.to_record() for i in self.interfaces],
            "routes": [r.to_record() for r in self.routes],
            "neighbors": [n.to_record() for n in self.neighbors],
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> NetworkConfig:
        return cls(
            tuple(Interface.from_record(i) for i in rec.get("interfaces", ())),
            tuple(Route.from_record(r) for r in rec.get("routes", ())),
            tuple(Neighbor.from_record(n) for n in rec.get("neighbors", ())),
        )
