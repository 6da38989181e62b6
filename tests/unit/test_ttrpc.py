"""Byte-level tests of the ttrpc client, server and framing over real sockets."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.protocols import status_pb2, ttrpc_pb2
from carapace.ttrpc import MAX_MESSAGE_SIZE, Client, Code, Server, TtrpcError
from carapace.ttrpc.wire import (
    HEADER_SIZE,
    MSG_DATA,
    MSG_REQUEST,
    MSG_RESPONSE,
    decode_header,
    encode_frame,
    encode_header,
    read_frame,
)

T = TypeVar("T")

SERVICE = "carapace.test.v1.Echo"
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


async def stream_pair() -> tuple[Streams, Streams]:
    a, b = socket.socketpair()
    left = await asyncio.open_connection(sock=a)
    right = await asyncio.open_connection(sock=b)
    return left, right


def raw_frame(stream_id: int, msg_type: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">IIBB", size, stream_id, msg_type, 0) + payload


async def read_raw_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    length, stream_id, msg_type, flags = struct.unpack(">IIBB", await reader.readexactly(10))
    return stream_id, msg_type, flags, await reader.readexactly(length)


def request_bytes(
    method: str, payload: bytes, service: str = SERVICE, timeout_nano: int = 0
) -> bytes:
    return ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout_nano
    ).SerializeToString()


async def echo(payload: bytes) -> bytes:
    return payload


class Harness:
    """A Server serving one end of a socketpair; the other end is left to the test."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Streams:
        (cr, cw), (sr, sw) = await stream_pair()
        self.task = asyncio.create_task(self.server.serve_connection(sr, sw))
        return cr, cw

    async def client(self) -> Client:
        reader, writer = await self.start()
        return Client(reader, writer)

    async def stop(self) -> None:
        await self.server.close()
        if self.task is not None:
            await self.task


def echo_server() -> Server:
    server = Server()
    server.register(SERVICE, "Echo", echo)
    return server


# --- 1. framing -------------------------------------------------------------


def test_encode_header_exact_bytes() -> None:
    assert encode_header(5, 1, 1) == b"\x00\x00\x00\x05\x00\x00\x00\x01\x01\x00"
    assert encode_header(0x01020304, 0xA0B0C0D0, MSG_RESPONSE, 7) == bytes.fromhex(
        "01020304a0b0c0d00207"
    )
    assert len(encode_header(0, 0, MSG_DATA)) == HEADER_SIZE == 10
    assert MAX_MESSAGE_SIZE == 4 * 1024 * 1024


def test_decode_header() -> None:
    assert decode_header(b"\x00\x00\x00\x05\x00\x00\x00\x01\x01\x00") == (5, 1, 1, 0)
    assert decode_header(bytes.fromhex("01020304a0b0c0d00207")) == (
        0x01020304,
        0xA0B0C0D0,
        2,
        7,
    )
    for bad in (b"", b"\x00" * 9, b"\x00" * 11):
        with pytest.raises(ValueError):
            decode_header(bad)


def test_encode_frame() -> None:
    assert encode_frame(3, MSG_REQUEST, b"abc") == b"\x00\x00\x00\x03\x00\x00\x00\x03\x01\x00abc"
    assert len(encode_frame(1, MSG_REQUEST, b"x" * MAX_MESSAGE_SIZE)) == 10 + MAX_MESSAGE_SIZE
    with pytest.raises(TtrpcError) as info:
        encode_frame(1, MSG_REQUEST, b"x" * (MAX_MESSAGE_SIZE + 1))
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE_SIZE + 1) in info.value.message
    assert str(MAX_MESSAGE_SIZE) in info.value.message


def test_read_frame_normal_oversize_and_eof() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        big = MAX_MESSAGE_SIZE + 10
        reader.feed_data(raw_frame(1, MSG_REQUEST, b"hello"))
        reader.feed_data(raw_frame(3, MSG_REQUEST, b""))
        reader.feed_data(raw_frame(5, MSG_REQUEST, b"z" * big))
        reader.feed_data(raw_frame(7, MSG_RESPONSE, b"after"))
        reader.feed_data(b"\x00\x00")
        reader.feed_eof()
        assert await read_frame(reader) == (5, 1, MSG_REQUEST, b"hello")
        assert await read_frame(reader) == (0, 3, MSG_REQUEST, b"")
        assert await read_frame(reader) == (big, 5, MSG_REQUEST, None)
        assert await read_frame(reader) == (5, 7, MSG_RESPONSE, b"after")
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader)

    run(main())


