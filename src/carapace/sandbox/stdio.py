"""Relaying a guest process's streams: stdin in, stdout/stderr out, until it exits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from carapace.agent.client import AgentClient
from carapace.errors import AgentError

OUTPUT_DRAIN_TIMEOUT = 5.0  # after exit, how long to wait for output streams to close

Sink = Callable[[bytes], Awaitable[None] | None]


@dataclass
class ProcessIO:
    """Where a process's streams come from and go to (all optional)."""

    stdin: AsyncIterator[bytes] | None = None
    stdout: Sink | None = None
    stderr: Sink | None = None
    #: called once the process started, with a resize function (terminal use)
    on_started: Callable[[Callable[[int, int], Awaitable[None]]], None] | None = None


async def relay(
    agent: AgentClient, container_id: str, exec_id: str, io: ProcessIO, started: Awaitable[Any]
) -> int:
    """Relay ``io`` for a created process, await ``started`` (what starts it), and
    return its exit status once it exited and its output was drained."""
    # the process exists once ``started`` returns; its output waits in the guest
    await started
    tasks = [
        asyncio.ensure_future(_pump_out(agent, "stdout", container_id, exec_id, io.stdout)),
        asyncio.ensure_future(_pump_out(agent, "stderr", container_id, exec_id, io.stderr)),
    ]
    stdin_task = None
    try:
        if io.on_started is not None:
            io.on_started(
                lambda rows, cols: agent.tty_win_resize(container_id, exec_id, rows, cols)
            )
        if io.stdin is not None:
            stdin_task = asyncio.ensure_future(_pump_in(agent, container_id, exec_id, io.stdin))
        else:
            await agent.close_stdin(container_id, exec_id)
        status = await agent.wait_process(container_id, exec_id)
        await asyncio.wait(tasks, timeout=OUTPUT_DRAIN_TIMEOUT)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return status
    finally:
        others = [*tasks, *([stdin_task] if stdin_task else [])]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)


async def _pump_out(
    agent: AgentClient, stream: str, cid: str, exec_id: str, sink: Sink | None
) -> None:
    while True:
        try:
            data, eof = await agent.read_stream(stream, cid, exec_id)
        except AgentError:
            return
        if data and sink is not None:  # the last bytes may come with the end
            r = sink(data)
            if r is not None:
                await r
        if eof:
            return


async def _pump_in(
    agent: AgentClient, cid: str, exec_id: str, source: AsyncIterator[bytes]
) -> None:
    try:
        async for chunk in source:
            if chunk:
                await agent.write_stdin(cid, exec_id, chunk)
    except AgentError:
        return
    with contextlib.suppress(AgentError):
        await agent.close_stdin(cid, exec_id)
