"""The pod's network traffic, counted on carapace's taps in the pod's network namespace.

Every counter is reported from the guest's point of view: what the host's tap sends
(its tx) is what the guest's NIC receives (rx), and what the tap receives is what the
guest sent. So ``rx_bytes`` is what the pod received, as ``ip -s link`` in the guest
(and containerd's network metrics) would show it. Each interface is named as the guest
names it (its veth's name in the namespace).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from carapace.network.discover import attr
from carapace.network.netns import run_in_netns
from carapace.network.tcfilter import TapLink


@dataclass(frozen=True)
class InterfaceStats:
    """One guest interface's counters, from the guest's point of view."""

    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


def guest_view(name: str, host: Mapping[str, Any]) -> InterfaceStats:
    """The guest's counters of interface ``name`` from its tap's host-side counters
    (IFLA_STATS64's fields: rx_bytes, tx_packets, ...): rx and tx swap."""

    def n(key: str) -> int:
        return int(host.get(key, 0) or 0)

    return InterfaceStats(
        name=name,
        rx_bytes=n("tx_bytes"),
        rx_packets=n("tx_packets"),
        rx_errors=n("tx_errors"),
        rx_dropped=n("tx_dropped"),
        tx_bytes=n("rx_bytes"),
        tx_packets=n("rx_packets"),
        tx_errors=n("rx_errors"),
        tx_dropped=n("rx_dropped"),
    )


def parse_stats(
    links: Sequence[Mapping[str, Any]], taps: Sequence[TapLink]
) -> tuple[InterfaceStats, ...]:
    """The guest's counters of each of ``taps`` found in a dump of links (a tap that
    is gone is left out), in ``taps``' order."""
    counters = {
        str(attr(msg, "IFLA_IFNAME")): attr(msg, "IFLA_STATS64") or attr(msg, "IFLA_STATS") or {}
        for msg in links
    }
    return tuple(guest_view(t.veth, counters[t.tap]) for t in taps if t.tap in counters)


def _dump_links() -> list[Any]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return list(ipr.get_links())


def read_stats(netns_path: str, taps: Sequence[TapLink]) -> tuple[InterfaceStats, ...]:
    """The guest's counters of each tap of ``taps`` in the network namespace at
    ``netns_path`` (blocking: from a coroutine, call it through ``asyncio.to_thread``)."""
    if not taps:
        return ()
    return parse_stats(run_in_netns(netns_path, _dump_links), taps)


def record_network_stats(network: Mapping[str, Any]) -> tuple[InterfaceStats, ...]:
    """The traffic of the taps a sandbox's record lists (``SandboxRecord.network``);
    nothing for a pod without any (loopback or user-mode networking)."""
    taps = network.get("taps") or []
    if not taps:
        return ()
    return read_stats(str(network["netns"]), [TapLink.from_record(t) for t in taps])
