"""Port forwarding in the guest: the TCP ports something listens on (from
/proc/net/tcp and /proc/net/tcp6) and connections to them, relayed to the host by the
ListeningPorts, OpenPortConnection, WritePort, ReadPort and ClosePort verbs, the way
guest/stdio.py relays a process's streams.

Containers share the VM's network namespace (guest/spec.py), so the agent's view of
/proc/net is theirs. The tables are read only while the host waits in ListeningPorts
(the host's forwarder of a pod with a network namespace always does), at most once per
``SCAN_INTERVAL``: a port opened later is forwarded within about a second. Imported at the first
call of one of these verbs (guest/server.py), never on the way to "agent ready".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable

from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError

#: The kernel's tables of TCP sockets of the guest's network namespace.
PROC_TCP = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
#: ``st`` of a listening socket in those tables (TCP_LISTEN).
TCP_LISTEN = "0A"
#: The most often the tables are read while the host waits for a change (seconds).
SCAN_INTERVAL = 1.0
#: The longest a ListeningPorts call waits for a change (a longer timeout is cut).
MAX_WAIT_MS = 600_000
#: Connections open at once; one more is refused (RESOURCE_EXHAUSTED).
MAX_CONNECTIONS = 512
#: The most bytes one ReadPort answer carries.
READ_CHUNK = 1 << 20
#: How long a connection to a guest port may take to be made (seconds).
CONNECT_TIMEOUT = 10.0

#: (address, port) of a listening socket; the address as inet_ntop writes it.
Listener = tuple[str, int]


# -- the kernel's tables (pure) ------------------------------------------------------


def _address(text: str, family: int) -> bytes:
    """The raw address of a /proc/net/tcp{,6} field: 32-bit words in the kernel's
    (the guest's native) byte order."""
    size = 4 if family == socket.AF_INET else 16
    if len(text) != 2 * size:
        raise ValueError(f"address {text!r}: {len(text)} hex digits, expected {2 * size}")
    return b"".join(struct.pack("=I", int(text[i : i + 8], 16)) for i in range(0, 2 * size, 8))


def parse_listeners(text: str, family: int) -> list[Listener]:
    """The listening sockets of /proc/net/tcp (``family`` AF_INET) or tcp6 (AF_INET6);
    lines that are not a well-formed socket entry are skipped."""
    out: list[Listener] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != TCP_LISTEN:
            continue
        address, sep, port = fields[1].partition(":")
        try:
            if not sep or len(port) != 4:
                raise ValueError(port)
            out.append((socket.inet_ntop(family, _address(address, family)), int(port, 16)))
        except ValueError:
            continue
    return out


def ports_of(listeners: list[Listener]) -> list[int]:
    """The ports of ``listeners``, sorted, each once (port 0 is no port)."""
    return sorted({port for _, port in listeners if port})


def connect_addresses(listeners: list[Listener], port: int) -> list[str]:
    """Where to connect to reach ``port``: loopback where the socket accepts it (a
    wildcard or loopback address; IPv4 first), then the specific addresses it listens
    on. An IPv6 link-local address is left out: /proc/net/tcp6 does not give its
    interface."""
    loopback: list[str] = []
    others: list[str] = []
    for address, p in listeners:
        if p != port:
            continue
        if ":" in address:
            if address.startswith("::ffff:") and "." in address:  # IPv4-mapped
                address = address[len("::ffff:") :]
            elif address == "::":
                loopback.append("::1")
                continue
            elif address == "::1":
                loopback.append(address)
                continue
            elif address.lower().startswith(("fe8", "fe9", "fea", "feb")):
                continue
            else:
                others.append(address)
                continue
        if address == "0.0.0.0":
            loopback.append("127.0.0.1")
        elif address.startswith("127."):
            loopback.append(address)
        else:
            others.append(address)
    loopback.sort(key=lambda a: ":" in a)  # IPv4 before IPv6
    return list(dict.fromkeys(loopback + others))


def read_listeners() -> list[Listener]:
    """The guest's listening TCP sockets, IPv4 and IPv6 (a table the kernel lacks,
    IPv6 when it is off, reads as empty)."""
    out: list[Listener] = []
    for path, family in PROC_TCP:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        out += parse_listeners(text, family)
    return out


# -- the verbs ----------------------------------------------------------------------


class PortConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reading = False


class PortService:
    """ListeningPorts, OpenPortConnection, WritePort, ReadPort, ClosePort."""

    def __init__(self, read: Callable[[], list[Listener]] = read_listeners) -> None:
        self._read_listeners = read
        self.connections: dict[int, PortConnection] = {}
        self._next_id = 1
        self._scanned: list[Listener] = []
        self._scanned_at: float | None = None

    def scan(self, fresh: bool = False) -> list[Listener]:
        """The listening sockets, read at most once per SCAN_INTERVAL unless ``fresh``."""
        now = time.monotonic()
        if fresh or self._scanned_at is None or now - self._scanned_at >= SCAN_INTERVAL:
            self._scanned = self._read_listeners()
            self._scanned_at = now
        return self._scanned

    async def listening_ports(self, req: pb.ListeningPortsRequest) -> pb.ListeningPortsResponse:
        known = list(req.known_ports)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(req.timeout_ms, MAX_WAIT_MS) / 1000
        while True:
            ports = ports_of(self.scan())
            left = deadline - loop.time()
            if ports != known or left <= 0:
                return pb.ListeningPortsResponse(ports=ports)
            await asyncio.sleep(min(SCAN_INTERVAL, left))

    async def open_port_connection(
        self, req: pb.OpenPortConnectionRequest
    ) -> pb.OpenPortConnectionResponse:
        port = req.port
        if not 1 <= port <= 65535:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"port: {port} is out of range; accepted: 1 to 65535"
            )
        if len(self.connections) >= MAX_CONNECTIONS:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"{MAX_CONNECTIONS} port connections are open already; close one first",
            )
        addresses = connect_addresses(self.scan(fresh=True), port)
        if not addresses:
            raise TtrpcError(Code.NOT_FOUND, f"nothing listens on TCP port {port} in the guest")
        errors: list[str] = []
        for address in addresses:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                errors.append(f"{address}: {e or type(e).__name__}")
                continue
            if len(self.connections) >= MAX_CONNECTIONS:  # others were opened meanwhile
                writer.close()
                raise TtrpcError(Code.RESOURCE_EXHAUSTED, f"{MAX_CONNECTIONS} port connections")
            cid = self._next_id
            self._next_id += 1
            self.connections[cid] = PortConnection(reader, writer)
            return pb.OpenPortConnectionResponse(connection_id=cid)
        raise TtrpcError(
            Code.UNAVAILABLE, f"cannot connect to TCP port {port} in the guest: {'; '.join(errors)}"
        )

    def connection(self, cid: int) -> PortConnection:
        c = self.connections.get(cid)
        if c is None:
            raise TtrpcError(Code.NOT_FOUND, f"port connection {cid} not found")
        return c

    async def write_port(self, req: pb.WritePortRequest) -> pb.WriteStreamResponse:
        writer = self.connection(req.connection_id).writer
        if writer.is_closing():
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"port connection {req.connection_id} is closed"
            )
        try:
            writer.write(req.data)
            await writer.drain()
        except (ConnectionError, OSError, RuntimeError) as e:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"port connection {req.connection_id}: {e}"
            ) from e
        return pb.WriteStreamResponse(len=len(req.data))

    async def read_port(self, req: pb.ReadPortRequest) -> pb.ReadStreamResponse:
        c = self.connection(req.connection_id)
        if c.reading:
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"port connection {req.connection_id} is being read already",
            )
        c.reading = True
        try:
            data = await c.reader.read(min(req.len or READ_CHUNK, READ_CHUNK))
        except (ConnectionError, OSError):
            data = b""  # reset by the guest's end: nothing more comes
        finally:
            c.reading = False
        return pb.ReadStreamResponse(data=data, eof=not data or c.reader.at_eof())

    async def close_port(self, req: pb.ClosePortRequest) -> pb.Empty:
        cid = req.connection_id
        c = self.connection(cid)
        if req.write_only:
            if not c.writer.is_closing() and c.writer.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    c.writer.write_eof()
            return pb.Empty()
        del self.connections[cid]
        c.writer.close()
        return pb.Empty()
