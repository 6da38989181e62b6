"""A ttrpc peer that is not trusted (issue 14, item 7): a server (the guest agent)
sending frames no conforming server sends breaks the connection at the first one, with
one log line, whatever the flood; a client's ignored frames are logged at most once per
interval; sockets are 0600 whatever the umask."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.protocols import ttrpc_pb2
from carapace.ttrpc import Client, Code, Server, TtrpcError
from carapace.ttrpc.ratelimit import RateLimitedLog, shorten
from carapace.ttrpc.wire import MSG_DATA, MSG_REQUEST, MSG_RESPONSE

T = TypeVar("T")
SERVICE = "carapace.test.v1.Echo"
FLOOD = 20_000


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


def frame(stream_id: int, msg_type: int, payload: bytes) -> bytes:
    return struct.pack(">IIBB", len(payload), stream_id, msg_type, 0) + payload


def ok(payload: bytes = b"") -> bytes:
    return ttrpc_pb2.Response(payload=payload).SerializeToString()


async def pair() -> tuple[Client, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    cr, cw = await asyncio.open_connection(sock=a)
    pr, pw = await asyncio.open_connection(sock=b)
    return Client(cr, cw), pr, pw


async def read_request(reader: asyncio.StreamReader) -> int:
    length, stream_id, msg_type, _ = struct.unpack(">IIBB", await reader.readexactly(10))
    await reader.readexactly(length)
    assert msg_type == MSG_REQUEST
    return int(stream_id)


#: What a hostile server sends while a call on stream 1 waits (stream 3 was never used).
VIOLATIONS = {
    "a request": frame(1, MSG_REQUEST, b""),
    "a data frame": frame(1, MSG_DATA, b"x"),
    "an unknown type": frame(1, 77, b""),
    "a response on an even stream": frame(2, MSG_RESPONSE, ok()),
    "a response on a stream never opened": frame(3, MSG_RESPONSE, ok()),
    "a response on stream 0": frame(0, MSG_RESPONSE, ok()),
    "a garbled response": frame(1, MSG_RESPONSE, b"\xff\xff\xff\xff"),
}


@pytest.mark.parametrize("what", sorted(VIOLATIONS))
def test_a_violation_closes_the_connection_with_one_line_whatever_the_flood(
    what: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        client, pr, pw = await pair()
        call = asyncio.ensure_future(client.call_raw(SERVICE, "Wait", b""))
        assert await read_request(pr) == 1
        for _ in range(FLOOD):
            pw.write(VIOLATIONS[what])
        with pytest.raises(TtrpcError) as info:
            await call
        assert info.value.code == Code.UNAVAILABLE
        assert "broke the protocol" in info.value.message
        await client.wait_closed()
        assert client.closed and client.violation
        with pytest.raises(TtrpcError, match="broke the protocol"):  # later calls too
            await client.call_raw(SERVICE, "Again", b"")
        await client.close()
        pw.close()

    with caplog.at_level(logging.DEBUG, logger="carapace.ttrpc"):
        run(main())
    lines = [r for r in caplog.records if r.name.startswith("carapace.ttrpc")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "broke the protocol" in lines[0].getMessage()


def test_late_responses_of_abandoned_calls_are_dropped_but_not_more() -> None:
    async def main() -> None:
        client, pr, pw = await pair()
        for _ in range(2):  # two calls given up on: two late answers may come
            with pytest.raises(TtrpcError):
                await client.call_raw(SERVICE, "Slow", b"", timeout=0.01)
        assert [await read_request(pr) for _ in range(2)] == [1, 3]
        pw.write(frame(3, MSG_RESPONSE, ok(b"late")))
        pw.write(frame(1, MSG_RESPONSE, ok(b"late")))
        nxt = asyncio.ensure_future(client.call_raw(SERVICE, "Next", b""))
        assert await read_request(pr) == 5
        pw.write(frame(5, MSG_RESPONSE, ok(b"next")))
        assert await nxt == b"next"
        assert not client.closed
        pw.write(frame(1, MSG_RESPONSE, ok(b"again")))  # a third late answer: one too many
        await asyncio.wait_for(client.wait_closed(), 5)
        assert "answered already" in client.violation
        await client.close()
        pw.close()

    run(main())


def test_the_server_logs_ignored_frames_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server ignores frames that are not requests (as containerd's ttrpc does) and
    keeps serving; a flood of them is one line, not one per frame."""

    async def echo(payload: bytes) -> bytes:
        return payload

    async def main() -> None:
        server = Server()
        server.register(SERVICE, "Echo", echo)
        a, b = socket.socketpair()
        sr, sw = await asyncio.open_connection(sock=a)
        cr, cw = await asyncio.open_connection(sock=b)
        serving = asyncio.ensure_future(server.serve_connection(sr, sw))
        for i in range(FLOOD):
            cw.write(frame(2 * i + 1, MSG_DATA, b"junk"))
        client = Client(cr, cw)
        client._next_stream_id = 2 * FLOOD + 1  # past the junk's stream ids
        assert await client.call_raw(SERVICE, "Echo", b"still here") == b"still here"
        await client.close()
        await server.close()
        await asyncio.gather(serving, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="carapace.ttrpc"):
        run(main())
    lines = [r for r in caplog.records if "ignoring message type" in r.getMessage()]
    assert len(lines) == 1


def test_rate_limited_log_counts_what_it_did_not_write(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("carapace.test"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="carapace.test"):
        assert limited("bad frame %d", 1)
        for i in range(999):
            assert not limited("bad frame %d", i)
        now[0] += 10
        assert limited("bad frame %d", 1000)
    assert limited.count == 1001
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bad frame 1",
        "bad frame 1000 (and 999 more like it in the last 10s, not logged)",
    ]


def test_shorten_cuts_what_a_peer_makes_long() -> None:
    assert shorten("c1") == "'c1'"
    long = shorten("x" * (1 << 20))
    assert len(long) < 120 and str(1 << 20) in long


def test_serve_unix_makes_a_0600_socket_whatever_the_umask(tmp_path: Path) -> None:
    async def main() -> None:
        server = Server()
        path = tmp_path / "s.sock"
        old = os.umask(0)
        try:
            await server.serve_unix(str(path))
        finally:
            os.umask(old)
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        await server.close()

    run(main())