def test_error_str_and_codes() -> None:
    assert len(Code) == 17
    assert [int(c) for c in Code] == list(range(17))
    assert (Code.OK.value, Code.UNIMPLEMENTED.value, Code.UNAUTHENTICATED.value) == (0, 12, 16)
    err = TtrpcError(Code.NOT_FOUND, "no such thing")
    assert str(err) == "NOT_FOUND: no such thing"
    assert err.code is Code.NOT_FOUND and err.message == "no such thing"


# --- 2. raw client against Server ------------------------------------------------


def test_server_answers_raw_request_frame() -> None:
    async def main() -> None:
        h = Harness(echo_server())
        reader, writer = await h.start()
        writer.write(raw_frame(41, MSG_REQUEST, request_bytes("Echo", b"\x00payload\xff")))
        await writer.drain()
        stream_id, msg_type, flags, body = await read_raw_frame(reader)
        assert (stream_id, msg_type, flags) == (41, 2, 0)
        response = ttrpc_pb2.Response.FromString(body)
        assert response.status.code == 0
        assert response.payload == b"\x00payload\xff"
        writer.close()
        assert h.task is not None
        await h.task  # serve_connection returns on peer EOF
        await h.stop()

    run(main())


def test_server_deadline_from_timeout_nano() -> None:
    async def main() -> None:
        cancelled = asyncio.Event()

        async def slow(payload: bytes) -> bytes:
            try:
                await asyncio.sleep(30)
            finally:
                cancelled.set()
            return payload

        server = Server()
        server.register(SERVICE, "Slow", slow)
        h = Harness(server)
        reader, writer = await h.start()
        writer.write(raw_frame(1, MSG_REQUEST, request_bytes("Slow", b"", timeout_nano=50_000_000)))
        stream_id, msg_type, _, body = await read_raw_frame(reader)
        assert (stream_id, msg_type) == (1, MSG_RESPONSE)
        assert ttrpc_pb2.Response.FromString(body).status.code == Code.DEADLINE_EXCEEDED
        assert cancelled.is_set()
        writer.close()
        await h.stop()

    run(main())


# --- 3. Client against a raw fake peer -------------------------------------------


def test_client_request_frames() -> None:
    async def main() -> None:
        (cr, cw), (pr, pw) = await stream_pair()
        client = Client(cr, cw)
        first = asyncio.create_task(
            client.call_raw(SERVICE, "One", b"first", metadata={"k1": "v1", "k2": "v2"})
        )
        stream_id, msg_type, flags, body = await read_raw_frame(pr)
        assert (stream_id, msg_type, flags) == (1, MSG_REQUEST, 0)
        req = ttrpc_pb2.Request.FromString(body)
        assert (req.service, req.method, req.payload) == (SERVICE, "One", b"first")
        assert req.timeout_nano == 0
        assert [(kv.key, kv.value) for kv in req.metadata] == [("k1", "v1"), ("k2", "v2")]

        second = asyncio.create_task(
            client.call(
                SERVICE,
                "Two",
                ttrpc_pb2.KeyValue(key="a", value="b"),
                ttrpc_pb2.KeyValue,
                timeout=2.5,
            )
        )
        stream_id, msg_type, _, body = await read_raw_frame(pr)
        assert (stream_id, msg_type) == (3, MSG_REQUEST)
        req = ttrpc_pb2.Request.FromString(body)
        assert (req.service, req.method) == (SERVICE, "Two")
        assert ttrpc_pb2.KeyValue.FromString(req.payload) == ttrpc_pb2.KeyValue(key="a", value="b")
        assert req.timeout_nano == 2_500_000_000
        assert len(req.metadata) == 0

        # Answer out of order: stream 3 first, then stream 1 with an error status.
        reply = ttrpc_pb2.KeyValue(key="x", value="y").SerializeToString()
        ok = ttrpc_pb2.Response(status=status_pb2.Status(code=0), payload=reply)
        pw.write(raw_frame(3, MSG_RESPONSE, ok.SerializeToString()))
        assert await second == ttrpc_pb2.KeyValue(key="x", value="y")
        assert not first.done()
        bad = ttrpc_pb2.Response(status=status_pb2.Status(code=5, message="gone"))
        pw.write(raw_frame(1, MSG_RESPONSE, bad.SerializeToString()))
        with pytest.raises(TtrpcError) as info:
            await first
        assert (info.value.code, info.value.message) == (Code.NOT_FOUND, "gone")

        third = asyncio.create_task(client.call_raw(SERVICE, "Three", b""))
        stream_id, _, _, _ = await read_raw_frame(pr)
        assert stream_id == 5
        # A response without a status field at all means OK.
        pw.write(raw_frame(5, MSG_RESPONSE, ttrpc_pb2.Response(payload=b"p").SerializeToString()))
        assert await third == b"p"
        await client.close()
        pw.close()

    run(main())


