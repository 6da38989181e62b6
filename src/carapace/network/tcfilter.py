"""Kata's tcfilter model: each interface CNI made in the pod's network namespace (a
veth) is joined to a tap carapace makes beside it, and QEMU gets the tap's fd.

For each interface, in the namespace: a tap ``tapN_carapace`` (``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``, the veth's MTU, up), an ingress qdisc (``ffff:``) on the veth and on
the tap, and on each a match-all u32 filter (protocol all) whose action is ``mirred
egress redirect`` to the other: what the guest sends leaves by the veth, what reaches
the veth goes to the guest. The veth keeps its address and MAC; the guest's NIC gets
that MAC.

Recorded before made: ``plan_taps`` names the taps from the discovered config (pure);
the caller writes the plan (``TapLink.to_record``) to ``state.json``, then ``attach``
makes it (and undoes what it made if it fails half-way); ``teardown`` removes what a
record lists, on any path and as often as needed.

The tap's fd is opened O_CLOEXEC: pass it to QEMU with ``pass_fds`` (subprocess makes
the fds it passes inheritable in the child) and close the caller's copy once QEMU has
its own. The tap is not persistent: it goes away when the last fd on it is closed
(QEMU's and the caller's), with its qdisc and filters; the veth's ingress qdisc stays
until ``teardown``.

``attach`` and ``teardown`` block (netlink on a thread of their own): from a
coroutine, call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from carapace.errors import AlreadyExists, HostError, InvalidArgument, NotFound
from carapace.network.discover import attr
from carapace.network.model import MAX_TAPS, NetworkConfig, normal_mac, tap_index, tap_name
from carapace.network.netns import NotNetworkNamespace, run_in_netns

log = logging.getLogger("carapace.network")

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
#: The ingress qdisc's handle (ffff:), the parent of its filters.
INGRESS = 0xFFFF0000
ETH_P_ALL = 0x0003
#: The filters' priority and class id (Kata's: 1 and 1:1).
FILTER_PRIO = 1
FILTER_CLASSID = 0x10001
#: How often a tc request that fails with EBUSY is tried (Kata retries too).
EBUSY_TRIES = 5
EBUSY_WAIT = 0.05


@dataclass(frozen=True)
class TapLink:
    """One interface of the pod: carapace's tap and the veth it is joined to."""

    tap: str
    veth: str
    mac: str  # the veth's MAC: the guest NIC's
    mtu: int

    def to_record(self) -> dict[str, Any]:
        return {"tap": self.tap, "veth": self.veth, "mac": self.mac, "mtu": self.mtu}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> TapLink:
        return cls(str(rec["tap"]), str(rec["veth"]), str(rec["mac"]), int(rec["mtu"]))


@dataclass(frozen=True)
class AttachedTap:
    """A tap made and joined to its veth; ``fd`` is open (O_CLOEXEC) on the tap."""

    tap: str
    fd: int
    veth: str
    mac: str
    mtu: int


def plan_taps(config: NetworkConfig, taken: Iterable[str] = ()) -> tuple[TapLink, ...]:
    """A tap for each interface of ``config``, in its order, numbered from the lowest
    index that no name in ``taken`` (taps already made, e.g. before a hot-add) has."""
    used = {i for i in (tap_index(n) for n in taken) if i is not None}
    free = (i for i in range(MAX_TAPS) if i not in used)
    return tuple(
        TapLink(tap_name(next(free)), iface.name, normal_mac(iface.mac), iface.mtu)
        for iface in config.interfaces
    )


