"""The pod's network on the sandbox's side: what NICs the VM boots with, how the guest
is told to configure them, and hot-adding or removing one while the pod runs.

The host work (taps and tc mirred in the pod's network namespace, reading what CNI
made there) is ``carapace.network``'s; this module sequences it in the sandbox's life:
every tap is recorded in ``state.json`` before it is made, and ``state.release``
removes what the record lists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass, field

from carapace.agent.client import AgentClient
from carapace.errors import HypervisorError, InvalidArgument, NotFound
from carapace.hypervisor import (
    USER_NET_GATEWAY,
    USER_NET_GUEST_IP,
    USER_NET_PREFIX,
    VM,
    Nic,
    TapNic,
    UserNic,
)
from carapace.network.discover import discover
from carapace.network.model import NetworkConfig
from carapace.network.stats import InterfaceStats, record_network_stats
from carapace.network.tcfilter import AttachedTap, attach, plan_taps, teardown
from carapace.protocols import agent_pb2 as pb
from carapace.sandbox.netplan import NetworkPlan
from carapace.sandbox.state import SandboxRecord

log = logging.getLogger("carapace.sandbox")

#: The guest's interface on the user-mode network.
USER_NET_IFNAME = "eth0"
USER_NET_MTU = 1500


def local_mac() -> str:
    """A random locally administered unicast MAC (02:xx:...)."""
    return ":".join(["02", *(f"{b:02x}" for b in secrets.token_bytes(5))])


def vhost_net_usable(dev: str = "/dev/vhost-net") -> bool:
    """Whether QEMU could use the in-kernel virtio-net backend (it opens this)."""
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


#: How long a hot-added NIC may take to appear in the guest (PCIe hotplug, driver).
NIC_APPEAR_TIMEOUT = 30.0


async def wait_for_nic(agent: AgentClient, mac: str, timeout: float) -> None:
    """Wait until the guest has a NIC with ``mac`` (a hot-added device shows up once the
    guest's PCIe hotplug and virtio-net driver took it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        macs = {i.mac.lower() for i in await agent.list_interfaces()}
        if mac.lower() in macs:
            return
        if loop.time() >= deadline:
            raise HypervisorError(
                f"the hot-added NIC {mac} did not appear in the guest within {timeout:g}s; "
                f"it has: {', '.join(sorted(macs)) or 'none'}"
            )
        await asyncio.sleep(0.2)


@dataclass
class GuestNetwork:
    """What the guest is told: its interfaces, routes and static neighbours."""

    interfaces: list[pb.Interface] = field(default_factory=list)
    routes: list[pb.Route] = field(default_factory=list)
    neighbors: list[pb.ARPNeighbor] = field(default_factory=list)


def user_network(mac: str) -> GuestNetwork:
    """The guest's side of user-mode networking (QEMU's slirp addresses)."""
    iface = pb.Interface(
        name=USER_NET_IFNAME,
        mac=mac,
        mtu=USER_NET_MTU,
        addresses=[pb.IPAddress(family=4, address=USER_NET_GUEST_IP, prefix_len=USER_NET_PREFIX)],
    )
    route = pb.Route(dest="", gateway=USER_NET_GATEWAY, device=USER_NET_IFNAME, family=4)
    return GuestNetwork([iface], [route], [])


class PodNetwork:
    """The NICs of one pod VM and their configuration in the guest."""

    def __init__(self, plan: NetworkPlan, record: SandboxRecord, sandbox_id: str) -> None:
        self.plan = plan
        self.record = record
        self.sandbox_id = sandbox_id
        self.guest = GuestNetwork()
        self._fds: list[int] = []

    async def prepare(self) -> tuple[Nic, ...]:
        """The NICs the VM boots with (made on the host where they need a device)."""
        if self.plan.mode == "user":
            mac = local_mac()
            self.guest = user_network(mac)
            return (UserNic("net0", mac, self.plan.forwards),)
        if self.plan.mode == "netns":
            return await self._attach_netns()
        return ()

    async def _attach_netns(self) -> tuple[Nic, ...]:
        """A tap joined to each interface CNI made in the pod's namespace; the taps
        are recorded before they are made."""
        config = await asyncio.to_thread(discover, self.plan.netns)
        attached = await self._attach(config, ())
        self.guest = GuestNetwork(
            [i.to_pb() for i in config.interfaces],
            [r.to_pb() for r in config.routes],
            [n.to_pb() for n in config.neighbors],
        )
        vhost = vhost_net_usable()
        nics = []
        for i, a in enumerate(attached):
            nics.append(TapNic(f"net{i}", a.mac, a.fd, vhost))
            self._nic_ids[a.veth] = f"net{i}"
        self.record.save()
        return tuple(nics)

    async def _attach(
        self, config: NetworkConfig, taken: tuple[str, ...]
    ) -> tuple[AttachedTap, ...]:
        plan = plan_taps(config, taken)
        net = self.record.network
        net["netns"] = self.plan.netns or net.get("netns", "")
        net.setdefault("taps", []).extend(t.to_record() for t in plan)
        self.record.save()
        attached = await asyncio.to_thread(attach, net["netns"], plan)
        self._fds += [a.fd for a in attached]
        return attached

    def close_fds(self) -> None:
        """Close carapace's copies of the taps' fds: the VM holds its own once it
        started (and a tap no fd holds is gone)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    async def configure(self, agent: AgentClient) -> None:
        """Tell the guest its interfaces, then its routes, then its neighbours."""
        for iface in self.guest.interfaces:
            await agent.update_interface(iface)
        if self.guest.routes:
            await agent.update_routes(self.guest.routes)
        if self.guest.neighbors:
            await agent.add_arp_neighbors(self.guest.neighbors)
        if self.guest.interfaces:
            log.info(
                "sandbox %s: network %s: %s",
                self.sandbox_id,
                self.plan.mode,
                ", ".join(
                    f"{i.name} {' '.join(f'{a.address}/{a.prefix_len}' for a in i.addresses)}"
                    for i in self.guest.interfaces
                ),
            )

    # -- interfaces added after start ------------------------------------------------

    async def add_interface(
        self, vm: VM, agent: AgentClient, netns: str, name: str
    ) -> pb.Interface:
        """Take the interface ``name`` of the network namespace ``netns`` (made after
        the pod started, as podman and docker do) into the running VM."""
        if name in self._nic_ids:
            raise InvalidArgument(f"sandbox {self.sandbox_id}: it has an interface {name} already")
        current = self.record.network.get("netns")
        if current and current != netns:
            raise InvalidArgument(
                f"sandbox {self.sandbox_id}: interface {name} of {netns}: the pod's interfaces "
                f"come from {current}; accepted: interfaces of that namespace"
            )
        config = (await asyncio.to_thread(discover, netns)).select([name])
        self.record.network["netns"] = netns
        taken = tuple(t["tap"] for t in self.record.network.get("taps", []))
        (tap,) = await self._attach(config, taken)
        nic_id = f"net{len(self._nic_ids)}"
        while nic_id in self._nic_ids.values():
            nic_id += "x"
        try:
            await vm.add_nic(TapNic(nic_id, tap.mac, tap.fd, vhost_net_usable()))
        except BaseException:
            await asyncio.to_thread(self._forget_tap, netns, tap.tap, tap.veth)
            raise
        finally:
            self.close_fds()
        self._nic_ids[name] = nic_id
        self.record.save()
        await wait_for_nic(agent, tap.mac, NIC_APPEAR_TIMEOUT)
        iface = await agent.update_interface(config.interfaces[0].to_pb())
        self.guest.interfaces.append(config.interfaces[0].to_pb())
        if config.routes:
            self.guest.routes += [r.to_pb() for r in config.routes]
            await agent.update_routes(self.guest.routes)
        if config.neighbors:
            await agent.add_arp_neighbors([n.to_pb() for n in config.neighbors])
        return iface

    async def remove_interface(self, vm: VM, agent: AgentClient, name: str) -> None:
        """Take the interface ``name`` out of the running VM and release its tap."""
        nic_id = self._nic_ids.get(name)
        if nic_id is None:
            raise NotFound(f"sandbox {self.sandbox_id}: no interface {name}")
        self.guest.routes = [r for r in self.guest.routes if r.device != name]
        self.guest.interfaces = [i for i in self.guest.interfaces if i.name != name]
        await agent.update_routes(self.guest.routes)
        await vm.remove_nic(nic_id)
        del self._nic_ids[name]
        tap = next(t["tap"] for t in self.record.network["taps"] if t["veth"] == name)
        await asyncio.to_thread(self._forget_tap, self.record.network["netns"], tap, name)

    def _forget_tap(self, netns: str, tap: str, veth: str) -> None:
        teardown(netns, [tap], [veth])
        self.record.network["taps"] = [t for t in self.record.network["taps"] if t["tap"] != tap]
        self.record.save()

    def stats(self) -> tuple[InterfaceStats, ...]:
        """Each guest interface's traffic, counted on its tap (blocking)."""
        return record_network_stats(self.record.network)

    @property
    def _nic_ids(self) -> dict[str, str]:
        """guest interface name -> the VM's NIC id (kept in the record)."""
        ids: dict[str, str] = self.record.network.setdefault("nics", {})
        return ids