def test_client_oversize_response_frame_breaks_the_connection() -> None:
    """A conforming server answers an oversize reply with an error status: an oversize
    frame is a protocol violation. The connection closes at its header (its body is
    never read), failing every pending call."""

    async def main() -> None:
        (cr, cw), (pr, pw) = await stream_pair()
        client = Client(cr, cw)
        big = asyncio.create_task(client.call_raw(SERVICE, "Big", b""))
        small = asyncio.create_task(client.call_raw(SERVICE, "Small", b""))
        ids = {(await read_raw_frame(pr))[0] for _ in range(2)}
        assert ids == {1, 3}
        size = (1 << 32) - 1  # announced, never sent: the client must not wait for it
        pw.write(raw_frame(1, MSG_RESPONSE, b"", length=size))
        for call in (big, small):
            with pytest.raises(TtrpcError) as info:
                await call
            assert info.value.code == Code.UNAVAILABLE
            assert str(size) in info.value.message and "broke the protocol" in info.value.message
        assert client.closed and str(size) in client.violation
        await client.close()
        pw.close()

    run(main())


def test_client_drops_late_response_after_deadline() -> None:
    async def main() -> None:
        (cr, cw), (pr, pw) = await stream_pair()
        client = Client(cr, cw)
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Late", b"", timeout=0.05)
        assert info.value.code == Code.DEADLINE_EXCEEDED
        stream_id, _, _, body = await read_raw_frame(pr)
        assert stream_id == 1
        assert ttrpc_pb2.Request.FromString(body).timeout_nano == 50_000_000
        pw.write(
            raw_frame(1, MSG_RESPONSE, ttrpc_pb2.Response(payload=b"late").SerializeToString())
        )
        nxt = asyncio.create_task(client.call_raw(SERVICE, "Next", b""))
        stream_id, _, _, _ = await read_raw_frame(pr)
        assert stream_id == 3
        pw.write(
            raw_frame(3, MSG_RESPONSE, ttrpc_pb2.Response(payload=b"next").SerializeToString())
        )
        assert await nxt == b"next"
        assert not client.closed
        await client.close()
        pw.close()

    run(main())


# --- 4. concurrency ---------------------------------------------------------------


def test_responses_not_serialized_behind_slow_handler() -> None:
    async def main() -> None:
        release = asyncio.Event()
        order: list[str] = []

        async def wait(payload: bytes) -> bytes:
            await release.wait()
            order.append("wait")
            return payload

        async def fast(payload: bytes) -> bytes:
            order.append("fast")
            return payload

        server = Server()
        server.register(SERVICE, "Wait", wait)
        server.register(SERVICE, "Fast", fast)
        h = Harness(server)
        client = await h.client()
        first = asyncio.create_task(client.call_raw(SERVICE, "Wait", b"1"))
        await asyncio.sleep(0.01)
        assert await client.call_raw(SERVICE, "Fast", b"2") == b"2"
        assert not first.done()
        release.set()
        assert await first == b"1"
        assert order == ["fast", "wait"]
        await client.close()
        await h.stop()

    run(main())


# --- 5. deadlines -------------------------------------------------------------------


def test_deadline_exceeded_and_handler_cancelled() -> None:
    async def main() -> None:
        cancelled = asyncio.Event()

        async def slow(payload: bytes) -> bytes:
            try:
                await asyncio.sleep(30)
            finally:
                cancelled.set()
            return payload

        server = Server()
        server.register(SERVICE, "Slow", slow)
        server.register(SERVICE, "Echo", echo)
        h = Harness(server)
        client = await h.client()
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Slow", b"", timeout=0.1)
        assert info.value.code == Code.DEADLINE_EXCEEDED
        await asyncio.wait_for(cancelled.wait(), 2)
        # The connection is still usable afterwards.
        assert await client.call_raw(SERVICE, "Echo", b"ok", timeout=5) == b"ok"
        await client.close()
        await h.stop()

    run(main())


# --- 6./7. error statuses -------------------------------------------------------------


def test_unknown_service_and_method() -> None:
    async def main() -> None:
        h = Harness(echo_server())
        client = await h.client()
        with pytest.raises(TtrpcError) as info:
            await client.call_raw("carapace.x.v1.Foo", "Bar", b"")
        assert info.value.code == Code.UNIMPLEMENTED
        assert "carapace.x.v1.Foo" in info.value.message
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Bar", b"")
        assert info.value.code == Code.UNIMPLEMENTED
        assert "Bar" in info.value.message and SERVICE in info.value.message
        await client.close()
        await h.stop()

    run(main())


