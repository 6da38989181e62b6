"""carapace.network.tcfilter's pure parts: tap names planned before anything is made,
and which ingress filters are carapace's (recorded pyroute2 0.9 filter dumps)."""

from __future__ import annotations

import json
from typing import Any

from carapace.network.model import Interface, IPAddress, NetworkConfig
from carapace.network.tcfilter import TapLink, filters_are_carapace, plan_taps

ETH0 = Interface("eth0", "0A:58:0A:F4:00:05", 1400, (IPAddress(4, "10.199.0.2", 24),))
NET1 = Interface("net1", "02:00:0a:c7:01:02", 9000, (IPAddress(4, "10.199.1.2", 24),))


def test_plan_names_a_tap_per_interface_in_order() -> None:
    assert plan_taps(NetworkConfig(interfaces=(ETH0, NET1))) == (
        TapLink("tap0_carapace", "eth0", "0a:58:0a:f4:00:05", 1400),
        TapLink("tap1_carapace", "net1", "02:00:0a:c7:01:02", 9000),
    )
    assert plan_taps(NetworkConfig()) == ()


def test_plan_skips_taps_already_made() -> None:
    plan = plan_taps(NetworkConfig(interfaces=(NET1,)), taken=["tap0_carapace", "eth0"])
    assert [t.tap for t in plan] == ["tap1_carapace"]
    plan = plan_taps(
        NetworkConfig(interfaces=(ETH0, NET1)), taken=["tap0_carapace", "tap2_carapace"]
    )
    assert [t.tap for t in plan] == ["tap1_carapace", "tap3_carapace"]


def test_plan_is_recordable() -> None:
    plan = plan_taps(NetworkConfig(interfaces=(ETH0, NET1)))
    rec = json.loads(json.dumps([t.to_record() for t in plan]))
    assert tuple(TapLink.from_record(r) for r in rec) == plan


def header(handle: int, divisor: bool = True) -> dict[str, Any]:
    attrs: list[list[Any]] = [["TCA_KIND", "u32"]]
    if divisor:
        attrs.append(["TCA_OPTIONS", {"attrs": [["TCA_U32_DIVISOR", 1]]}])
    return {"index": 2, "handle": handle, "parent": 0xFFFF0000, "info": 66304, "attrs": attrs}


def u32(*actions: tuple[str, int]) -> dict[str, Any]:
    """A u32 filter entry as dumped, with the given (kind, ifindex) actions."""
    acts = [
        [
            f"TCA_ACT_PRIO_{n}",
            {
                "attrs": [
                    ["TCA_ACT_KIND", kind],
                    [
                        "TCA_ACT_OPTIONS",
                        {
                            "attrs": [
                                [
                                    "TCA_MIRRED_PARMS",
                                    {"index": 1, "action": 4, "eaction": 1, "ifindex": ifindex},
                                ],
                                ["TCA_MIRRED_TM", None],
                            ]
                        },
                    ],
                ]
            },
        ]
        for n, (kind, ifindex) in enumerate(actions, 1)
    ]
    sel = {"flags": 1, "nkeys": 1, "keys": [{"key_mask": 0, "key_val": 0, "key_off": 0}]}
    return {
        "index": 2,
        "handle": 0x80000800,
        "parent": 0xFFFF0000,
        "info": 66304,
        "attrs": [
            ["TCA_KIND", "u32"],
            [
                "TCA_OPTIONS",
                {
                    "attrs": [
                        ["TCA_U32_SEL", sel],
                        ["TCA_U32_HASH", 0x80000000],
                        ["TCA_U32_CLASSID", 0x10001],
                        ["TCA_U32_ACT", {"attrs": acts}],
                    ]
                },
            ],
        ],
    }


LINKS = {1: "lo", 2: "eth0", 3: "tap0_carapace", 4: "other0"}


def test_carapace_redirects_are_recognised() -> None:
    ours = [header(0, divisor=False), header(0x80000000), u32(("mirred", 3))]
    assert filters_are_carapace(ours, LINKS)
    # once the tap is gone, the action redirects to no device (ifindex 0) or a stale one
    assert filters_are_carapace([*ours[:2], u32(("mirred", 0))], LINKS)
    assert filters_are_carapace([u32(("mirred", 9))], LINKS)


def test_other_filters_are_not_carapace() -> None:
    assert not filters_are_carapace([], LINKS)  # an ingress qdisc of someone else's
    assert not filters_are_carapace([header(0x80000000)], LINKS)
    assert not filters_are_carapace([u32(("mirred", 4))], LINKS)  # to someone else's device
    assert not filters_are_carapace([u32(("mirred", 3), ("gact", 0))], LINKS)
    assert not filters_are_carapace([u32(("mirred", 3)), u32(("police", 0))], LINKS)
    bpf = {"index": 2, "attrs": [["TCA_KIND", "bpf"], ["TCA_OPTIONS", {"attrs": []}]]}
    assert not filters_are_carapace([bpf], LINKS)
    classify_only = u32()
    classify_only["attrs"][1][1]["attrs"].pop()  # a u32 match without an action
    assert not filters_are_carapace([classify_only], LINKS)
