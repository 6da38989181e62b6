"""A client of the kubelet streaming protocol over WebSocket (what ``kubectl exec -it``
and ``kubectl attach -it`` speak to the URL a CRI Exec or Attach returns).

Standard library only: an HTTP/1.1 upgrade (RFC 6455 handshake) and binary frames,
masked as a client's must be. Each message starts with a channel byte
(k8s.io/apiserver's wsstream): 0 stdin, 1 stdout, 2 stderr, 3 the error channel (with
``v4.channel.k8s.io``: a ``metav1.Status`` in JSON once the process ended; with
``channel.k8s.io``: an error's text), 4 terminal resizes (JSON ``{"Width", "Height"}``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
V4 = "v4.channel.k8s.io"
V1 = "channel.k8s.io"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class StreamError(RuntimeError):
    """The streaming server refused the upgrade or broke the protocol."""


class KubeStream:
    """One WebSocket session on a streaming URL (``http://host:port/exec/TOKEN``).

    ``output[ch]`` holds every byte received on channel ``ch``; ``closed`` turns true
    once the server closed the session."""

    def __init__(
        self, url: str, protocols: Sequence[str] = (V4, V1), timeout: float = 60.0
    ) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or u.hostname is None or u.port is None:
            raise StreamError(f"streaming URL {url!r}: accepted: http://HOST:PORT/PATH")
        self.url = url
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self.output: dict[int, bytearray] = {ch: bytearray() for ch in range(5)}
        self.closed = False
        self._buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + (f"?{u.query}" if u.query else "")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {', '.join(protocols)}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status, *lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if status.split()[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            self.sock.close()
            raise StreamError(f"{url}: no WebSocket upgrade: {head!r}")
        #: the subprotocol the server chose
        self.protocol = headers.get("sec-websocket-protocol", "")

    # -- frames ------------------------------------------------------------------------

    def _read_until(self, end: bytes) -> bytes:
        while end not in self._buf:
            self._fill()
        head, _, self._buf = self._buf.partition(end)
        return head

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the streaming server closed the connection")
        self._buf += data

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _recv_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._take(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        mask = self._take(4) if b1 & 0x80 else b""
        payload = self._take(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def _recv_message(self) -> bytes | None:
        """The next data message (fragments joined); None once the server closed."""
        parts: list[bytes] = []
        while True:
            fin, opcode, payload = self._recv_frame()
            if opcode == _PING:
                self._send_frame(_PONG, payload)
            elif opcode == _CLOSE:
                self.closed = True
                with contextlib.suppress(OSError):
                    self._send_frame(_CLOSE, payload[:2])
                return None
            elif opcode in (_TEXT, _BINARY, _CONT):
                parts.append(payload)
                if fin:
                    return b"".join(parts)
            elif opcode != _PONG:
                raise StreamError(f"{self.url}: unknown WebSocket opcode {opcode:#x}")

    # -- channels ----------------------------------------------------------------------

    def send(self, channel: int, data: bytes) -> None:
        self._send_frame(_BINARY, bytes([channel]) + data)

    def write(self, text: str) -> None:
        """Type ``text`` on stdin."""
        self.send(STDIN, text.encode())

    def resize(self, width: int, height: int) -> None:
        self.send(RESIZE, json.dumps({"Width": width, "Height": height}).encode())

    def pump(self) -> bool:
        """Receive one message into ``output``; False once the session is over."""
        if self.closed:
            return False
        try:
            msg = self._recv_message()
        except EOFError:
            self.closed = True
            return False
        if msg is None:
            return False
        if msg:
            self.output[msg[0]] += msg[1:]
        return True

    def read_until(self, channel: int, needle: bytes, timeout: float = 60.0) -> bytes:
        """Receive until ``needle`` is in ``output[channel]``; that channel's output."""
        deadline = time.monotonic() + timeout
        while needle not in self.output[channel]:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise StreamError(
                    f"{needle!r} not seen on channel {channel} "
                    f"({'closed' if self.closed else f'{timeout:g} s'}); "
                    f"received: {self.received()}"
                )
            self.sock.settimeout(left)
            try:
                self.pump()
            except TimeoutError:
                continue
        return bytes(self.output[channel])

    def read_to_end(self, timeout: float = 60.0) -> dict[int, bytes]:
        """Receive until the server ends the session; every channel's output."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamError(f"the session did not end in {timeout:g} s: {self.received()}")
            self.sock.settimeout(left)
            try:
                self.pump()
            except TimeoutError:
                continue
        return {ch: bytes(data) for ch, data in self.output.items()}

    def status(self) -> dict[str, Any]:
        """The v4 Status JSON the server sent on the error channel."""
        text = bytes(self.output[ERROR]).decode()
        try:
            status = json.loads(text)
        except ValueError as e:
            raise StreamError(f"the error channel holds no Status JSON: {text!r}") from e
        if not isinstance(status, dict):
            raise StreamError(f"the error channel holds no Status object: {text!r}")
        return status

    def received(self) -> dict[int, bytes]:
        return {ch: bytes(d) for ch, d in self.output.items() if d}

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self._send_frame(_CLOSE, struct.pack("!H", 1000))
            self.closed = True
        self.sock.close()

    def __enter__(self) -> KubeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exit_code(status: dict[str, Any]) -> int:
    """The exit code a v4 Status reports: 0 for Success, else the ExitCode cause's."""
    if status.get("status") == "Success":
        return 0
    for cause in status.get("details", {}).get("causes", []):
        if cause.get("reason") == "ExitCode":
            return int(cause["message"])
    raise StreamError(f"a Status without an exit code: {status}")
