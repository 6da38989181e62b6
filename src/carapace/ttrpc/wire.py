"""ttrpc 1.x framing: pure encode/decode helpers and a frame reader.

Every message is a 10-byte big-endian header (u32 payload length, u32 stream
id, u8 message type, u8 flags) followed by the payload.
"""

from __future__ import annotations

import asyncio
import struct
from typing import NamedTuple

from carapace.ttrpc.errors import Code, TtrpcError

HEADER_SIZE = 10
MAX_MESSAGE_SIZE = 4 << 20
MSG_REQUEST = 1
MSG_RESPONSE = 2
MSG_DATA = 3

_HEADER = struct.Struct(">IIBB")
_DISCARD_CHUNK = 64 << 10


class ProtocolError(Exception):
    """The peer sent what no conforming peer sends (an oversize or garbled frame, a
    message of the wrong type, a response to no request): the connection is broken."""


class Frame(NamedTuple):
    """One frame as read off the wire.

    ``length`` is the length announced by the header; ``payload`` is None when
    that length exceeded MAX_MESSAGE_SIZE (the bytes were read and discarded).
    """

    length: int
    stream_id: int
    msg_type: int
    payload: bytes | None


def encode_header(length: int, stream_id: int, msg_type: int, flags: int = 0) -> bytes:
    """Encode a frame header."""
    return _HEADER.pack(length, stream_id, msg_type, flags)


def decode_header(data: bytes) -> tuple[int, int, int, int]:
    """Decode a header into (length, stream_id, msg_type, flags)."""
    if len(data) != HEADER_SIZE:
        raise ValueError(f"ttrpc header must be {HEADER_SIZE} bytes, got {len(data)}")
    length, stream_id, msg_type, flags = _HEADER.unpack(data)
    return length, stream_id, msg_type, flags


def oversize_message(length: int) -> str:
    """The error text for a message that exceeds MAX_MESSAGE_SIZE."""
    return f"message length {length} exceeds maximum message size {MAX_MESSAGE_SIZE}"


def encode_frame(stream_id: int, msg_type: int, payload: bytes) -> bytes:
    """Encode a complete frame; refuses payloads larger than MAX_MESSAGE_SIZE."""
    if len(payload) > MAX_MESSAGE_SIZE:
        raise TtrpcError(Code.RESOURCE_EXHAUSTED, oversize_message(len(payload)))
    return encode_header(len(payload), stream_id, msg_type) + payload


async def read_frame(reader: asyncio.StreamReader, discard_oversize: bool = True) -> Frame:
    """Read one frame.

    Returns ``Frame(length, stream_id, msg_type, payload)``. An oversize payload
    is consumed and dropped (so the stream stays in sync) and reported as
    ``payload=None``; with ``discard_oversize=False`` it is a ``ProtocolError``
    instead, raised before any of it is read. Raises asyncio.IncompleteReadError on EOF.
    """
    length, stream_id, msg_type, _flags = decode_header(await reader.readexactly(HEADER_SIZE))
    if length > MAX_MESSAGE_SIZE and not discard_oversize:
        raise ProtocolError(f"a frame on stream {stream_id}: {oversize_message(length)}")
    if length > MAX_MESSAGE_SIZE:
        remaining = length
        while remaining:
            chunk = min(remaining, _DISCARD_CHUNK)
            await reader.readexactly(chunk)
            remaining -= chunk
        return Frame(length, stream_id, msg_type, None)
    payload = await reader.readexactly(length) if length else b""
    return Frame(length, stream_id, msg_type, payload)
