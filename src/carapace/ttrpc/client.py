"""asyncio ttrpc client: many concurrent calls multiplexed over one connection.

The server may be untrusted (the guest agent): anything no conforming server sends (a
frame of another type than a response, a response on a stream no request opened or
answered already, an oversize or garbled response) is a protocol violation. The
client then closes the connection, failing every pending call, and logs one line:
never a line per frame, never a read of an oversize frame's body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from carapace.protocols import ttrpc_pb2
from carapace.ttrpc.errors import Code, TtrpcError
from carapace.ttrpc.wire import (
    MAX_MESSAGE_SIZE,
    MSG_REQUEST,
    MSG_RESPONSE,
    Frame,
    ProtocolError,
    encode_frame,
    oversize_message,
    read_frame,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_MAX_STREAM_ID = (1 << 32) - 1
_CLOSED_MESSAGE = "ttrpc connection closed"


class Client:
    """A ttrpc client over an established stream.

    Must be constructed inside a running event loop: it starts a reader task
    that dispatches responses to the pending calls by stream id.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._next_stream_id = 1
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._closed_event = asyncio.Event()
        #: Calls given up on (deadline, cancellation) while their response was due: as
        #: many late responses may come and are dropped; any other is a violation.
        self._abandoned = 0
        #: Why the connection was closed, when the peer broke the protocol.
        self.violation = ""
        self._reader_task = loop.create_task(self._read_loop(), name="ttrpc-client-reader")

    @classmethod
    async def connect_unix(cls, path: str) -> Client:
        """Connect to a ttrpc server listening on a unix socket."""
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by close() or by the peer)."""
        return self._closed

    def _closed_error(self) -> TtrpcError:
        why = f": the peer broke the protocol ({self.violation})" if self.violation else ""
        return TtrpcError(Code.UNAVAILABLE, _CLOSED_MESSAGE + why)

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> M:
        """Call service/method with a protobuf request, parsing the reply as response_type."""
        payload = await self.call_raw(
            service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        response = response_type()
        try:
            response.ParseFromString(payload)
        except DecodeError as e:
            name = response_type.DESCRIPTOR.full_name
            raise TtrpcError(
                Code.INTERNAL, f"cannot parse {name} reply of {service}/{method}: {e}"
            ) from e
        return response

    async def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> bytes:
        """Call service/method with a raw payload, returning the raw reply payload."""
        if self._closed:
            raise self._closed_error()
        if timeout is not None and timeout <= 0:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: deadline exceeded")
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            request.timeout_nano = max(1, int(timeout * 1_000_000_000))
        if metadata:
            for key, value in metadata.items():
                request.metadata.add(key=key, value=value)
        body = request.SerializeToString()
        # Refuse an oversize request before a stream id is spent or anything is written.
        if len(body) > MAX_MESSAGE_SIZE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, oversize_message(len(body)))

        stream_id = self._next_stream_id
        if stream_id > _MAX_STREAM_ID:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, "ttrpc stream ids exhausted")
        self._next_stream_id += 2
        frame = encode_frame(stream_id, MSG_REQUEST, body)
        future: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await self._send(frame)
                response = await future
        except TimeoutError:
            if deadline.expired():
                raise TtrpcError(
                    Code.DEADLINE_EXCEEDED, f"{service}/{method}: deadline exceeded"
                ) from None
            raise
        finally:
            if self._pending.pop(stream_id, None) is not None and not self._closed:
                self._abandoned += 1  # its response may still come: not a violation
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # mark as retrieved when we bailed out early
        if response.status.code != Code.OK:
            raise TtrpcError.from_status(response.status)
        return response.payload

    async def _send(self, frame: bytes) -> None:
        async with self._write_lock:
            if self._closed or self._writer.is_closing():
                raise self._closed_error()
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                raise TtrpcError(Code.UNAVAILABLE, f"{_CLOSED_MESSAGE}: {e}") from e

    async def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(await read_frame(self._reader, discard_oversize=False))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ProtocolError as e:
            self.violation = str(e)
            log.warning("ttrpc client: closing the connection, the peer broke the protocol: %s", e)
        except Exception:
            log.exception("ttrpc client: reader failed")
        finally:
            self._shutdown()

    def _dispatch(self, frame: Frame) -> None:
        """Hand a response to its call; raises ProtocolError for anything else."""
        sid = frame.stream_id
        if frame.msg_type != MSG_RESPONSE:
            raise ProtocolError(
                f"a message of type {frame.msg_type} on stream {sid}; a server sends only "
                f"responses (type {MSG_RESPONSE})"
            )
        if sid % 2 == 0 or sid >= self._next_stream_id:
            raise ProtocolError(f"a response on stream {sid}, which no request opened")
        future = self._pending.get(sid)
        if future is None:
            if self._abandoned == 0:
                raise ProtocolError(f"a response on stream {sid}, which was answered already")
            self._abandoned -= 1  # the late answer of a call given up on
            log.debug("ttrpc client: dropping the late response on stream %d", sid)
            return
        assert frame.payload is not None  # oversize frames raised in read_frame
        response = ttrpc_pb2.Response()
        try:
            response.ParseFromString(frame.payload)
        except DecodeError as e:  # the call fails with the connection
            raise ProtocolError(f"an invalid response on stream {sid}: {e}") from e
        del self._pending[sid]
        if not future.done():  # else cancelled a moment ago: its call no longer waits
            future.set_result(response)

    def _shutdown(self) -> None:
        self._closed = True
        pending = list(self._pending.values())
        self._pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(self._closed_error())
        self._writer.close()
        self._closed_event.set()

    async def close(self) -> None:
        """Close the connection, failing every pending call with UNAVAILABLE."""
        self._shutdown()
        current = asyncio.current_task()
        if current is not self._reader_task and not self._reader_task.done():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def wait_closed(self) -> None:
        """Return once the connection is gone (peer EOF or close())."""
        await self._closed_event.wait()
