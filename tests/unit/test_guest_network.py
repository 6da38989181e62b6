"""The guest's network without root: rtnetlink messages byte for byte, the parsing of
dumps recorded from a real kernel, and the network verbs against a fake netlink
socket (carapace.guest.netlink, carapace.guest.network)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import struct

import pytest

from carapace.errors import InvalidArgument, NotFound
from carapace.guest import netlink as nl
from carapace.guest import network
from carapace.guest.netlink import Link, Message, NetlinkError, RouteEntry
from carapace.protocols import agent_pb2 as pb

# -- recorded from a kernel (6.18): a netns with lo (down), peer0 (2) and eth0 (3,
# 02:00:00:00:01:01, MTU 1450, up) holding 10.198.0.5/24 and fd00:198::5/64 (nodad),
# a default route via 10.198.0.1 and 10.198.5.0/24 with MTU 1400; then the error of
# a route via the unreachable 10.99.0.1 and the ACK of a link change.

LINK_ETH0 = bytes.fromhex(
    "d80500001000020001000000075a000000000100030000004310010000000000090003006574683000000000"
    "08000d00e803000005001000060000000500110000000000050043000000000008000400aa05000008003200"
    "4400000008003300ffff000008001b000000000008001e000000000008003d000000000008001f0002000000"
    "08002800ffff0000080029000000010008003a000000010008003f0000000100080040000000010008003b00"
    "f8ff070008003c00ffff00000800420000000000080020000200000005002100010000000800230002000000"
    "08002f000100000008003000010000000600440000000000060045000000000005002700000000000a000100"
    "02000000010100000a000200ffffffffffff0000cc001700070000000000000007000000000000004a020000"
    "000000009a020000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000006400070007000000070000004a0200009a0200000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000c002b00050002000000000010001200090001007665746800000000"
    "08000500020000000c0006006e6f71756575650030031a008c00020088000100010000000000000000000000"
    "0100000001000000010000000100000000000000010000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000010270000e80300000000000000000000000000000000000001000000a0020a000800010010000080"
    "14000500ffff0000d3b20300688d0000e8030000f40002000000000040000000aa0500000100000001000000"
    "0100000001000000ffffffffa00f0000e803000000000000803a090080510100030000005802000010000000"
    "0000000001000000010000000100000060ea0000000000000000000000000000000000000000000000000000"
    "01000000000000000000000010270000e8030000010000000000000000000000010000000000000000000000"
    "010000000000000000000000000000000000000080ee36000000000000000000010000000000000000000000"
    "0000000000000000000000000004000000000000ffff0000ffffffff01000000000000000000000000000000"
    "3401030026000000000000000700000000000000e80100000000000000000000000000000700000000000000"
    "0000000000000000000000000000000000000000000000000700000000000000070000000000000038020000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000700000000000000070000000000000000000000000000000000000000000000e8010000"
    "0000000038020000000000000000000000000000000000000000000000000000000000000000000000000000"
    "3c00060007000000000000000000000000000000000000000000000007000000000000000000000000000000"
    "0000000000000000000000000000000014000700000000000000000000000000000000000500080000000000"
    "24000e00000000000000000000000000000000000000000000000000000000000000000004003e8004004180"
)
ADDRS_V4 = bytes.fromhex(
    "500000001400020002000000075a00000218800003000000080001000ac60005080002000ac6000509000300"
    "6574683000000000080008008000000014000600ffffffffffffffffd3b20300d3b203001400000003000200"
    "02000000075a000000000000"
)
ADDRS_V6 = bytes.fromhex(
    "500000001400020003000000075a00000a4080fd0200000014000100fe80000000000000000000fffe000102"
    "14000600ffffffffffffffffd3b20300d3b20300080008008000000005000b00030000004800000014000200"
    "03000000075a00000a4082000300000014000100fd00019800000000000000000000000514000600ffffffff"
    "ffffffffd3b20300d3b203000800080082000000500000001400020003000000075a00000a4080fd03000000"
    "14000100fe80000000000000000000fffe00010114000600ffffffffffffffffd3b20300d3b2030008000800"
    "8000000005000b0003000000140000000300020003000000075a000000000000"
)
ROUTES_V4 = bytes.fromhex(
    "340000001800020004000000075a000002000000fe0300010000000008000f00fe000000080005000ac60001"
    "08000400030000003c0000001800020004000000075a000002180000fe02fd010000000008000f00fe000000"
    "080001000ac60000080007000ac600050800040003000000400000001800020004000000075a000002180000"
    "fe03fd010000000008000f00fe000000080001000ac605000c00080008000200780500000800040003000000"
    "3c0000001800020004000000075a000002200000ff02fe020000000008000f00ff000000080001000ac60005"
    "080007000ac6000508000400030000003c0000001800020004000000075a000002200000ff02fd0300000000"
    "08000f00ff000000080001000ac600ff080007000ac600050800040003000000140000000300020004000000"
    "075a000000000000"
)
ROUTES_V6 = bytes.fromhex(
    "740000001800020005000000075a00000a400000fe0200010000000008000f00fe00000014000100fd000198"
    "0000000000000000000000000800060000010000080004000300000024000c00000000000000000000000000"
    "00000000000000000000000000000000000000000500140000000000740000001800020005000000075a0000"
    "0a400000fe0200010000000008000f00fe00000014000100fe80000000000000000000000000000008000600"
    "00010000080004000200000024000c0000000000000000000000000000000000000000000000000000000000"
    "000000000500140000000000740000001800020005000000075a00000a400000fe0200010000000008000f00"
    "fe00000014000100fe8000000000000000000000000000000800060000010000080004000300000024000c00"
    "0000000000000000000000000000000000000000000000000000000000000000050014000000000074000000"
    "1800020005000000075a00000a800000ff0200020000000008000f00ff00000014000100fd00019800000000"
    "00000000000000050800060000000000080004000300000024000c0000000000000000000000000000000000"
    "000000000000000000000000000000000500140000000000740000001800020005000000075a00000a800000"
    "ff0200020000000008000f00ff00000014000100fe80000000000000000000fffe0001010800060000000000"
    "080004000300000024000c000000000000000000000000000000000000000000000000000000000000000000"
    "0500140000000000740000001800020005000000075a00000a800000ff0200020000000008000f00ff000000"
    "14000100fe80000000000000000000fffe0001020800060000000000080004000200000024000c0000000000"
    "0000000000000000000000000000000000000000000000000000000005001400000000007400000018000200"
    "05000000075a00000a080000ff0200050000000008000f00ff00000014000100ff0000000000000000000000"
    "000000000800060000010000080004000200000024000c000000000000000000000000000000000000000000"
    "0000000000000000000000000500140000000000740000001800020005000000075a00000a080000ff020005"
    "0000000008000f00ff00000014000100ff000000000000000000000000000000080006000001000008000400"
    "0300000024000c00000000000000000000000000000000000000000000000000000000000000000005001400"
    "00000000140000000300020005000000075a000000000000"
)
ERROR_UNREACHABLE = bytes.fromhex(
    "600000000200000207000000075a00009bffffff2c00000018000505070000000000000002000000fe030001"
    "00000000080005000a6300010800040003000000200001004e657874686f702068617320696e76616c696420"
    "6761746577617900"
)
ACK = bytes.fromhex("240000000200000108000000075a00000000000020000000100005000800000000000000")


def wire(req: nl.Request, seq: int) -> bytes:
    kind, flags, body = req
    return nl.pack_message(kind, flags, seq, body)


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# -- messages, byte for byte ------------------------------------------------------------


def test_an_attribute_is_padded_to_four_bytes() -> None:
    assert nl.pack_attr(nl.IFLA_IFNAME, b"eth0\0") == bytes.fromhex("090003006574683000000000")
    assert nl.pack_attr(nl.IFLA_MTU, struct.pack("=I", 1400)) == bytes.fromhex("0800040078050000")


def test_rename_a_link() -> None:
    assert wire(nl.link_request(3, name="eth0"), 1) == bytes.fromhex(
        "2c000000" "1000" "0500" "01000000" "00000000"  # RTM_NEWLINK, REQUEST|ACK, seq 1
        "00" "00" "0000" "03000000" "00000000" "00000000"  # ifinfomsg: index 3
        "09000300" "6574683000000000"  # IFLA_IFNAME "eth0\0", padded
    )  # fmt: skip


def test_set_a_link_up_and_its_mtu() -> None:
    assert wire(nl.link_request(3, up=True), 8) == bytes.fromhex(
        "20000000" "1000" "0500" "08000000" "00000000"
        "00" "00" "0000" "03000000" "01000000" "01000000"  # flags IFF_UP, change IFF_UP
    )  # fmt: skip
    # the kernel's ACK of exactly this request, recorded, echoes its header
    assert ACK[20:36] == wire(nl.link_request(3, up=True), 8)[:16]
    assert wire(nl.link_request(3, up=False, mtu=1450), 2)[16:] == bytes.fromhex(
        "00" "00" "0000" "03000000" "00000000" "01000000"  # down: flags 0, change IFF_UP
        "08000400" "aa050000"  # IFLA_MTU 1450
    )  # fmt: skip


def test_add_an_ipv6_address_without_dad() -> None:
    assert wire(nl.address_request(nl.RTM_NEWADDR, 3, ip("fd00:198::5"), 64), 3) == bytes.fromhex(
        "40000000" "1400" "0505" "03000000" "00000000"  # RTM_NEWADDR, REQUEST|ACK|CREATE|REPLACE
        "0a" "40" "02" "00" "03000000"  # AF_INET6, /64, IFA_F_NODAD, scope 0, index 3
        "14000200" "fd000198000000000000000000000005"  # IFA_LOCAL
        "14000100" "fd000198000000000000000000000005"  # IFA_ADDRESS
    )  # fmt: skip


def test_add_an_ipv4_address_with_its_broadcast_and_delete_one() -> None:
    assert wire(nl.address_request(nl.RTM_NEWADDR, 3, ip("10.198.0.5"), 24), 4) == bytes.fromhex(
        "30000000" "1400" "0505" "04000000" "00000000"
        "02" "18" "00" "00" "03000000"  # AF_INET, /24, no flags
        "08000200" "0ac60005" "08000100" "0ac60005"  # IFA_LOCAL, IFA_ADDRESS
        "08000400" "0ac600ff"  # IFA_BROADCAST 10.198.0.255
    )  # fmt: skip
    deleted = wire(nl.address_request(nl.RTM_DELADDR, 3, ip("10.198.0.5"), 32), 5)
    assert deleted == bytes.fromhex(
        "28000000" "1500" "0500" "05000000" "00000000"  # RTM_DELADDR, REQUEST|ACK
        "02" "20" "00" "00" "03000000"
        "08000200" "0ac60005" "08000100" "0ac60005"
    )  # fmt: skip


def test_add_a_default_route_via_a_gateway() -> None:
    route = RouteEntry(family=nl.AF_INET, gateway=ip("10.198.0.1"), oif=3)
    assert wire(nl.route_request(nl.RTM_NEWROUTE, route), 7) == bytes.fromhex(
        "2c000000" "1800" "0505" "07000000" "00000000"  # RTM_NEWROUTE, REQUEST|ACK|CREATE|REPLACE
        "02" "00" "00" "00" "fe" "03" "00" "01" "00000000"  # main, boot, universe, unicast
        "08000500" "0ac60001"  # RTA_GATEWAY
        "08000400" "03000000"  # RTA_OIF
    )  # fmt: skip


def test_add_a_link_route_with_an_mtu() -> None:
    route = RouteEntry(
        family=nl.AF_INET, dst=ip("10.198.5.0"), dst_len=24, oif=3, scope=253, mtu=1400
    )
    assert wire(nl.route_request(nl.RTM_NEWROUTE, route), 9) == bytes.fromhex(
        "38000000" "1800" "0505" "09000000" "00000000"
        "02" "18" "00" "00" "fe" "03" "fd" "01" "00000000"  # /24, scope link
        "08000100" "0ac60500"  # RTA_DST
        "08000400" "03000000"  # RTA_OIF
        "0c000800" "08000200" "78050000"  # RTA_METRICS { RTAX_MTU 1400 }
    )  # fmt: skip


def test_delete_a_route_matches_any_scope_and_its_metric() -> None:
    route = RouteEntry(
        family=nl.AF_INET6, gateway=ip("fd00:198::1"), oif=3, priority=1024, mtu=1400
    )
    assert wire(nl.route_request(nl.RTM_DELROUTE, route), 2) == bytes.fromhex(
        "40000000" "1900" "0500" "02000000" "00000000"  # RTM_DELROUTE, REQUEST|ACK
        "0a" "00" "00" "00" "fe" "03" "ff" "01" "00000000"  # scope RT_SCOPE_NOWHERE
        "14000500" "fd000198000000000000000000000001"  # RTA_GATEWAY
        "08000400" "03000000" "08000600" "00040000"  # RTA_OIF, RTA_PRIORITY 1024
    )  # fmt: skip


def test_a_route_of_a_table_above_255_names_it_in_rta_table() -> None:
    _, _, body = nl.route_request(nl.RTM_NEWROUTE, RouteEntry(family=nl.AF_INET, table=1000))
    assert body[4] == 0  # rtm_table RT_TABLE_UNSPEC
    assert nl.parse_attrs(body[nl.RTMSG.size :])[nl.RTA_TABLE] == struct.pack("=I", 1000)


def test_a_permanent_neighbour() -> None:
    req = nl.neighbour_request(3, ip("10.198.0.1"), bytes.fromhex("0200000000aa"))
    assert wire(req, 6) == bytes.fromhex(
        "30000000" "1c00" "0505" "06000000" "00000000"  # RTM_NEWNEIGH, REQUEST|ACK|CREATE|REPLACE
        "02" "000000" "03000000" "8000" "00" "00"  # AF_INET, index 3, NUD_PERMANENT
        "08000100" "0ac60001"  # NDA_DST
        "0a000200" "0200000000aa" "0000"  # NDA_LLADDR, padded
    )  # fmt: skip
    v6 = nl.neighbour_request(3, ip("fd00:198::1"), bytes(6))[2]
    assert v6[0] == nl.AF_INET6


def test_dump_requests() -> None:
    assert wire(nl.dump_request(nl.RTM_GETROUTE, nl.AF_INET6), 1) == bytes.fromhex(
        "1c000000" "1a00" "0103" "01000000" "00000000"  # RTM_GETROUTE, REQUEST|DUMP
        "0a" "0000000000000000000000"  # rtmsg of AF_INET6
    )  # fmt: skip
    assert nl.dump_request(nl.RTM_GETLINK)[2] == bytes(16)
    assert nl.dump_request(nl.RTM_GETADDR)[2] == bytes(8)


# -- replies recorded from a kernel -----------------------------------------------------


def test_parse_a_link() -> None:
    (m,) = nl.parse_messages(LINK_ETH0)
    assert (m.kind, m.flags & nl.NLM_F_MULTI) == (nl.RTM_NEWLINK, nl.NLM_F_MULTI)
    link = nl.parse_link(m.body)
    assert link == Link(3, "eth0", bytes.fromhex("020000000101"), 1450, link.flags)
    assert link.up


def test_parse_an_address_dump() -> None:
    msgs = nl.parse_messages(ADDRS_V4)
    assert [m.kind for m in msgs] == [nl.RTM_NEWADDR, nl.NLMSG_DONE]
    assert nl.parse_address(msgs[0].body) == nl.Address(3, nl.AF_INET, ip("10.198.0.5"), 24, 0)
    v6 = [nl.parse_address(m.body) for m in nl.parse_messages(ADDRS_V6)[:-1]]
    assert [(a.index, str(ipaddress.ip_address(a.address)), a.prefix_len, a.scope) for a in v6] == [
        (2, "fe80::ff:fe00:102", 64, 253),
        (3, "fd00:198::5", 64, 0),
        (3, "fe80::ff:fe00:101", 64, 253),
    ]


def test_parse_a_route_dump() -> None:
    routes = [nl.parse_route(m.body) for m in nl.parse_messages(ROUTES_V4)[:-1]]
    default, kernel, mtu = routes[:3]
    assert default == RouteEntry(family=nl.AF_INET, gateway=ip("10.198.0.1"), oif=3)
    assert kernel == RouteEntry(
        family=nl.AF_INET, dst=ip("10.198.0.0"), dst_len=24, oif=3, prefsrc=ip("10.198.0.5"),
        scope=nl.RT_SCOPE_LINK, protocol=nl.RTPROT_KERNEL,
    )  # fmt: skip
    assert (mtu.dst, mtu.dst_len, mtu.mtu, mtu.scope) == (ip("10.198.5.0"), 24, 1400, 253)
    assert {r.table for r in routes[3:]} == {255}  # the local table comes in the dump too
    v6 = [nl.parse_route(m.body) for m in nl.parse_messages(ROUTES_V6)[:-1]]
    assert v6[0].priority == 256 and v6[0].protocol == nl.RTPROT_KERNEL


def test_parse_the_kernel_s_error_and_its_explanation() -> None:
    (m,) = nl.parse_messages(ERROR_UNREACHABLE)
    assert m.kind == nl.NLMSG_ERROR
    assert nl.parse_error(m) == (errno.ENETUNREACH, "Nexthop has invalid gateway")
    (ack,) = nl.parse_messages(ACK)
    assert nl.parse_error(ack) == (0, "")
    e = NetlinkError("add route default via 10.99.0.1 dev eth0", errno.ENETUNREACH, "Nexthop")
    assert str(e) == (
        "add route default via 10.99.0.1 dev eth0: Network is unreachable (ENETUNREACH): Nexthop"
    )
    assert e.errno == errno.ENETUNREACH


def test_truncated_input() -> None:
    with pytest.raises(ValueError, match="truncated netlink message"):
        nl.parse_messages(ACK[:-4])
    assert nl.parse_attrs(bytes.fromhex("0c0003006574")) == {}  # claims more than there is
    assert nl.parse_attrs(b"\x08\x00") == {}


# -- checking the host's values ---------------------------------------------------------


def test_macs() -> None:
    assert network.parse_mac("02:42:0A:C6:00:05") == bytes.fromhex("02420ac60005")
    assert network.format_mac(bytes.fromhex("02420ac60005")) == "02:42:0a:c6:00:05"
    for bad in (
        "",
        "02-42-0a-c6-00-05",
        "02:42:0a:c6:00",
        "02:42:0a:c6:00:05:07",
        "zz:42:0a:c6:00:05",
    ):
        with pytest.raises(InvalidArgument, match=f"MAC {bad!r} is not a MAC address; accepted"):
            network.parse_mac(bad)


@pytest.mark.parametrize("name", ["", "a" * 16, ".", "..", "eth/0", "eth:0", "eth 0"])
def test_interface_names_the_kernel_refuses(name: str) -> None:
    with pytest.raises(InvalidArgument, match=f"interface name {name!r} is not accepted"):
        network.check_ifname(name)


def test_interface_names_the_kernel_takes() -> None:
    assert network.check_ifname("a" * 15) == "a" * 15
    assert network.check_ifname("eth0.100") == "eth0.100"


@pytest.mark.parametrize(
    ("address", "message"),
    [
        (pb.IPAddress(address="10.198.0.5/24", prefix_len=24), "'10.198.0.5/24' is not an IP"),
        (pb.IPAddress(address="10.198.0.5", prefix_len=0), "prefix length 0; accepted: 1 to 32"),
        (pb.IPAddress(address="fd00::5", prefix_len=129), "accepted: 1 to 128"),
        (pb.IPAddress(family=6, address="10.198.0.5", prefix_len=24), "not an IPv6 address"),
        (pb.IPAddress(family=5, address="10.198.0.5", prefix_len=24), "family 5; accepted: 4, 6"),
    ],
)
def test_bad_addresses(address: pb.IPAddress, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        network.interface_addresses(pb.Interface(mac="02:00:00:00:01:01", addresses=[address]))


def index_of(name: str) -> int:
    if name != "eth0":
        raise NotFound(f"interface {name!r} not found")
    return 3


def test_routes_from_the_host() -> None:
    default = network.route_entry(pb.Route(gateway="10.198.0.1", device="eth0"), index_of)
    assert default == RouteEntry(family=nl.AF_INET, gateway=ip("10.198.0.1"), oif=3)
    link = network.route_entry(pb.Route(dest="fd00:199::/64", device="eth0", mtu=1400), index_of)
    assert link == RouteEntry(
        family=nl.AF_INET6, dst=ip("fd00:199::"), dst_len=64, oif=3, scope=253, mtu=1400
    )
    everywhere = network.route_entry(pb.Route(dest="0.0.0.0/0", device="eth0"), index_of)
    assert (everywhere.dst, everywhere.dst_len, everywhere.scope) == (b"", 0, 253)
    sourced = network.route_entry(
        pb.Route(dest="10.198.0.0/24", device="eth0", source="10.198.0.5", scope=0, family=4),
        index_of,
    )
    assert sourced.prefsrc == ip("10.198.0.5")


@pytest.mark.parametrize(
    ("route", "error", "message"),
    [
        (pb.Route(dest="10.198.0.1/24", device="eth0"), InvalidArgument,
         "route destination '10.198.0.1/24' is not a network .*has host bits set"),
        (pb.Route(dest="10.198.0.0/33", device="eth0"), InvalidArgument, "accepted: '' for the"),
        (pb.Route(dest="fd00::/64", gateway="10.198.0.1"), InvalidArgument,
         "'10.198.0.1' is IPv4 but the route is IPv6"),
        (pb.Route(dest="10.0.0.0/8", family=6, device="eth0"), InvalidArgument, "is IPv4 but"),
        (pb.Route(device="eth0"), InvalidArgument, "no address to tell its family by"),
        (pb.Route(dest="10.0.0.0/8"), InvalidArgument, "a route without gateway needs a device"),
        (pb.Route(gateway="10.0.0.1", scope=256), InvalidArgument, "scope 256; accepted"),
        (pb.Route(gateway="gw"), InvalidArgument, "route default gateway 'gw' is not an IP"),
        (pb.Route(dest="10.0.0.0/8", device="eth9"), NotFound, "'eth9' not found"),
    ],
)  # fmt: skip
def test_bad_routes(route: pb.Route, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        network.route_entry(route, index_of)


# -- the verbs against a fake netlink socket --------------------------------------------


def link_msg(index: int, name: str, mac: str, mtu: int = 1500, up: bool = True) -> Message:
    attrs = [
        (nl.IFLA_IFNAME, name.encode() + b"\0"),
        (nl.IFLA_ADDRESS, network.parse_mac(mac)),
        (nl.IFLA_MTU, struct.pack("=I", mtu)),
    ]
    body = nl.IFINFOMSG.pack(0, 1, index, nl.IFF_UP if up else 0, 0) + nl.pack_attrs(attrs)
    return Message(nl.RTM_NEWLINK, nl.NLM_F_MULTI, 1, 0, body)


def addr_msg(index: int, cidr: str) -> Message:
    iface = ipaddress.ip_interface(cidr)
    _, _, body = nl.address_request(nl.RTM_NEWADDR, index, iface.ip.packed, iface.network.prefixlen)
    return Message(nl.RTM_NEWADDR, nl.NLM_F_MULTI, 1, 0, body)


def route_msg(route: RouteEntry) -> Message:
    return Message(
        nl.RTM_NEWROUTE, nl.NLM_F_MULTI, 1, 0, nl.route_request(nl.RTM_NEWROUTE, route)[2]
    )


class FakeRtnl:
    """Answers dumps from fixed messages; records requests, failing those named."""

    def __init__(
        self,
        links: list[Message],
        addrs: list[Message],
        routes: list[Message] = [],  # noqa: B006
    ) -> None:
        self.links, self.addrs, self.routes = links, addrs, routes
        self.requests: list[tuple[nl.Request, str]] = []
        self.fail: dict[str, int] = {}

    def request(self, req: nl.Request, what: str) -> None:
        self.requests.append((req, what))
        for prefix, err in self.fail.items():
            if what.startswith(prefix):
                raise NetlinkError(what, err)

    def dump(self, req: nl.Request) -> list[Message]:
        kind, _, body = req
        if kind == nl.RTM_GETLINK:
            return self.links
        if kind == nl.RTM_GETADDR:
            return self.addrs
        return [m for m in self.routes if m.body[0] == body[0]]

    @property
    def whats(self) -> list[str]:
        return [w for _, w in self.requests]

    def __enter__(self) -> FakeRtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def recorded() -> FakeRtnl:
    links = [link_msg(1, "lo", "00:00:00:00:00:00", 65536, up=False),
             link_msg(2, "peer0", "02:00:00:00:01:02"), *nl.parse_messages(LINK_ETH0)]  # fmt: skip
    addrs = nl.parse_messages(ADDRS_V4) + nl.parse_messages(ADDRS_V6)
    return FakeRtnl(links, addrs, nl.parse_messages(ROUTES_V4) + nl.parse_messages(ROUTES_V6))


def test_list_interfaces_of_a_recorded_namespace() -> None:
    ifaces = network.list_interfaces(recorded())
    assert [(i.name, i.mac, i.mtu, i.up) for i in ifaces] == [
        ("lo", "00:00:00:00:00:00", 65536, False),
        ("peer0", "02:00:00:00:01:02", 1500, True),
        ("eth0", "02:00:00:00:01:01", 1450, True),
    ]
    assert [(a.family, a.address, a.prefix_len) for a in ifaces[2].addresses] == [
        (4, "10.198.0.5", 24), (6, "fd00:198::5", 64), (6, "fe80::ff:fe00:101", 64),
    ]  # fmt: skip


def test_list_routes_of_a_recorded_namespace() -> None:
    assert network.list_routes(recorded()) == [
        pb.Route(gateway="10.198.0.1", device="eth0", family=4),
        pb.Route(dest="10.198.0.0/24", device="eth0", source="10.198.0.5", scope=253, family=4),
        pb.Route(dest="10.198.5.0/24", device="eth0", scope=253, mtu=1400, family=4),
        pb.Route(dest="fd00:198::/64", device="eth0", family=6),
        pb.Route(dest="fe80::/64", device="peer0", family=6),
        pb.Route(dest="fe80::/64", device="eth0", family=6),
    ]  # the main table only: not the local table's routes


def nic() -> FakeRtnl:
    """lo, and eth1 (02:00:00:00:01:01, up) holding an old, a kept and a link-local address."""
    links = [
        link_msg(1, "lo", "00:00:00:00:00:00", 65536),
        link_msg(2, "eth1", "02:00:00:00:01:01"),
    ]
    addrs = [addr_msg(1, "127.0.0.1/8"), addr_msg(2, "10.198.9.9/24"),
             addr_msg(2, "10.198.0.5/24"), addr_msg(2, "fe80::1/64")]  # fmt: skip
    return FakeRtnl(links, addrs)


WANTED = pb.Interface(
    name="eth0",
    mac="02:00:00:00:01:01".upper(),
    mtu=1450,
    addresses=[
        pb.IPAddress(family=4, address="10.198.0.5", prefix_len=24),
        pb.IPAddress(address="fd00:198::5", prefix_len=64),
    ],
)


def test_update_interface_renames_sets_mtu_addresses_and_up() -> None:
    rtnl = nic()
    index, iface = network.update_interface(rtnl, WANTED)
    assert rtnl.whats == [
        "set eth1 MTU 1450",
        "set eth1 down to rename it",
        "rename eth1 to eth0",
        "set eth0 up",
        "delete address 10.198.9.9/24 of eth0",  # not asked for; the link-local stays
        "add address fd00:198::5/64 to eth0",  # 10.198.0.5/24 is there already
    ]
    (kind, _, body), _ = rtnl.requests[-1]
    assert kind == nl.RTM_NEWADDR
    assert nl.IFADDRMSG.unpack_from(body)[2] == nl.IFA_F_NODAD
    assert (index, iface.mac) == (2, "02:00:00:00:01:01")


def test_update_interface_leaves_alone_what_is_as_asked() -> None:
    rtnl = nic()
    same = pb.Interface(mac="02:00:00:00:01:01", mtu=1500, addresses=WANTED.addresses[:1])
    network.update_interface(rtnl, same)
    assert rtnl.whats == ["set eth1 up", "delete address 10.198.9.9/24 of eth1"]


def test_a_failed_rename_brings_the_link_up_again() -> None:
    rtnl = nic()
    rtnl.fail["rename"] = errno.EEXIST
    with pytest.raises(NetlinkError, match=r"rename eth1 to eth0: File exists \(EEXIST\)"):
        network.update_interface(rtnl, WANTED)
    assert rtnl.whats[-2:] == ["rename eth1 to eth0", "set eth1 up again"]


def test_an_unknown_mac_is_not_found_and_changes_nothing() -> None:
    rtnl = nic()
    with pytest.raises(NotFound, match=r"no interface with MAC 02:00:00:00:09:09 in the guest; "
                       r"MACs: 00:00:00:00:00:00 \(lo\), 02:00:00:00:01:01 \(eth1\)"):  # fmt: skip
        network.update_interface(rtnl, pb.Interface(mac="02:00:00:00:09:09"))
    assert rtnl.requests == []


def test_a_bad_address_changes_nothing() -> None:
    rtnl = nic()
    bad = pb.Interface(mac="02:00:00:00:01:01", addresses=[pb.IPAddress(address="x", prefix_len=8)])
    with pytest.raises(InvalidArgument, match="'x' is not an IP address"):
        network.update_interface(rtnl, bad)
    assert rtnl.requests == []


def test_a_secondary_gone_with_its_primary_is_no_error() -> None:
    rtnl = nic()
    rtnl.fail["delete address"] = errno.EADDRNOTAVAIL
    network.update_interface(rtnl, WANTED)
    rtnl.fail["delete address"] = errno.EPERM
    with pytest.raises(NetlinkError, match="EPERM"):
        network.update_interface(rtnl, WANTED)


def routed() -> FakeRtnl:
    links = [link_msg(1, "lo", "00:00:00:00:00:00", 65536),
             link_msg(2, "eth0", "02:00:00:00:01:01"),
             link_msg(3, "eth1", "02:00:00:00:01:02")]  # fmt: skip
    v4, v6 = nl.AF_INET, nl.AF_INET6
    routes = [
        RouteEntry(family=v4, gateway=ip("10.198.0.1"), oif=2),
        RouteEntry(family=v4, dst=ip("10.198.0.0"), dst_len=24, oif=2, protocol=nl.RTPROT_KERNEL),
        RouteEntry(family=v4, dst=ip("10.198.7.0"), dst_len=24, oif=3),  # not carapace's
        RouteEntry(family=v6, dst=ip("fd00:198::"), dst_len=64, oif=2, protocol=nl.RTPROT_KERNEL),
        RouteEntry(family=v6, gateway=ip("fd00:198::1"), oif=2, priority=1024),
    ]
    return FakeRtnl(links, [], [route_msg(r) for r in routes])


def test_update_routes_replaces_the_routes_of_configured_interfaces() -> None:
    rtnl = routed()
    wanted = [
        pb.Route(gateway="10.198.0.1", device="eth0", family=4),
        pb.Route(dest="10.198.5.0/24", device="eth0", mtu=1400),
        pb.Route(gateway="fd00:198::1", device="eth0"),
    ]
    now = network.update_routes(rtnl, wanted, {2})
    assert rtnl.whats == [
        "delete route default via 10.198.0.1 dev eth0",
        "delete route default via fd00:198::1 dev eth0",  # the kernel's routes stay
        "add route 10.198.5.0/24 dev eth0 mtu 1400",  # link routes first
        "add route default via 10.198.0.1 dev eth0",
        "add route default via fd00:198::1 dev eth0",
    ]
    (kind, _, body), _ = rtnl.requests[1]
    assert kind == nl.RTM_DELROUTE
    assert nl.parse_route(body).priority == 1024
    assert len(now) == 5  # the main table as the (fake) kernel has it


def test_update_routes_of_an_interface_only_the_routes_name() -> None:
    rtnl = routed()
    network.update_routes(rtnl, [pb.Route(dest="10.198.8.0/24", device="eth1")], set())
    assert rtnl.whats == [
        "delete route 10.198.7.0/24 dev eth1",
        "add route 10.198.8.0/24 dev eth1",
    ]


def test_update_routes_checks_every_route_first() -> None:
    rtnl = routed()
    wanted = [pb.Route(gateway="10.198.0.1", device="eth0"), pb.Route(dest="x", device="eth0")]
    with pytest.raises(InvalidArgument, match="route destination 'x'"):
        network.update_routes(rtnl, wanted, {2})
    assert rtnl.requests == []


def test_a_route_deleted_meanwhile_is_no_error() -> None:
    rtnl = routed()
    rtnl.fail["delete route"] = errno.ESRCH
    network.update_routes(rtnl, [], {2})
    assert len(rtnl.whats) == 2


def test_neighbours() -> None:
    rtnl = routed()
    network.add_neighbors(rtnl, [
        pb.ARPNeighbor(address="10.198.0.1", mac="02:00:00:00:00:AA", device="eth0"),
        pb.ARPNeighbor(address="fd00:198::1", mac="02:00:00:00:00:bb", device="eth1"),
    ])  # fmt: skip
    assert rtnl.whats == [
        "add neighbour 10.198.0.1 lladdr 02:00:00:00:00:AA dev eth0",
        "add neighbour fd00:198::1 lladdr 02:00:00:00:00:bb dev eth1",
    ]
    (_, _, body), _ = rtnl.requests[1]
    assert struct.unpack_from("=BxxxiH", body) == (nl.AF_INET6, 3, nl.NUD_PERMANENT)


@pytest.mark.parametrize(
    ("neighbor", "error", "message"),
    [
        (pb.ARPNeighbor(address="10.0.0.1/32", mac="02:00:00:00:00:aa", device="eth0"),
         InvalidArgument, "neighbour address '10.0.0.1/32' is not an IP address"),
        (pb.ARPNeighbor(address="10.0.0.1", mac="02:00", device="eth0"), InvalidArgument,
         "neighbour 10.0.0.1 MAC '02:00' is not a MAC address"),
        (pb.ARPNeighbor(address="10.0.0.1", mac="02:00:00:00:00:aa"), InvalidArgument,
         "neighbour 10.0.0.1: no device"),
        (pb.ARPNeighbor(address="10.0.0.1", mac="02:00:00:00:00:aa", device="eth5"), NotFound,
         "interface 'eth5' not found in the guest; interfaces: eth0, eth1, lo"),
    ],
)  # fmt: skip
def test_bad_neighbours_change_nothing(
    neighbor: pb.ARPNeighbor, error: type[Exception], message: str
) -> None:
    rtnl = routed()
    good = pb.ARPNeighbor(address="10.198.0.1", mac="02:00:00:00:00:aa", device="eth0")
    with pytest.raises(error, match=message):
        network.add_neighbors(rtnl, [good, neighbor])
    assert rtnl.requests == []


def test_the_service_replaces_the_routes_of_the_interfaces_it_configured() -> None:
    rtnl = nic()
    service = network.NetworkService(netlink=lambda: rtnl)
    iface = asyncio.run(service.update_interface(pb.UpdateInterfaceRequest(interface=WANTED)))
    assert iface.mac == "02:00:00:00:01:01"
    assert service.configured == {2}
    rtnl.routes = [route_msg(RouteEntry(family=nl.AF_INET, gateway=ip("10.198.0.1"), oif=2))]
    rtnl.requests.clear()
    asyncio.run(service.update_routes(pb.UpdateRoutesRequest()))
    assert rtnl.whats == ["delete route default via 10.198.0.1 dev eth1"]
    listed = asyncio.run(service.list_interfaces(pb.ListInterfacesRequest()))
    assert [i.name for i in listed.interfaces] == ["lo", "eth1"]
    routes = asyncio.run(service.list_routes(pb.ListRoutesRequest()))
    assert routes.routes[0].gateway == "10.198.0.1"
    asyncio.run(service.add_arp_neighbors(pb.AddARPNeighborsRequest()))
