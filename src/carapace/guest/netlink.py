"""rtnetlink by hand: the messages the agent sends to configure the guest's network,
the parsing of the kernel's replies, and a thin socket around them.

Why by hand (stdlib ``socket.AF_NETLINK`` + ``struct``) and not busybox ``ip``: the
guest is stdlib + protobuf only (no pyroute2), and the guest's busybox (1.35) ``ip``
lacks what the agent needs: ``ip neigh`` has only show/flush (no permanent entries),
``ip addr add`` has no ``nodad`` (IPv6 addresses would stay tentative for a second or
more), and its errors are text to parse. Netlink gives the kernel's errno and, with
``NETLINK_EXT_ACK``, its own explanation ("Nexthop has invalid gateway"), and costs no
fork.

Everything that builds or parses bytes is a pure function (unit-tested byte for
byte); ``Netlink`` only sends a request and reads its acknowledgement or dump. Netlink
is in host byte order: ``struct`` formats use ``=`` (native order, standard sizes).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import ipaddress
import os
import socket
import struct
from typing import NamedTuple

from carapace.errors import CarapaceError

# -- constants (linux/netlink.h, rtnetlink.h, if_link.h, if_addr.h, neighbour.h) ------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
RTM_NAMES = {
    RTM_NEWLINK: "RTM_NEWLINK",
    RTM_GETLINK: "RTM_GETLINK",
    RTM_NEWADDR: "RTM_NEWADDR",
    RTM_DELADDR: "RTM_DELADDR",
    RTM_GETADDR: "RTM_GETADDR",
    RTM_NEWROUTE: "RTM_NEWROUTE",
    RTM_DELROUTE: "RTM_DELROUTE",
    RTM_GETROUTE: "RTM_GETROUTE",
    RTM_NEWNEIGH: "RTM_NEWNEIGH",
}

AF_UNSPEC, AF_INET, AF_INET6 = 0, 2, 10
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY = 1, 4, 5, 6
RTA_PREFSRC, RTA_METRICS, RTA_TABLE = 7, 8, 15
RTAX_MTU = 2
RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_BOOT = 2, 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST, RT_SCOPE_NOWHERE = 0, 253, 254, 255
RTN_UNICAST = 1
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
#: family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
RTATTR = struct.Struct("=HH")  # len, type
NLMSGERR = struct.Struct("=i")  # -errno, then the request's header (and body)


class NetlinkError(CarapaceError):
    """The kernel refused a request: ``errno`` and what was asked."""

    def __init__(self, what: str, errno: int, detail: str = "") -> None:
        name = errno_mod.errorcode.get(errno, str(errno))
        text = f"{what}: {os.strerror(errno)} ({name})"
        if detail:
            text += f": {detail}"
        super().__init__(text)
        self.errno = errno


def _align(n: int) -> int:
    return (n + 3) & ~3


# -- attributes and messages (pure) -----------------------------------------------------


def pack_attr(kind: int, data: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    n = RTATTR.size + len(data)
    return RTATTR.pack(n, kind) + data + b"\0" * (_align(n) - n)


def pack_attrs(attrs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(pack_attr(k, v) for k, v in attrs)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (the last of a repeated type wins; nested flag bits masked)."""
    out: dict[int, bytes] = {}
    off = 0
    while off + RTATTR.size <= len(data):
        n, kind = RTATTR.unpack_from(data, off)
        if n < RTATTR.size or off + n > len(data):
            break
        out[kind & 0x3FFF] = data[off + RTATTR.size : off + n]
        off += _align(n)
    return out


def pack_message(kind: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, pid) + body


class Message(NamedTuple):
    kind: int
    flags: int
    seq: int
    pid: int
    body: bytes


def parse_messages(data: bytes) -> list[Message]:
    """The netlink messages of one datagram."""
    out: list[Message] = []
    off = 0
    while off + NLMSGHDR.size <= len(data):
        n, kind, flags, seq, pid = NLMSGHDR.unpack_from(data, off)
        if n < NLMSGHDR.size or off + n > len(data):
            raise ValueError(f"truncated netlink message at offset {off} (length {n})")
        out.append(Message(kind, flags, seq, pid, data[off + NLMSGHDR.size : off + n]))
        off += _align(n)
    return out


def parse_error(msg: Message) -> tuple[int, str]:
    """(errno, the kernel's extended-ack text) of an NLMSG_ERROR; errno 0 is an ACK."""
    (err,) = NLMSGERR.unpack_from(msg.body)
    detail = ""
    if msg.flags & NLM_F_ACK_TLVS:
        off = NLMSGERR.size
        inner_len = NLMSGHDR.unpack_from(msg.body, off)[0]
        off += NLMSGHDR.size if msg.flags & NLM_F_CAPPED else _align(inner_len)
        text = parse_attrs(msg.body[off:]).get(NLMSGERR_ATTR_MSG, b"")
        detail = text.rstrip(b"\0").decode(errors="replace")
    return -err, detail