def open_tap(name: str) -> int:
    """Make the tap ``name`` in the calling thread's network namespace; its fd (O_CLOEXEC)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), TAP_FLAGS))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mirred_targets(msg: Mapping[str, Any]) -> list[int] | None:
    """The ifindexes the actions of a u32 filter entry redirect to; [] for an entry
    that classifies nothing (a hash table's), None for one that is not carapace's."""
    if attr(msg, "TCA_KIND") != "u32":
        return None
    options = attr(msg, "TCA_OPTIONS")
    if not options or attr(options, "TCA_U32_SEL") is None:
        return []
    actions = attr(options, "TCA_U32_ACT")
    targets: list[int] = []
    for _, action in (actions or {}).get("attrs", ()):
        if attr(action, "TCA_ACT_KIND") != "mirred":
            return None
        parms = attr(attr(action, "TCA_ACT_OPTIONS") or {}, "TCA_MIRRED_PARMS") or {}
        targets.append(int(parms.get("ifindex", 0)))
    return targets or None


def filters_are_carapace(filters: Iterable[Mapping[str, Any]], links: Mapping[int, str]) -> bool:
    """Whether the filters of an ingress qdisc are those ``attach`` adds: at least one
    u32 match redirecting to a carapace tap or to a device that is gone, and nothing
    else (``links``: ifindex → name of the namespace's links). An ingress qdisc without
    such a filter is not known to be carapace's."""
    redirects = 0
    for msg in filters:
        targets = _mirred_targets(msg)
        if targets is None:
            return False
        for ifindex in targets:
            name = links.get(ifindex)
            if name is not None and tap_index(name) is None:
                return False
            redirects += 1
    return redirects > 0


def _retry_busy(call: Callable[[], object]) -> None:
    from pyroute2 import NetlinkError

    for attempt in range(EBUSY_TRIES):
        try:
            call()
            return
        except NetlinkError as e:
            if e.code != errno.EBUSY or attempt == EBUSY_TRIES - 1:
                raise
            time.sleep(EBUSY_WAIT * (attempt + 1))


@contextmanager
def _step(netns_path: str, what: str) -> Iterator[None]:
    """A failed netlink or tun request as a HostError naming the namespace and step."""
    from pyroute2 import NetlinkError

    try:
        yield
    except NetlinkError as e:
        raise HostError(f"network namespace {netns_path}: {what}: {os.strerror(e.code)}") from e
    except OSError as e:
        raise HostError(f"network namespace {netns_path}: {what}: {e.strerror or e}") from e


def _links(ipr: Any) -> dict[str, int]:
    return {str(attr(msg, "IFLA_IFNAME")): int(msg["index"]) for msg in ipr.get_links()}


def _ingress_kinds(ipr: Any) -> dict[int, str]:
    """ifindex → the kind of the link's qdisc at ffff: (ingress or clsact)."""
    return {
        int(msg["index"]): str(attr(msg, "TCA_KIND"))
        for msg in ipr.get_qdiscs()
        if msg["handle"] == INGRESS
    }


def _redirect(ipr: Any, src: int, dst: int) -> None:
    _retry_busy(
        partial(
            ipr.tc,
            "add-filter",
            "u32",
            src,
            parent=INGRESS,
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
            target=FILTER_CLASSID,
            keys=["0x0/0x0+0"],
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst},
        )
    )


def _attach_here(netns_path: str, plan: Sequence[TapLink]) -> tuple[AttachedTap, ...]:
    from pyroute2 import IPRoute

    undo: list[tuple[str, Callable[[], object]]] = []
    made: list[AttachedTap] = []
    with IPRoute() as ipr:
        try:
            links, ingress = _links(ipr), _ingress_kinds(ipr)
            for names in ([t.tap for t in plan], [t.veth for t in plan]):
                if len(set(names)) != len(names):
                    raise InvalidArgument(f"a tap plan names one link twice: {names}")
            for link in plan:  # everything is checked before anything is made
                if tap_index(link.tap) is None:
                    raise InvalidArgument(f"{link.tap!r} is not a carapace tap's name")
                if link.veth not in links:
                    raise NotFound(f"network namespace {netns_path}: no interface {link.veth}")
                if link.tap in links:
                    raise AlreadyExists(f"network namespace {netns_path}: {link.tap} exists")
                kind = ingress.get(links[link.veth])
                if kind is not None:
                    raise AlreadyExists(
                        f"network namespace {netns_path}: {link.veth} has an ingress qdisc "
                        f"({kind}) already; carapace redirects its traffic with one of its own"
                    )
            for link in plan:
                veth = links[link.veth]
                with _step(netns_path, f"make the tap {link.tap}"):
                    fd = open_tap(link.tap)
                undo.append((f"close {link.tap}", partial(os.close, fd)))
                tap = _links(ipr)[link.tap]
                undo.append((f"delete {link.tap}", partial(ipr.link, "del", index=tap)))
                with _step(netns_path, f"set {link.tap} up with MTU {link.mtu}"):
                    ipr.link("set", index=tap, mtu=link.mtu, state="up")
                with _step(netns_path, f"add an ingress qdisc to {link.veth}"):
                    _retry_busy(partial(ipr.tc, "add", "ingress", veth, INGRESS))
                undo.append(
                    (
                        f"delete {link.veth}'s ingress qdisc",
                        partial(ipr.tc, "del", "ingress", veth, INGRESS),
                    )
                )
                with _step(netns_path, f"add an ingress qdisc to {link.tap}"):
                    _retry_busy(partial(ipr.tc, "add", "ingress", tap, INGRESS))
                with _step(netns_path, f"redirect {link.veth} to {link.tap}"):
                    _redirect(ipr, veth, tap)
                with _step(netns_path, f"redirect {link.tap} to {link.veth}"):
                    _redirect(ipr, tap, veth)
                made.append(AttachedTap(link.tap, fd, link.veth, link.mac, link.mtu))
        except BaseException:
            for what, action in reversed(undo):
                try:
                    action()
                except Exception as e:
                    log.warning("network namespace %s: undo: %s: %s", netns_path, what, e)
            raise
    return tuple(made)


def attach(netns_path: str, plan: Sequence[TapLink]) -> tuple[AttachedTap, ...]:
    """Make the taps of ``plan`` in the network namespace at ``netns_path`` and join
    each to its veth; nothing is left made if it fails. Raises NotFound for a missing
    namespace or veth, AlreadyExists for a tap name in use or a veth that has an ingress
    qdisc already, InvalidArgument for a bad plan or namespace (the host's own),
    HostError for a failed netlink or tun request."""
    if not plan:
        return ()
    return run_in_netns(netns_path, lambda: _attach_here(netns_path, plan))


def _teardown_here(netns_path: str, taps: Sequence[str], veths: Sequence[str]) -> list[str]:
    from pyroute2 import IPRoute, NetlinkError

    gone = (errno.ENODEV, errno.ENOENT, errno.EINVAL)
    problems: list[str] = []
    with IPRoute() as ipr:
        links = _links(ipr)
        for name in taps:
            if tap_index(name) is None or name not in links:  # only carapace's taps
                continue
            try:
                ipr.link("del", index=links[name])
            except NetlinkError as e:
                if e.code not in gone:
                    problems.append(f"delete {name}: {os.strerror(e.code)}")
        by_index = {i: n for n, i in _links(ipr).items()}
        ingress = _ingress_kinds(ipr)
        for name in veths:
            index = links.get(name)
            if index is None or ingress.get(index) != "ingress":
                continue
            if not filters_are_carapace(ipr.get_filters(index, parent=INGRESS), by_index):
                log.warning(
                    "network namespace %s: %s's ingress qdisc is not carapace's (its "
                    "filters are not only carapace's redirects); left in place",
                    netns_path,
                    name,
                )
                continue
            try:
                ipr.tc("del", "ingress", index, INGRESS)
            except NetlinkError as e:
                if e.code not in gone:
                    problems.append(f"delete {name}'s ingress qdisc: {os.strerror(e.code)}")
    return problems


def teardown(netns_path: str, taps: Iterable[str], veths: Iterable[str]) -> None:
    """Delete the taps (their qdiscs and filters go with them) and the ingress qdisc
    ``attach`` added to each veth. Idempotent: what is missing, the namespace too, is
    not an error. Never deletes a link other than a carapace tap, nor the namespace; a
    veth's ingress qdisc is deleted only if its filters are carapace's redirects
    (``filters_are_carapace``): one that was there before is left in place."""
    tap_names, veth_names = list(taps), list(veths)
    try:
        problems = run_in_netns(
            netns_path, lambda: _teardown_here(netns_path, tap_names, veth_names)
        )
    except (NotFound, NotNetworkNamespace):  # the namespace is gone: so is all in it
        return
    if problems:
        raise HostError(f"network namespace {netns_path}: " + "; ".join(problems))


def traces_here(label: str = "") -> set[str]:
    """What carapace may have left in the calling thread's network namespace: its taps,
    and the links whose ingress qdisc holds only carapace's redirects (each named
    ``label`` + link name). For leak checks; ``traces`` does it in another namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = {i: n for n, i in _links(ipr).items()}
        found = {f"{label}{n}" for n in links.values() if tap_index(n) is not None}
        for index, kind in _ingress_kinds(ipr).items():
            if kind != "ingress" or index not in links:
                continue
            filters = list(ipr.get_filters(index, parent=INGRESS))
            if filters_are_carapace(filters, links):
                found.add(f"{label}{links[index]} ingress redirect")
    return found


def traces(netns_path: str) -> set[str]:
    """``traces_here`` in the network namespace at ``netns_path``, labelled with it."""
    return run_in_netns(netns_path, lambda: traces_here(f"{netns_path}: "))
