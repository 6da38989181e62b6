"""The hostile agent test double (carapace.guest.hostile): switched on only by PID 1's
kernel command line, and what each mode does, against the host's real agent client."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.agent.client import AgentClient
from carapace.guest import agent as agent_main
from carapace.guest import hostile
from carapace.guest.pod import Container, Process
from carapace.guest.server import Agent
from carapace.protocols.contract import AGENT_SERVICE
from carapace.ttrpc import Client

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_modes_come_only_from_the_parameter() -> None:
    line = "console=ttyS0 quiet carapace.hostile=oom-flood,ignore-kill,bogus panic=-1"
    assert hostile.modes_of(line) == {"oom-flood", "ignore-kill"}
    assert hostile.modes_of("console=ttyS0 quiet") == frozenset()
    assert hostile.modes_of("xcarapace.hostile=oom-flood carapace.hostilex=ignore-kill") == set()


def handlers(agent: Agent) -> dict[str, Any]:
    return dict(agent.server._services[AGENT_SERVICE])


def test_without_the_parameter_the_agent_is_the_normal_one() -> None:
    agent = Agent()
    before = handlers(agent)
    agent_main.arm_hostile(agent, "console=ttyS0 carapace.hostile=")
    assert handlers(agent) == before
    agent_main.arm_hostile(agent, "console=ttyS0 carapace.hostile=ignore-kill")
    changed = {k for k, v in handlers(agent).items() if before[k] is not v}
    assert changed == {"SignalProcess"}


def test_only_pid_1_reads_the_kernel_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that is not PID 1 (anything run in a container) never arms it."""
    armed: list[str] = []

    class Stub:
        methods = ()

        async def serve(self) -> None:
            return None

    monkeypatch.setattr(agent_main, "Agent", Stub)
    monkeypatch.setattr(agent_main, "arm_hostile", lambda a, c: armed.append(c))
    monkeypatch.setattr(agent_main.os, "getpid", lambda: 4242)
    agent_main.main()
    assert armed == []


def c1_agent(tmp_path: Path) -> Agent:
    agent = Agent()
    init = Process(container_id="c1", exec_id="", terminal=False, pid=4242)
    agent.pod.containers["c1"] = Container(
        id="c1", bundle=str(tmp_path), rootfs="/", mounts=[], init=init
    )
    return agent


async def connect(agent: Agent) -> tuple[AgentClient, asyncio.Task[None]]:
    a, b = socket.socketpair()
    cr, cw = await asyncio.open_connection(sock=a)
    sr, sw = await asyncio.open_connection(sock=b)
    task = asyncio.ensure_future(agent.server.serve_connection(sr, sw))
    return AgentClient(Client(cr, cw)), task


def test_ignore_kill_acknowledges_and_signals_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(hostile.os, "kill", lambda pid, sig: killed.append((pid, sig)))

    async def go() -> None:
        agent = c1_agent(tmp_path)
        agent.pod.containers["c1"].init.exit = asyncio.get_running_loop().create_future()
        agent_main.arm_hostile(agent, "carapace.hostile=ignore-kill")
        client, task = await connect(agent)
        await client.signal_process("c1", "", 9)
        assert not agent.pod.containers["c1"].init.exit.done()
        await client.close()
        await agent.server.close()
        await task

    run(go())
    assert killed == []


def test_oom_flood_forges_then_the_host_client_drops_the_huge_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostile, "FORGED_OOM", 3)
    monkeypatch.setattr(hostile, "HUGE_OOM", 5)

    async def go() -> None:
        agent = Agent()
        agent_main.arm_hostile(agent, "carapace.hostile=oom-flood")
        agent.pod.oom._put("real")
        client, task = await connect(agent)
        got = [await client.get_oom_event(timeout=5) for _ in range(4)]
        assert got == ["forged-0", "forged-1", "forged-2", "real"]
        await client.close()
        await agent.server.close()
        await task

    run(go())


class StartingCrun:
    async def start(self, container_id: str) -> None:
        return None


def test_frame_flood_breaks_the_host_connection_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        agent = c1_agent(tmp_path)
        agent.pod._crun = StartingCrun()  # type: ignore[assignment]
        agent_main.arm_hostile(agent, "carapace.hostile=frame-flood")
        client, task = await connect(agent)
        assert await client.start_container("c1") == 4242
        await asyncio.wait_for(client.wait_closed(), 5)
        assert client.violation
        await agent.server.close()
        await task
        await client.close()

    with caplog.at_level(logging.DEBUG, logger="carapace.ttrpc"):
        run(go())
    host_lines = [r for r in caplog.records if r.name.startswith("carapace.ttrpc.client")]
    assert len(host_lines) == 1 and "broke the protocol" in host_lines[0].getMessage()


def test_console_flood_writes_what_it_says(tmp_path: Path) -> None:
    console = tmp_path / "console"
    console.touch()
    written = hostile.flood_console(str(console), mib=1)
    data = console.read_bytes()
    assert written >= 1 << 20 and len(data) > written
    assert data.rstrip().endswith(f"{hostile.CONSOLE_DONE} {written}".encode())
