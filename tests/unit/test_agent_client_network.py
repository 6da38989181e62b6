"""AgentClient's network calls against a ttrpc server over a real unix socket: what
each sends and what it returns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message

from carapace.agent.client import AgentClient
from carapace.errors import AgentError
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import AGENT_SERVICE as SERVICE
from carapace.ttrpc import Code, Server, TtrpcError
from tests.tooling.agent_link import client_of

T = TypeVar("T")

ETH0 = pb.Interface(
    name="eth0",
    mac="02:00:00:00:01:01",
    mtu=1450,
    up=True,
    addresses=[pb.IPAddress(family=4, address="10.198.0.5", prefix_len=24)],
)
ROUTES = [
    pb.Route(gateway="10.198.0.1", device="eth0", family=4),
    pb.Route(dest="10.198.5.0/24", device="eth0", scope=253, mtu=1400, family=4),
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


class FakeAgent:
    def __init__(self) -> None:
        self.requests: list[tuple[str, Message]] = []
        self.server = Server()
        for name, req, reply in (
            ("UpdateInterface", pb.UpdateInterfaceRequest, ETH0),
            ("UpdateRoutes", pb.UpdateRoutesRequest, pb.Routes(routes=ROUTES)),
            ("AddARPNeighbors", pb.AddARPNeighborsRequest, pb.Empty()),
            ("ListInterfaces", pb.ListInterfacesRequest, pb.Interfaces(interfaces=[ETH0])),
            ("ListRoutes", pb.ListRoutesRequest, pb.Routes(routes=ROUTES)),
        ):
            self.server.register_typed(SERVICE, name, req, self.handler(name, reply))

    def handler(self, name: str, reply: Message) -> Any:
        async def handle(req: Message) -> Message:
            self.requests.append((name, req))
            if name == "UpdateInterface" and req.interface.mac == "02:00:00:00:09:09":  # type: ignore[attr-defined]
                raise TtrpcError(Code.NOT_FOUND, "no interface with MAC 02:00:00:00:09:09")
            return reply

        return handle


@asynccontextmanager
async def connected(tmp_path: Path) -> AsyncIterator[tuple[FakeAgent, AgentClient]]:
    agent = FakeAgent()
    async with client_of(agent.server, tmp_path) as client:
        yield agent, client


def test_network_calls_send_their_request_and_return_the_reply(tmp_path: Path) -> None:
    neighbor = pb.ARPNeighbor(address="10.198.0.1", mac="02:00:00:00:00:aa", device="eth0")

    async def go() -> None:
        async with connected(tmp_path) as (agent, client):
            assert await client.update_interface(pb.Interface(mac=ETH0.mac)) == ETH0
            assert await client.update_routes(ROUTES) == ROUTES
            await client.add_arp_neighbors([neighbor])
            assert await client.list_interfaces() == [ETH0]
            assert await client.list_routes() == ROUTES
            assert agent.requests == [
                (
                    "UpdateInterface",
                    pb.UpdateInterfaceRequest(interface=pb.Interface(mac=ETH0.mac)),
                ),
                ("UpdateRoutes", pb.UpdateRoutesRequest(routes=pb.Routes(routes=ROUTES))),
                ("AddARPNeighbors", pb.AddARPNeighborsRequest(neighbors=[neighbor])),
                ("ListInterfaces", pb.ListInterfacesRequest()),
                ("ListRoutes", pb.ListRoutesRequest()),
            ]

    run(go())


def test_a_refusal_is_an_agent_error_naming_the_call(tmp_path: Path) -> None:
    async def go() -> None:
        async with connected(tmp_path) as (_, client):
            with pytest.raises(AgentError) as e:
                await client.update_interface(pb.Interface(mac="02:00:00:00:09:09"))
            assert str(e.value) == (
                "agent UpdateInterface: no interface with MAC 02:00:00:00:09:09 (NOT_FOUND)"
            )

    run(go())
