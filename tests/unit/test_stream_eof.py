"""A stream's last bytes may come with its end (ReadStreamResponse.eof): the guest
answers them together once the process's end of the pipe is closed, and the host
relays the bytes before it stops."""

from __future__ import annotations

import asyncio
from typing import Any

from carapace.guest.stdio import _read
from carapace.protocols import agent_pb2 as pb
from carapace.sandbox.stdio import _pump_out


def guest_read(*chunks: bytes, eof: bool) -> pb.ReadStreamResponse:
    async def go() -> pb.ReadStreamResponse:
        reader = asyncio.StreamReader()
        for c in chunks:
            reader.feed_data(c)
        if eof:
            reader.feed_eof()
        return await asyncio.wait_for(_read(reader, 0), 5)

    return asyncio.run(go())


def test_the_last_bytes_come_with_the_end() -> None:
    r = guest_read(b"out\n", eof=True)
    assert (r.data, r.eof) == (b"out\n", True)


def test_bytes_of_an_open_stream_come_without_the_end() -> None:
    r = guest_read(b"out\n", eof=False)
    assert (r.data, r.eof) == (b"out\n", False)


def test_an_ended_empty_stream_is_the_end() -> None:
    r = guest_read(eof=True)
    assert (r.data, r.eof) == (b"", True)


def test_a_stream_with_more_than_one_answer_ends_with_the_last() -> None:
    async def go() -> list[tuple[bytes, bool]]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * 10)
        reader.feed_eof()
        out = []
        for _ in range(2):
            r = await _read(reader, 4)
            out.append((r.data, r.eof))
        return out

    assert asyncio.run(go()) == [(b"xxxx", False), (b"xxxx", False)]


class Answers:
    """An agent that answers ReadStdout with the given (data, eof) pairs."""

    def __init__(self, *answers: tuple[bytes, bool]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def read_stream(self, stream: str, cid: str, exec_id: str) -> tuple[bytes, bool]:
        self.calls += 1
        return self.answers.pop(0)


def pump(agent: Answers) -> list[bytes]:
    got: list[bytes] = []
    fake: Any = agent
    asyncio.run(asyncio.wait_for(_pump_out(fake, "stdout", "c1", "e1", got.append), 5))
    return got


def test_the_host_relays_the_bytes_that_came_with_the_end() -> None:
    agent = Answers((b"a", False), (b"b", True))
    assert pump(agent) == [b"a", b"b"]
    assert agent.calls == 2  # nothing asked after the end


def test_the_host_stops_at_an_empty_end() -> None:
    agent = Answers((b"a", False), (b"", True))
    assert pump(agent) == [b"a"]