# -- requests (pure): (message type, flags, body) -------------------------------------

Request = tuple[int, int, bytes]


def family_of(address: bytes) -> int:
    return AF_INET if len(address) == 4 else AF_INET6


def dump_request(kind: int, family: int = AF_UNSPEC) -> Request:
    """A dump of links, addresses or routes of ``family``."""
    header = {RTM_GETLINK: IFINFOMSG, RTM_GETADDR: IFADDRMSG, RTM_GETROUTE: RTMSG}[kind]
    body = struct.pack("=B", family) + b"\0" * (header.size - 1)
    return kind, NLM_F_REQUEST | NLM_F_DUMP, body


def link_request(
    index: int, *, name: str | None = None, mtu: int | None = None, up: bool | None = None
) -> Request:
    """Change a link: its name, MTU and/or whether it is up."""
    flags = change = 0
    if up is not None:
        change = IFF_UP
        flags = IFF_UP if up else 0
    attrs: list[tuple[int, bytes]] = []
    if name is not None:
        attrs.append((IFLA_IFNAME, name.encode() + b"\0"))
    if mtu is not None:
        attrs.append((IFLA_MTU, struct.pack("=I", mtu)))
    body = IFINFOMSG.pack(AF_UNSPEC, 0, index, flags, change) + pack_attrs(attrs)
    return RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body


def address_request(
    kind: int, index: int, address: bytes, prefix_len: int, scope: int = RT_SCOPE_UNIVERSE
) -> Request:
    """RTM_NEWADDR (IPv6 without duplicate address detection: usable at once; IPv4
    with its broadcast address, as ``ip addr add ... brd +``) or RTM_DELADDR."""
    family = family_of(address)
    flags = IFA_F_NODAD if kind == RTM_NEWADDR and family == AF_INET6 else 0
    attrs = [(IFA_LOCAL, address), (IFA_ADDRESS, address)]
    if kind == RTM_NEWADDR and family == AF_INET and prefix_len < 31:
        net = ipaddress.IPv4Network((address, prefix_len), strict=False)
        attrs.append((IFA_BROADCAST, net.broadcast_address.packed))
    body = IFADDRMSG.pack(family, prefix_len, flags, scope, index) + pack_attrs(attrs)
    req_flags = NLM_F_REQUEST | NLM_F_ACK
    if kind == RTM_NEWADDR:
        req_flags |= NLM_F_CREATE | NLM_F_REPLACE
    return kind, req_flags, body


class RouteEntry(NamedTuple):
    """A route as netlink has it (addresses packed; ``dst`` empty: the default)."""

    family: int
    dst: bytes = b""
    dst_len: int = 0
    gateway: bytes = b""
    oif: int = 0
    prefsrc: bytes = b""
    scope: int = RT_SCOPE_UNIVERSE
    mtu: int = 0
    table: int = RT_TABLE_MAIN
    protocol: int = RTPROT_BOOT
    kind: int = RTN_UNICAST
    priority: int = 0
    tos: int = 0


def route_request(cmd: int, r: RouteEntry) -> Request:
    """RTM_NEWROUTE (created or replacing the same route) or RTM_DELROUTE of ``r``."""
    scope = RT_SCOPE_NOWHERE if cmd == RTM_DELROUTE else r.scope
    table = r.table if r.table < 256 else 0  # RT_TABLE_UNSPEC: see RTA_TABLE
    body = RTMSG.pack(r.family, r.dst_len, 0, r.tos, table, r.protocol, scope, r.kind, 0)
    attrs: list[tuple[int, bytes]] = []
    if r.table >= 256:
        attrs.append((RTA_TABLE, struct.pack("=I", r.table)))
    if r.dst:
        attrs.append((RTA_DST, r.dst))
    if r.gateway:
        attrs.append((RTA_GATEWAY, r.gateway))
    if r.oif:
        attrs.append((RTA_OIF, struct.pack("=i", r.oif)))
    if r.prefsrc:
        attrs.append((RTA_PREFSRC, r.prefsrc))
    if r.priority:
        attrs.append((RTA_PRIORITY, struct.pack("=I", r.priority)))
    if r.mtu and cmd == RTM_NEWROUTE:
        attrs.append((RTA_METRICS, pack_attr(RTAX_MTU, struct.pack("=I", r.mtu))))
    flags = NLM_F_REQUEST | NLM_F_ACK
    if cmd == RTM_NEWROUTE:
        flags |= NLM_F_CREATE | NLM_F_REPLACE
    return cmd, flags, body + pack_attrs(attrs)


