"""The pod's network plan (carapace.sandbox.netplan): modes, port forwards, the
sandbox spec's network namespace."""

from __future__ import annotations

import re

import pytest

from carapace.errors import InvalidArgument
from carapace.hypervisor import PortForward
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.sandbox.netplan import NetworkPlan, parse_port_forward, plan_network, port_forwards


def spec_in(netns: str) -> Spec:
    data = default_spec(["true"])
    for ns in data["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = netns
    return Spec.from_dict(data)


@pytest.mark.parametrize(
    ("text", "fwd"),
    [
        ("8080:80", PortForward(8080, 80, "tcp", "127.0.0.1")),
        ("0.0.0.0:8080:80/udp", PortForward(8080, 80, "udp", "0.0.0.0")),
        ("[::1]:18080:80/tcp", PortForward(18080, 80, "tcp", "::1")),
    ],
)
def test_port_forwards(text: str, fwd: PortForward) -> None:
    assert parse_port_forward(text) == fwd


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("80", "accepted: [IP:]HOSTPORT:GUESTPORT"),
        ("70000:80", "out of range"),
        ("1:0", "out of range"),
        ("8080:80/sctp", "protocol 'sctp'"),
        ("300.1.1.1:8080:80", "not an IP address"),
    ],
)
def test_bad_port_forwards_are_refused(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(why)) as e:
        parse_port_forward(text)
    assert repr(text) in str(e.value)


def test_modes() -> None:
    assert plan_network(None, (), None) == NetworkPlan("none")
    assert plan_network("user", port_forwards({8080: 80}), None) == NetworkPlan(
        "user", "", (PortForward(8080, 80),)
    )
    assert plan_network("netns:/var/run/netns/a", (), None) == NetworkPlan(
        "netns", "/var/run/netns/a"
    )
    assert plan_network(None, (), spec_in("/var/run/netns/cni-1")) == NetworkPlan(
        "netns", "/var/run/netns/cni-1"
    )
    assert plan_network(None, (), Spec.from_dict(default_spec(["true"]))).mode == "none"


def test_what_does_not_fit_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="accepted: none, user, netns:PATH"):
        plan_network("bridge", (), None)
    with pytest.raises(InvalidArgument, match="accepted: none, user, netns:PATH"):
        plan_network("netns:relative", (), None)
    with pytest.raises(InvalidArgument, match="need --net user"):
        plan_network(None, port_forwards(["8080:80"]), None)
    with pytest.raises(InvalidArgument, match="already names the network namespace"):
        plan_network("user", (), spec_in("/var/run/netns/cni-1"))
    assert plan_network("netns:/var/run/netns/cni-1", (), spec_in("/var/run/netns/cni-1")).netns