def test_handler_errors(caplog: pytest.LogCaptureFixture) -> None:
    async def not_found(payload: bytes) -> bytes:
        raise TtrpcError(Code.NOT_FOUND, "x")

    async def broken(payload: bytes) -> bytes:
        raise ValueError("bad value 42")

    async def not_bytes(payload: bytes) -> bytes:
        return 42  # type: ignore[return-value]

    async def main() -> None:
        server = Server()
        server.register(SERVICE, "NotFound", not_found)
        server.register(SERVICE, "Broken", broken)
        server.register(SERVICE, "NotBytes", not_bytes)
        h = Harness(server)
        client = await h.client()
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "NotFound", b"")
        assert (info.value.code, info.value.message) == (Code.NOT_FOUND, "x")
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Broken", b"")
        assert info.value.code == Code.UNKNOWN
        assert "bad value 42" in info.value.message
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "NotBytes", b"")
        assert info.value.code == Code.UNKNOWN
        await client.close()
        await h.stop()

    run(main())
    assert "bad value 42" in caplog.text


def test_invalid_request_envelope() -> None:
    async def main() -> None:
        h = Harness(echo_server())
        reader, writer = await h.start()
        writer.write(raw_frame(9, MSG_REQUEST, b"\xff\xff\xff"))
        stream_id, msg_type, _, body = await read_raw_frame(reader)
        assert (stream_id, msg_type) == (9, MSG_RESPONSE)
        assert ttrpc_pb2.Response.FromString(body).status.code == Code.INVALID_ARGUMENT
        writer.close()
        await h.stop()

    run(main())


# --- 8. oversize ------------------------------------------------------------------------


def test_client_refuses_oversize_request() -> None:
    async def main() -> None:
        (cr, cw), (pr, pw) = await stream_pair()
        client = Client(cr, cw)
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Echo", b"x" * MAX_MESSAGE_SIZE)
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert str(MAX_MESSAGE_SIZE) in info.value.message
        # Nothing was written, and the next call still gets stream id 1.
        task = asyncio.create_task(client.call_raw(SERVICE, "Echo", b"small"))
        stream_id, _, _, body = await read_raw_frame(pr)
        assert stream_id == 1
        assert ttrpc_pb2.Request.FromString(body).payload == b"small"
        pw.write(raw_frame(1, MSG_RESPONSE, ttrpc_pb2.Response(payload=b"r").SerializeToString()))
        assert await task == b"r"
        await client.close()
        pw.close()

    run(main())


def test_server_discards_oversize_frame_and_stays_in_sync() -> None:
    async def main() -> None:
        h = Harness(echo_server())
        reader, writer = await h.start()
        size = 5 << 20
        writer.write(raw_frame(1, MSG_REQUEST, os.urandom(size)))
        writer.write(raw_frame(3, MSG_REQUEST, request_bytes("Echo", b"still in sync")))
        await writer.drain()
        responses = {}
        for _ in range(2):
            stream_id, msg_type, _, body = await read_raw_frame(reader)
            assert msg_type == MSG_RESPONSE
            responses[stream_id] = ttrpc_pb2.Response.FromString(body)
        assert responses[1].status.code == Code.RESOURCE_EXHAUSTED
        assert responses[1].status.message == (
            f"message length {size} exceeds maximum message size 4194304"
        )
        assert responses[3].status.code == Code.OK
        assert responses[3].payload == b"still in sync"
        writer.close()
        await h.stop()

    run(main())


def test_server_refuses_oversize_response() -> None:
    async def huge(payload: bytes) -> bytes:
        return b"h" * (MAX_MESSAGE_SIZE + 1)

    async def main() -> None:
        server = echo_server()
        server.register(SERVICE, "Huge", huge)
        h = Harness(server)
        client = await h.client()
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Huge", b"")
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert await client.call_raw(SERVICE, "Echo", b"after") == b"after"
        await client.close()
        await h.stop()

    run(main())


# --- 9. close -----------------------------------------------------------------------


def test_pending_call_fails_when_peer_closes() -> None:
    async def main() -> None:
        (cr, cw), (pr, pw) = await stream_pair()
        client = Client(cr, cw)
        task = asyncio.create_task(client.call_raw(SERVICE, "Echo", b""))
        await read_raw_frame(pr)
        pw.close()
        with pytest.raises(TtrpcError) as info:
            await task
        assert info.value.code == Code.UNAVAILABLE
        await client.wait_closed()
        assert client.closed
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Echo", b"")
        assert info.value.code == Code.UNAVAILABLE
        await client.close()

    run(main())


