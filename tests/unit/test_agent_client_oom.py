"""AgentClient.get_oom_event against a ttrpc server over a real unix socket: a caller's
timeout or cancellation never makes an event go missing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.agent.client import MAX_ERROR_TEXT, MAX_OOM_QUEUED, SERVICE, AgentClient
from carapace.errors import AgentError
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, Server, TtrpcError
from tests.tooling.agent_link import client_of

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


class FakeAgent:
    def __init__(self) -> None:
        self.events: asyncio.Queue[str] = asyncio.Queue()
        self.calls = 0
        self.server = Server()
        self.server.register_typed(SERVICE, "GetOOMEvent", pb.GetOOMEventRequest, self.get)

    async def get(self, req: pb.GetOOMEventRequest) -> pb.OOMEvent:
        self.calls += 1
        return pb.OOMEvent(container_id=await self.events.get())


@asynccontextmanager
async def connected(tmp_path: Path) -> AsyncIterator[tuple[FakeAgent, AgentClient]]:
    agent = FakeAgent()
    async with client_of(agent.server, tmp_path) as client:
        yield agent, client


def test_waits_for_the_next_event(tmp_path: Path) -> None:
    async def go() -> None:
        async with connected(tmp_path) as (agent, client):
            waiter = asyncio.ensure_future(client.get_oom_event())
            await asyncio.sleep(0.1)
            assert not waiter.done()
            agent.events.put_nowait("c1")
            assert await waiter == "c1"

    run(go())


def test_a_timeout_returns_none_and_the_event_waits_for_the_next_call(tmp_path: Path) -> None:
    async def go() -> None:
        async with connected(tmp_path) as (agent, client):
            assert await client.get_oom_event(timeout=0.05) is None
            assert await client.get_oom_event(timeout=0.05) is None
            agent.events.put_nowait("c1")  # arrives while nobody waits
            await asyncio.sleep(0.1)
            assert await client.get_oom_event(timeout=1) == "c1"
            assert agent.calls == 2  # one long poll, not one per call

    run(go())


def test_cancelled_callers_lose_nothing_and_concurrent_ones_share(tmp_path: Path) -> None:
    async def go() -> None:
        async with connected(tmp_path) as (agent, client):
            gave_up = asyncio.ensure_future(client.get_oom_event())
            waiters = [asyncio.ensure_future(client.get_oom_event()) for _ in range(3)]
            await asyncio.sleep(0.05)
            gave_up.cancel()
            for cid in ("a", "b", "c"):
                agent.events.put_nowait(cid)
            assert sorted(await asyncio.gather(*waiters)) == ["a", "b", "c"]
            assert gave_up.cancelled()

    run(go())


def test_a_closed_connection_is_an_error_not_a_hang(tmp_path: Path) -> None:
    async def go() -> None:
        async with connected(tmp_path) as (agent, client):
            waiter = asyncio.ensure_future(client.get_oom_event())
            await asyncio.sleep(0.05)
            await agent.server.close()
            with pytest.raises(AgentError, match="GetOOMEvent"):
                await waiter
            with pytest.raises(AgentError, match="GetOOMEvent"):
                await client.get_oom_event(timeout=1)

    run(go())


# --- a hostile guest (issue 14, item 7) ------------------------------------------------------


def test_ids_no_container_can_have_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest naming 1 MiB ids, empty ids or ids with a slash or newline: none is
    queued, one line is logged (not one per event, not the id in full)."""

    async def go() -> None:
        async with connected(tmp_path) as (agent, client):
            for bad in ["x" * (1 << 20), "", "../etc", "c1\n", "-c"] * 200:
                agent.events.put_nowait(bad)
            agent.events.put_nowait("c1")
            assert await client.get_oom_event(timeout=5) == "c1"
            assert not client._oom_events

    with caplog.at_level(logging.INFO, logger="carapace.agent"):
        run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "carapace.agent"]
    assert len(lines) == 1 and len(lines[0]) < 300, lines


def test_the_oom_queue_is_bounded(tmp_path: Path) -> None:
    async def go() -> None:
        async with connected(tmp_path) as (agent, client):
            assert await client.get_oom_event(timeout=0.01) is None  # the poll runs
            for i in range(MAX_OOM_QUEUED * 4):
                agent.events.put_nowait(f"c{i}")
            while not agent.events.empty():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert len(client._oom_events) == MAX_OOM_QUEUED
            # the oldest went: the newest are kept
            assert await client.get_oom_event() == f"c{MAX_OOM_QUEUED * 3}"

    run(go())


def test_a_huge_error_text_from_the_guest_is_cut(tmp_path: Path) -> None:
    async def go() -> None:
        server = Server()

        async def fail(req: pb.CheckRequest) -> pb.HealthCheckResponse:
            raise TtrpcError(Code.INTERNAL, "y" * (3 << 20))

        server.register_typed(SERVICE, "Check", pb.CheckRequest, fail)
        async with client_of(server, tmp_path) as client:
            with pytest.raises(AgentError) as exc:
                await client.check(timeout=5)
            assert len(str(exc.value)) < MAX_ERROR_TEXT + 200
            assert str(3 << 20) in str(exc.value)

    run(go())
