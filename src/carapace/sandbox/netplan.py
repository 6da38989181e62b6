"""How a pod reaches the network, decided once (pure): its mode, the namespace to take
its interfaces from, and port forwards.

* ``none``: loopback only (the default for ``carapace run`` and the Python API).
* ``user``: the hypervisor's user-mode network (NAT, no host device); ``-p`` forwards
  host ports into the guest, bound to 127.0.0.1 unless an address is given.
* ``netns:PATH``: the interfaces CNI (or the caller) made in an existing network
  namespace reach the guest through taps and tc mirred (``carapace.network``). A pod
  whose sandbox spec names a network namespace (CRI's pod netns) gets this mode.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from carapace.errors import InvalidArgument
from carapace.hypervisor import PortForward
from carapace.oci.bundle import Spec

MODES = ("none", "user", "netns:PATH")
_PORT_RE = re.compile(
    r"(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(?P<host>[0-9]{1,5}):(?P<guest>[0-9]{1,5})"
    r"(?:/(?P<proto>[a-z]+))?"
)


@dataclass(frozen=True)
class NetworkPlan:
    mode: str = "none"  # "none", "user" or "netns"
    netns: str = ""  # the network namespace's path (mode netns)
    forwards: tuple[PortForward, ...] = ()


def _port(value: str, what: str, text: str) -> int:
    n = int(value)
    if not 1 <= n <= 65535:
        raise InvalidArgument(f"{what} {text!r}: port {n} is out of range; accepted: 1 to 65535")
    return n


def parse_port_forward(text: str) -> PortForward:
    """``[IP:]HOSTPORT:GUESTPORT[/tcp|udp]`` (docker's -p); the host side is bound to
    127.0.0.1 unless an IP is given."""
    m = _PORT_RE.fullmatch(text.strip())
    if m is None:
        raise InvalidArgument(
            f"-p {text!r} is not a port forward; accepted: [IP:]HOSTPORT:GUESTPORT[/tcp|udp], "
            "e.g. 8080:80 or 127.0.0.1:8080:80/tcp"
        )
    proto = m["proto"] or "tcp"
    if proto not in ("tcp", "udp"):
        raise InvalidArgument(f"-p {text!r}: protocol {proto!r}; accepted: tcp, udp")
    host_ip = (m["ip"] or "127.0.0.1").strip("[]")
    try:
        ipaddress.ip_address(host_ip)
    except ValueError:
        raise InvalidArgument(f"-p {text!r}: {host_ip!r} is not an IP address") from None
    return PortForward(
        host_port=_port(m["host"], "-p", text),
        guest_port=_port(m["guest"], "-p", text),
        protocol=proto,
        host_ip=host_ip,
    )


def port_forwards(ports: Mapping[int, int] | Iterable[str]) -> tuple[PortForward, ...]:
    """Forwards from ``{host_port: guest_port}`` (the Python API) or ``-p`` texts."""
    if isinstance(ports, Mapping):
        return tuple(parse_port_forward(f"{h}:{g}") for h, g in ports.items())
    return tuple(parse_port_forward(p) for p in ports)


def spec_netns(spec: Spec | None) -> str:
    """The network namespace the sandbox spec names (CRI's pod netns), or ''."""
    if spec is None:
        return ""
    return next((ns.path for ns in spec.namespaces if ns.type == "network" and ns.path), "")


def plan_network(
    net: str | None, forwards: tuple[PortForward, ...], spec: Spec | None
) -> NetworkPlan:
    """The pod's network from ``--net`` (or the API's ``net``), its port forwards and
    the sandbox spec; refuses what does not fit together."""
    from_spec = spec_netns(spec)
    if net is None:
        mode, path = ("netns", from_spec) if from_spec else ("none", "")
    elif net in ("none", "user"):
        mode, path = net, ""
    elif net.startswith("netns:") and net[len("netns:") :].startswith("/"):
        mode, path = "netns", net[len("netns:") :]
    else:
        raise InvalidArgument(
            f"--net {net!r}; accepted: {', '.join(MODES)} (PATH absolute, e.g. /var/run/netns/NAME)"
        )
    if from_spec and net is not None and (mode, path) != ("netns", from_spec):
        raise InvalidArgument(
            f"--net {net!r}: the sandbox spec already names the network namespace "
            f"{from_spec}; accepted: no --net, or --net netns:{from_spec}"
        )
    if forwards and mode != "user":
        raise InvalidArgument(
            f"port forwards ({', '.join(f'{f.host_port}:{f.guest_port}' for f in forwards)}) "
            f"need --net user; the pod's network is {mode}"
        )
    return NetworkPlan(mode, path, forwards)