def test_client_close_fails_pending_and_later_calls() -> None:
    async def main() -> None:
        release = asyncio.Event()
        handler_cancelled = asyncio.Event()

        async def wait(payload: bytes) -> bytes:
            try:
                await release.wait()
            finally:
                handler_cancelled.set()
            return payload

        server = Server()
        server.register(SERVICE, "Wait", wait)
        h = Harness(server)
        client = await h.client()
        pending = [asyncio.create_task(client.call_raw(SERVICE, "Wait", b"")) for _ in range(3)]
        await asyncio.sleep(0.05)
        await client.close()
        assert client.closed
        for task in pending:
            with pytest.raises(TtrpcError) as info:
                await task
            assert info.value.code == Code.UNAVAILABLE
            assert "ttrpc connection closed" in info.value.message
        await client.wait_closed()
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Wait", b"")
        assert info.value.code == Code.UNAVAILABLE
        # The server saw EOF: its connection loop ends and cancels the running handlers.
        assert h.task is not None
        await h.task
        assert handler_cancelled.is_set() and not release.is_set()
        await h.stop()

    run(main())


def test_serve_unix_and_server_close(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "ttrpc.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # leaves a stale socket file behind

        started = asyncio.Event()

        async def hang(payload: bytes) -> bytes:
            started.set()
            await asyncio.sleep(30)
            return payload

        server = echo_server()
        server.register(SERVICE, "Hang", hang)
        await server.serve_unix(path)
        client = await Client.connect_unix(path)
        other = await Client.connect_unix(path)
        assert await client.call_raw(SERVICE, "Echo", b"unix") == b"unix"
        assert await other.call_raw(SERVICE, "Echo", b"two") == b"two"
        task = asyncio.create_task(client.call_raw(SERVICE, "Hang", b""))
        await started.wait()
        await server.close()
        with pytest.raises(TtrpcError) as info:
            await task
        assert info.value.code == Code.UNAVAILABLE
        await client.wait_closed()
        await other.wait_closed()
        with pytest.raises(OSError):
            await Client.connect_unix(path)
        await client.close()
        await other.close()

    run(main())


# --- 10. many concurrent calls -------------------------------------------------------------


def test_many_concurrent_calls() -> None:
    async def main() -> None:
        rng = random.Random(1234)

        async def jittery_echo(payload: bytes) -> bytes:
            await asyncio.sleep(rng.random() * 0.01)
            return payload[::-1]

        server = Server()
        server.register(SERVICE, "Echo", jittery_echo)
        h = Harness(server)
        client = await h.client()
        block = rng.randbytes(2 << 20)
        payloads = []
        for i in range(200):
            start = rng.randint(0, 1 << 20)
            payloads.append(i.to_bytes(2, "big") + block[start : start + rng.randint(0, 1 << 20)])
        results = await asyncio.gather(
            *(client.call_raw(SERVICE, "Echo", p, timeout=8) for p in payloads)
        )
        assert [r == p[::-1] for r, p in zip(results, payloads, strict=True)] == [True] * 200
        await client.close()
        await h.stop()

    run(main())


# --- 11. typed handlers ------------------------------------------------------------------


def typed_server() -> Server:
    async def swap(req: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        return ttrpc_pb2.KeyValue(key=req.value, value=req.key)

    server = Server()
    server.register_typed(SERVICE, "Swap", ttrpc_pb2.KeyValue, swap)
    return server


def test_typed_handler() -> None:
    async def main() -> None:
        h = Harness(typed_server())
        client = await h.client()
        reply = await client.call(
            SERVICE, "Swap", ttrpc_pb2.KeyValue(key="k", value="v"), ttrpc_pb2.KeyValue
        )
        assert isinstance(reply, ttrpc_pb2.KeyValue)
        assert (reply.key, reply.value) == ("v", "k")
        await client.close()
        await h.stop()

    run(main())


def test_typed_handler_invalid_payload() -> None:
    async def main() -> None:
        h = Harness(typed_server())
        client = await h.client()
        with pytest.raises(TtrpcError) as info:
            await client.call_raw(SERVICE, "Swap", b"\xff\xff\xff")
        assert info.value.code == Code.INVALID_ARGUMENT
        assert "ttrpc.KeyValue" in info.value.message
        await client.close()
        await h.stop()

    run(main())


def test_client_requires_running_loop() -> None:
    with pytest.raises(RuntimeError):
        Client(None, None)  # type: ignore[arg-type]