def neighbour_request(index: int, address: bytes, lladdr: bytes) -> Request:
    """A permanent neighbour entry (IPv4 ARP or IPv6 ND), replacing any other."""
    body = NDMSG.pack(family_of(address), index, NUD_PERMANENT, 0, 0)
    body += pack_attrs([(NDA_DST, address), (NDA_LLADDR, lladdr)])
    return RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body


# -- replies (pure) ---------------------------------------------------------------------


class Link(NamedTuple):
    # (NamedTuples, not dataclasses: a dataclass compiles its methods when the module
    # is imported, which costs the guest's start milliseconds each. The field shadows
    # tuple.index, which nothing here uses.)
    index: int  # type: ignore[assignment]
    name: str
    mac: bytes
    mtu: int
    flags: int

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


class Address(NamedTuple):
    index: int  # type: ignore[assignment]
    family: int
    address: bytes
    prefix_len: int
    scope: int


def _u32(data: bytes | None) -> int:
    return struct.unpack("=I", data[:4])[0] if data and len(data) >= 4 else 0


def parse_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(body)
    attrs = parse_attrs(body[IFINFOMSG.size :])
    name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
    return Link(index, name, attrs.get(IFLA_ADDRESS, b""), _u32(attrs.get(IFLA_MTU)), flags)


def parse_address(body: bytes) -> Address:
    family, prefix_len, _flags, scope, index = IFADDRMSG.unpack_from(body)
    attrs = parse_attrs(body[IFADDRMSG.size :])
    address = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS, b"")
    return Address(index, family, address, prefix_len, scope)


def parse_route(body: bytes) -> RouteEntry:
    family, dst_len, _src_len, tos, table, proto, scope, kind, _flags = RTMSG.unpack_from(body)
    attrs = parse_attrs(body[RTMSG.size :])
    if RTA_TABLE in attrs:
        table = _u32(attrs[RTA_TABLE])
    metrics = parse_attrs(attrs.get(RTA_METRICS, b""))
    return RouteEntry(
        family=family,
        dst=attrs.get(RTA_DST, b""),
        dst_len=dst_len,
        gateway=attrs.get(RTA_GATEWAY, b""),
        oif=_u32(attrs.get(RTA_OIF)),
        prefsrc=attrs.get(RTA_PREFSRC, b""),
        scope=scope,
        mtu=_u32(metrics.get(RTAX_MTU)),
        table=table,
        protocol=proto,
        kind=kind,
        priority=_u32(attrs.get(RTA_PRIORITY)),
        tos=tos,
    )


# -- the socket (thin) ------------------------------------------------------------------

RECV_SIZE = 1 << 16


class Netlink:
    """A NETLINK_ROUTE socket of the calling process's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self.seq = 0
        try:
            self.sock.bind((0, 0))
            with contextlib.suppress(OSError):  # an old kernel: errors without its text
                self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, req: Request) -> int:
        self.seq += 1
        kind, flags, body = req
        self.sock.send(pack_message(kind, flags, self.seq, body))
        return self.seq

    def _replies(self, seq: int) -> list[Message]:
        data, _, msg_flags, _ = self.sock.recvmsg(RECV_SIZE)
        if msg_flags & socket.MSG_TRUNC:
            raise NetlinkError("netlink reply", errno_mod.EMSGSIZE, "truncated")
        return [m for m in parse_messages(data) if m.seq == seq]

    def request(self, req: Request, what: str) -> None:
        """Send ``req`` and wait for its acknowledgement; a refusal raises
        NetlinkError naming ``what``."""
        seq = self._send(req)
        while True:
            for m in self._replies(seq):
                if m.kind == NLMSG_ERROR:
                    err, detail = parse_error(m)
                    if err:
                        raise NetlinkError(what, err, detail)
                    return

    def dump(self, req: Request) -> list[Message]:
        """The messages of a dump (retried while the kernel reports it interrupted)."""
        what = f"{RTM_NAMES.get(req[0], req[0])} dump"
        for _ in range(10):
            seq = self._send(req)
            out: list[Message] = []
            interrupted = False
            done = False
            while not done:
                for m in self._replies(seq):
                    interrupted |= bool(m.flags & NLM_F_DUMP_INTR)
                    if m.kind == NLMSG_DONE:
                        done = True
                    elif m.kind == NLMSG_ERROR:
                        err, detail = parse_error(m)
                        if err:
                            raise NetlinkError(what, err, detail)
                        done = True
                    elif m.kind != NLMSG_NOOP:
                        out.append(m)
            if not interrupted:
                return out
        raise NetlinkError(what, errno_mod.EINTR, "the dump kept changing")
