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
from carapace.errors import InvalidArgument, NotFound
from carapace.hypervisor import (
    USER_NET_GATEWAY,
    USER_NET_GUEST_IP,
    USER_NET_PREFIX,
    VM,
    Nic,
    TapNic,
    UserNic,
)
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
        from carapace.network import pod as netns_pod

        loop = asyncio.get_running_loop()
        attached = await loop.run_in_executor(
            None, netns_pod.attach_all, self.plan.netns, self.record
        )
        self._fds = [a.fd for a in attached.endpoints]
        self.guest = GuestNetwork(
            list(attached.interfaces), list(attached.routes), list(attached.neighbors)
        )
        vhost = vhost_net_usable()
        return tuple(
            TapNic(f"net{i}", a.mac, a.fd, vhost) for i, a in enumerate(attached.endpoints)
        )

    def close_fds(self) -> None:
        """The VM holds its own copies of the taps' fds once it started."""
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
        from carapace.network import pod as netns_pod

        if any(i.name == name for i in self.guest.interfaces):
            raise InvalidArgument(f"sandbox {self.sandbox_id}: it has an interface {name} already")
        loop = asyncio.get_running_loop()
        index = len(self.record.network.get("taps", []))
        attached = await loop.run_in_executor(
            None, netns_pod.attach_one, netns, name, index, self.record
        )
        endpoint = attached.endpoints[0]
        nic = TapNic(f"net{index}", endpoint.mac, endpoint.fd, vhost_net_usable())
        try:
            await vm.add_nic(nic)
        finally:
            os.close(endpoint.fd)
        iface = await agent.update_interface(attached.interfaces[0])
        if attached.routes:
            self.guest.routes += attached.routes
            await agent.update_routes(self.guest.routes)
        self.guest.interfaces.append(attached.interfaces[0])
        self._nic_ids[name] = nic.id
        return iface

    async def remove_interface(self, vm: VM, agent: AgentClient, name: str) -> None:
        """Take the interface ``name`` out of the running VM and release its tap."""
        from carapace.network import pod as netns_pod

        nic_id = self._nic_ids.get(name)
        if nic_id is None:
            raise NotFound(f"sandbox {self.sandbox_id}: no interface {name}")
        self.guest.routes = [r for r in self.guest.routes if r.device != name]
        self.guest.interfaces = [i for i in self.guest.interfaces if i.name != name]
        await agent.update_routes(self.guest.routes)
        await vm.remove_nic(nic_id)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, netns_pod.detach_one, name, self.record)
        del self._nic_ids[name]

    @property
    def _nic_ids(self) -> dict[str, str]:
        """guest interface name -> the VM's NIC id (kept in the record)."""
        ids: dict[str, str] = self.record.network.setdefault("nics", {})
        return ids
