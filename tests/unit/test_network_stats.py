"""carapace.network.stats: the taps' host-side counters as the guest sees them."""

from __future__ import annotations

from carapace.network.stats import InterfaceStats, guest_view, parse_stats
from carapace.network.tcfilter import TapLink


def test_rx_and_tx_swap() -> None:
    host = {"rx_bytes": 10, "rx_packets": 1, "tx_bytes": 2000, "tx_packets": 20, "tx_dropped": 3}
    assert guest_view("eth0", host) == InterfaceStats(
        name="eth0", rx_bytes=2000, rx_packets=20, rx_dropped=3, tx_bytes=10, tx_packets=1
    )


def test_parse_stats_names_interfaces_as_the_guest_does() -> None:
    links = [
        {"index": 2, "attrs": [["IFLA_IFNAME", "eth0"], ["IFLA_STATS64", {"rx_bytes": 5}]]},
        {
            "index": 3,
            "attrs": [
                ["IFLA_IFNAME", "tap0_carapace"],
                ["IFLA_STATS64", {"rx_bytes": 7, "rx_packets": 1, "tx_bytes": 9, "tx_packets": 2}],
            ],
        },
    ]
    taps = [
        TapLink("tap0_carapace", "eth0", "02:00:00:00:00:05", 1500),
        TapLink("tap1_carapace", "net1", "02:00:00:00:00:06", 1500),  # gone: left out
    ]
    assert parse_stats(links, taps) == (
        InterfaceStats("eth0", rx_bytes=9, rx_packets=2, tx_bytes=7, tx_packets=1),
    )
