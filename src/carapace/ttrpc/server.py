"""asyncio ttrpc server: each request is handled in its own task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from carapace.protocols import status_pb2, ttrpc_pb2
from carapace.ttrpc.errors import Code, TtrpcError
from carapace.ttrpc.ratelimit import RateLimitedLog
from carapace.ttrpc.wire import (
    MAX_MESSAGE_SIZE,
    MSG_REQUEST,
    MSG_RESPONSE,
    encode_frame,
    oversize_message,
    read_frame,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

Handler = Callable[[bytes], Awaitable[bytes]]
"""A method implementation: raw request payload -> raw response payload."""


class _Connection:
    """Per-connection state: the writer, its write lock and the running handlers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.write_lock = asyncio.Lock()
        self.handlers: set[asyncio.Task[None]] = set()
        #: A line per peer and interval about frames that are not requests (ignored,
        #: as containerd's ttrpc does, for what later versions may send).
        self.ignored = RateLimitedLog(log)

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    async def send(self, stream_id: int, response: ttrpc_pb2.Response) -> None:
        body = response.SerializeToString()
        if len(body) > MAX_MESSAGE_SIZE:
            error = TtrpcError(Code.RESOURCE_EXHAUSTED, f"response {oversize_message(len(body))}")
            body = ttrpc_pb2.Response(status=error.to_status()).SerializeToString()
        frame = encode_frame(stream_id, MSG_RESPONSE, body)
        async with self.write_lock:
            if self.writer.is_closing():
                log.debug("ttrpc server: connection closed, dropping response %d", stream_id)
                return
            try:
                self.writer.write(frame)
                await self.writer.drain()
            except (ConnectionError, OSError) as e:
                log.debug("ttrpc server: failed to write response %d: %s", stream_id, e)

    async def send_error(self, stream_id: int, error: TtrpcError) -> None:
        await self.send(stream_id, ttrpc_pb2.Response(status=error.to_status()))


class Server:
    """A ttrpc server; register methods, then serve connections."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Handler]] = {}
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    def register(self, service: str, method: str, handler: Handler) -> None:
        """Register a raw handler for service/method (replacing any previous one)."""
        self._services.setdefault(service, {})[method] = handler

    def register_typed(
        self,
        service: str,
        method: str,
        request_type: type[M],
        handler: Callable[[M], Awaitable[Message]],
    ) -> None:
        """Register a handler taking a parsed request_type and returning a message."""
        full_name = request_type.DESCRIPTOR.full_name

        async def raw(payload: bytes) -> bytes:
            request = request_type()
            try:
                request.ParseFromString(payload)
            except DecodeError as e:
                raise TtrpcError(
                    Code.INVALID_ARGUMENT, f"cannot parse {full_name} for {service}/{method}: {e}"
                ) from e
            reply = await handler(request)
            return reply.SerializeToString()

        self.register(service, method, raw)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection; returns when the peer closes it or the server closes.

        Only uses the given reader/writer, so it works over any stream (unix
        socket, pipes wrapping a character device, ...).
        """
        if self._closing:
            writer.close()
            return
        task = asyncio.create_task(
            self._run_connection(_Connection(reader, writer)), name="ttrpc-server-connection"
        )
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                return  # stopped by Server.close(), not by our caller
            raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def serve_unix(self, path: str) -> None:
        """Start listening on a unix socket at path (a stale socket file is removed);
        the socket is mode 0600 before it listens, whatever the umask."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            listener = await asyncio.start_unix_server(self.serve_connection, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._listeners.append(listener)

    async def close(self) -> None:
        """Stop listening, close every connection and wait for them to finish."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.gather(*connections, return_exceptions=True)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()

    async def _run_connection(self, conn: _Connection) -> None:
        try:
            while True:
                try:
                    frame = await read_frame(conn.reader)
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    return
                if frame.payload is None:
                    conn.spawn(
                        conn.send_error(
                            frame.stream_id,
                            TtrpcError(Code.RESOURCE_EXHAUSTED, oversize_message(frame.length)),
                        ),
                        f"ttrpc-oversize-{frame.stream_id}",
                    )
                    continue
                if frame.msg_type != MSG_REQUEST:
                    conn.ignored(
                        "ttrpc server: ignoring message type %d on stream %d",
                        frame.msg_type,
                        frame.stream_id,
                    )
                    continue
                conn.spawn(
                    self._handle(conn, frame.stream_id, frame.payload),
                    f"ttrpc-request-{frame.stream_id}",
                )
        finally:
            handlers = list(conn.handlers)
            for handler in handlers:
                handler.cancel()
            if handlers:
                await asyncio.gather(*handlers, return_exceptions=True)
            conn.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.wait_closed()

    async def _handle(self, conn: _Connection, stream_id: int, payload: bytes) -> None:
        try:
            reply = await self._dispatch(payload)
            response = ttrpc_pb2.Response(status=status_pb2.Status(code=Code.OK), payload=reply)
        except TtrpcError as e:
            response = ttrpc_pb2.Response(status=e.to_status())
        except Exception as e:  # e.g. a handler returning something that is not bytes
            log.exception("ttrpc server: cannot build the response for stream %d", stream_id)
            response = ttrpc_pb2.Response(status=TtrpcError(Code.UNKNOWN, _describe(e)).to_status())
        await conn.send(stream_id, response)

    async def _dispatch(self, payload: bytes) -> bytes:
        request = ttrpc_pb2.Request()
        try:
            request.ParseFromString(payload)
        except DecodeError as e:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid ttrpc request: {e}") from e
        methods = self._services.get(request.service)
        if methods is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"unknown service {request.service}")
        handler = methods.get(request.method)
        if handler is None:
            raise TtrpcError(
                Code.UNIMPLEMENTED, f"unknown method {request.method} of service {request.service}"
            )
        name = f"{request.service}/{request.method}"
        timeout = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await handler(request.payload)
        except TtrpcError:
            raise
        except TimeoutError as e:
            if deadline.expired():
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{name}: deadline exceeded") from None
            log.exception("ttrpc server: handler %s failed", name)
            raise TtrpcError(Code.UNKNOWN, _describe(e)) from e
        except Exception as e:
            log.exception("ttrpc server: handler %s failed", name)
            raise TtrpcError(Code.UNKNOWN, _describe(e)) from e


def _describe(error: BaseException) -> str:
    text = str(error)
    return text if text else type(error).__name__
