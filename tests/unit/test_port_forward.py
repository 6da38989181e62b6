"""Port forwarding (kubectl port-forward): the guest's reading of /proc/net/tcp{,6},
its port verbs (ListeningPorts, OpenPortConnection, WritePort, ReadPort, ClosePort)
against real loopback sockets, the host's checks of what the guest says, and the host's
forwarder relaying through a real AgentClient and ttrpc server (its listeners bound in
the test's own namespace, on ports of their own)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.agent.client import AgentClient
from carapace.errors import AgentError
from carapace.guest import ports as guest_ports
from carapace.guest.ports import (
    PortService,
    connect_addresses,
    parse_listeners,
    ports_of,
)
from carapace.guest.server import Agent, guard
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import AGENT_SERVICE as SERVICE
from carapace.sandbox import portforward
from carapace.sandbox.netplan import NetworkPlan
from carapace.sandbox.portforward import PortForwarder, checked_ports, port_changes
from carapace.ttrpc import Code, Server, TtrpcError
from tests.tooling.agent_link import client_of

T = TypeVar("T")

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)
TAIL = " 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0"
#: /proc/net/tcp of a little-endian guest: 0.0.0.0:80 and 127.0.0.1:8080 listen, an
#: established connection from 10.0.0.5:80, a line cut short, a malformed address
TCP4 = (
    HEADER
    + f"   0: 00000000:0050 00000000:0000 0A{TAIL}\n"
    + f"   1: 0100007F:1F90 00000000:0000 0A{TAIL}\n"
    + f"   2: 0500000A:0050 0600000A:D431 01{TAIL}\n"
    + "   3: 0100007F:1F91\n"
    + f"   4: 0100007:1F92 00000000:0000 0A{TAIL}\n"
)
#: /proc/net/tcp6: [::]:443, [::1]:9000, [::ffff:127.0.0.1]:7000, [fe80::1]:22
ANY6 = "0" * 32
TCP6 = HEADER + "".join(
    f"   {i}: {address}:{port} {ANY6}:0000 0A{TAIL}\n"
    for i, (address, port) in enumerate(
        [
            (ANY6, "01BB"),
            ("00000000000000000000000001000000", "2328"),
            ("0000000000000000FFFF00000100007F", "1B58"),
            ("000080FE000000000000000001000000", "0016"),
        ]
    )
)

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="the sample tables are a little-endian kernel's"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


# -- the guest's tables (pure) --------------------------------------------------------------


@little_endian
def test_listening_sockets_are_read_from_both_tables() -> None:
    assert parse_listeners(TCP4, socket.AF_INET) == [("0.0.0.0", 80), ("127.0.0.1", 8080)]
    assert parse_listeners(TCP6, socket.AF_INET6) == [
        ("::", 443),
        ("::1", 9000),
        ("::ffff:127.0.0.1", 7000),
        ("fe80::1", 22),
    ]
    assert parse_listeners("", socket.AF_INET) == []
    assert parse_listeners(HEADER + "garbage\n", socket.AF_INET) == []


def test_ports_are_sorted_and_each_once() -> None:
    listeners = [("0.0.0.0", 80), ("::", 80), ("127.0.0.1", 22), ("0.0.0.0", 0)]
    assert ports_of(listeners) == [22, 80]


def test_loopback_is_tried_first_then_the_listen_address() -> None:
    listeners = [
        ("::", 80),
        ("0.0.0.0", 80),
        ("10.0.0.5", 81),
        ("::ffff:127.0.0.1", 82),
        ("fd00::5", 83),
        ("fe80::1", 84),
        ("127.0.0.2", 85),
        ("::1", 86),
    ]
    assert connect_addresses(listeners, 80) == ["127.0.0.1", "::1"]
    assert connect_addresses(listeners, 81) == ["10.0.0.5"]
    assert connect_addresses(listeners, 82) == ["127.0.0.1"]
    assert connect_addresses(listeners, 83) == ["fd00::5"]
    assert connect_addresses(listeners, 84) == []  # link-local: no interface known
    assert connect_addresses(listeners, 85) == ["127.0.0.2"]
    assert connect_addresses(listeners, 86) == ["::1"]
    assert connect_addresses(listeners, 99) == []


# -- the host's checks (pure) -----------------------------------------------------------------


def test_reported_ports_out_of_range_are_set_apart() -> None:
    assert checked_ports([8080, 80, 0, 80, 70000, 65535]) == ([80, 8080, 65535], [0, 70000])
    assert checked_ports([]) == ([], [])


def test_changes_open_the_new_ports_and_close_the_gone_ones() -> None:
    assert port_changes([80, 8080], [80, 9090]) == ([9090], [8080])
    assert port_changes([], [443, 80]) == ([80, 443], [])
    assert port_changes([80], []) == ([], [80])
    assert port_changes([80], [80]) == ([], [])
    # at most ``limit`` listeners: the lowest ports
    assert port_changes([], range(1, 11), limit=3) == ([1, 2, 3], [])
    assert port_changes([9, 10], range(1, 11), limit=3) == ([1, 2, 3], [9, 10])


def test_no_forwarder_without_a_network_namespace() -> None:
    for plan in (NetworkPlan("none"), NetworkPlan("user")):
        fw = PortForwarder(plan, "pod")
        assert fw.netns == ""

        async def go(fw: PortForwarder = fw) -> None:
            fw.start(None)  # type: ignore[arg-type]  # never used: nothing starts
            assert fw._watch is None
            await fw.stop()

        run(go())
    assert PortForwarder(NetworkPlan("netns", "/var/run/netns/x"), "pod").netns == (
        "/var/run/netns/x"
    )


# -- the guest's verbs, served over ttrpc to a real AgentClient -------------------------------


class Tables:
    """What the guest's /proc/net/tcp says, as the test sets it; counts its readings."""

    def __init__(self) -> None:
        self.listeners: list[tuple[str, int]] = []
        self.reads = 0

    def __call__(self) -> list[tuple[str, int]]:
        self.reads += 1
        return list(self.listeners)


def port_server(service: PortService) -> Server:
    server = Server()
    for name, req, method in (
        ("ListeningPorts", pb.ListeningPortsRequest, service.listening_ports),
        ("OpenPortConnection", pb.OpenPortConnectionRequest, service.open_port_connection),
        ("WritePort", pb.WritePortRequest, service.write_port),
        ("ReadPort", pb.ReadPortRequest, service.read_port),
        ("ClosePort", pb.ClosePortRequest, service.close_port),
    ):
        server.register_typed(SERVICE, name, req, guard(name, method))  # type: ignore[arg-type]
    return server


@asynccontextmanager
async def guest(tmp_path: Path) -> AsyncIterator[tuple[Tables, PortService, AgentClient]]:
    tables = Tables()
    service = PortService(tables)
    async with client_of(port_server(service), tmp_path) as client:
        yield tables, service, client


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that sends back what it reads, then closes at EOF."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_the_agent_serves_the_port_verbs() -> None:
    names = {name for name, _, _ in Agent().methods}
    assert {"ListeningPorts", "OpenPortConnection", "WritePort", "ReadPort", "ClosePort"} <= names


def test_listening_ports_answers_a_change_at_once_and_waits_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_ports, "SCAN_INTERVAL", 0.05)

    async def go() -> None:
        async with guest(tmp_path) as (tables, _, client):
            tables.listeners = [("0.0.0.0", 80), ("::", 80), ("127.0.0.1", 22)]
            assert await client.listening_ports([], 30) == [22, 80]  # differs: at once
            # the same as known: answered when the wait is over, with the same set
            assert await client.listening_ports([22, 80], 0.2) == [22, 80]
            # a port opened while the host waits is answered without the whole wait
            call = asyncio.ensure_future(client.listening_ports([22, 80], 30))
            await asyncio.sleep(0.1)
            assert not call.done()
            tables.listeners.append(("0.0.0.0", 8080))
            assert await asyncio.wait_for(call, 5) == [22, 80, 8080]

    run(go())


def test_the_tables_are_read_only_while_a_watcher_waits(tmp_path: Path) -> None:
    async def go() -> None:
        async with guest(tmp_path) as (tables, _, client):
            await asyncio.sleep(0.3)
            assert tables.reads == 0  # nobody asked: nothing read
            await client.listening_ports([], 1.2)  # the same (empty) set: the whole wait
            # at most one reading per SCAN_INTERVAL while it waited
            assert 2 <= tables.reads <= 1.2 / guest_ports.SCAN_INTERVAL + 2
            reads = tables.reads
            await asyncio.sleep(0.6)
            assert tables.reads == reads

    run(go())


def test_a_connection_carries_bytes_both_ways_and_passes_a_half_close(tmp_path: Path) -> None:
    async def go() -> None:
        async with guest(tmp_path) as (tables, service, client), echo_server() as port:
            tables.listeners = [("0.0.0.0", port)]
            cid = await client.open_port(port)
            assert cid != 0 and list(service.connections) == [cid]
            payload = os.urandom(300_000)
            await client.write_port(cid, payload)
            await client.close_port(cid, write_only=True)  # the echo server reads EOF
            got = b""
            while True:
                data, eof = await client.read_port(cid, 65536)
                assert len(data) <= 65536
                got += data
                if eof:
                    break
            assert got == payload
            await client.close_port(cid)
            assert service.connections == {}
            with pytest.raises(AgentError, match=f"port connection {cid} not found"):
                await client.read_port(cid, 10)

    run(go())


def test_bad_requests_are_refused_naming_what_was_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_ports, "MAX_CONNECTIONS", 2)

    async def go() -> None:
        async with guest(tmp_path) as (tables, service, client), echo_server() as port:
            with pytest.raises(AgentError, match="port: 0 is out of range; accepted: 1 to 65535"):
                await client.open_port(0)
            with pytest.raises(AgentError, match=f"nothing listens on TCP port {port}"):
                await client.open_port(port)
            for verb in (
                client.write_port(77, b"x"),
                client.read_port(77, 10),
                client.close_port(77),
            ):
                with pytest.raises(AgentError, match="port connection 77 not found"):
                    await verb
            tables.listeners = [("127.0.0.1", port)]
            a = await client.open_port(port)
            b = await client.open_port(port)
            assert a != b
            with pytest.raises(AgentError, match="2 port connections are open already"):
                await client.open_port(port)
            # one reader at a time per connection
            first = asyncio.ensure_future(client.read_port(a, 10))
            await asyncio.sleep(0.1)
            with pytest.raises(AgentError, match=f"port connection {a} is being read already"):
                await client.read_port(a, 10)
            await client.close_port(a)  # the pending read ends with the connection
            assert await asyncio.wait_for(first, 5) == (b"", True)
            await client.close_port(b)
            assert service.connections == {}

    run(go())


class LyingAgent:
    """Replies no honest agent gives."""

    def __init__(self) -> None:
        self.server = Server()

        async def open_port(req: pb.OpenPortConnectionRequest) -> pb.OpenPortConnectionResponse:
            return pb.OpenPortConnectionResponse(connection_id=0)

        async def read_port(req: pb.ReadPortRequest) -> pb.ReadStreamResponse:
            return pb.ReadStreamResponse(data=b"x" * (req.len + 1))

        self.server.register_typed(
            SERVICE, "OpenPortConnection", pb.OpenPortConnectionRequest, open_port
        )
        self.server.register_typed(SERVICE, "ReadPort", pb.ReadPortRequest, read_port)


def test_the_client_refuses_an_id_0_and_a_read_longer_than_asked(tmp_path: Path) -> None:
    async def go() -> None:
        async with client_of(LyingAgent().server, tmp_path) as client:
            with pytest.raises(AgentError, match="connection id 0"):
                await client.open_port(80)
            with pytest.raises(AgentError, match="11 bytes, more than the 10 asked"):
                await client.read_port(5, 10)

    run(go())


# -- the host's forwarder, end to end (listeners in the test's namespace) --------------------


class Listen:
    """Binds each guest port's listener on a free port of 127.0.0.1 (the guest's
    services listen on the real one in the same namespace here); refuses ``taken``."""

    def __init__(self, taken: int = 0) -> None:
        self.taken = taken
        self.bound: dict[int, int] = {}  # guest port -> host port
        self.made: list[socket.socket] = []

    def __call__(
        self, netns: str, address: str, ports: list[int]
    ) -> dict[int, socket.socket | OSError]:
        assert netns == "/run/netns/test" and address == "127.0.0.1"
        out: dict[int, socket.socket | OSError] = {}
        for port in ports:
            if port == self.taken:
                out[port] = OSError(98, "Address already in use")
                continue
            sock = socket.socket()
            sock.bind((address, 0))
            sock.listen()
            sock.setblocking(False)
            self.bound[port] = sock.getsockname()[1]
            self.made.append(sock)
            out[port] = sock
        return out


async def until(cond: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def fetch(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


def test_the_forwarder_follows_the_guest_ports_and_relays_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_ports, "SCAN_INTERVAL", 0.05)
    listen = Listen(taken=2222)

    async def go() -> None:
        async with guest(tmp_path) as (tables, service, client), echo_server() as port:
            fw = PortForwarder(NetworkPlan("netns", "/run/netns/test"), "pod", listen)
            fw.start(client)
            try:
                tables.listeners = [("0.0.0.0", port), ("0.0.0.0", 2222)]
                await until(lambda: fw.ports == [port])
                assert fw._unbound == {2222}  # in use in the namespace: left, logged
                payload = os.urandom(1 << 20)
                got = await asyncio.gather(*(fetch(listen.bound[port], payload) for _ in range(3)))
                assert got == [payload] * 3
                await until(lambda: service.connections == {})  # each closed in the guest
                # the guest stops listening: so does the host
                tables.listeners = []
                await until(lambda: all(s.fileno() == -1 for s in listen.made))
                assert fw.ports == [] and fw._unbound == set()
                tables.listeners = [("127.0.0.1", port)]
                await until(lambda: fw.ports == [port])
            finally:
                await fw.stop()
            assert fw.ports == [] and fw._watch is None and fw._relays == set()
            assert all(s.fileno() == -1 for s in listen.made)

    run(go())


def test_a_connection_to_a_port_nothing_serves_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_ports, "SCAN_INTERVAL", 0.05)
    listen = Listen()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]

    async def go() -> None:
        async with guest(tmp_path) as (tables, _, client):
            fw = PortForwarder(NetworkPlan("netns", "/run/netns/test"), "pod", listen)
            fw.start(client)
            try:
                tables.listeners = [("0.0.0.0", dead)]
                await until(lambda: fw.ports == [dead])
                assert await fetch(listen.bound[dead], b"hello") == b""
            finally:
                await fw.stop()

    run(go())


def test_the_forwarder_closes_its_listeners_when_the_agent_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_ports, "SCAN_INTERVAL", 0.05)
    listen = Listen()

    async def go() -> None:
        tables = Tables()
        server = port_server(PortService(tables))
        sock = str(tmp_path / "agent.sock")
        await server.serve_unix(sock)
        client = await AgentClient.connect(sock)
        fw = PortForwarder(NetworkPlan("netns", "/run/netns/test"), "pod", listen)
        try:
            tables.listeners = [("0.0.0.0", 1234)]
            fw.start(client)
            await until(lambda: fw.ports == [1234])
            await client.close()  # as when the VM dies
            await until(lambda: fw._watch is not None and fw._watch.done())
            assert fw.ports == []
            assert len(listen.made) == 1 and listen.made[0].fileno() == -1
        finally:
            await fw.stop()
            await client.close()
            await server.close()

    run(go())


def test_a_guest_reporting_nonsense_ports_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(portforward, "MAX_PORTS", 2)
    listen = Listen()

    class Liar:
        def __init__(self) -> None:
            self.server = Server()
            self.calls = 0

            async def listening(req: pb.ListeningPortsRequest) -> pb.ListeningPortsResponse:
                self.calls += 1
                return pb.ListeningPortsResponse(ports=[0, 70000, 5, 4, 3, 3])

            self.server.register_typed(
                SERVICE, "ListeningPorts", pb.ListeningPortsRequest, listening
            )

    liar = Liar()

    async def go() -> None:
        async with client_of(liar.server, tmp_path) as client:
            fw = PortForwarder(NetworkPlan("netns", "/run/netns/test"), "pod", listen)
            fw.start(client)
            try:
                await until(lambda: liar.calls >= 3)
                assert fw.ports == [3, 4]  # in range, each once, the lowest MAX_PORTS
                # answered at once every time: the host still waits between calls
                calls = liar.calls
                await asyncio.sleep(0.5)
                assert liar.calls - calls <= 0.5 / portforward.POLL_GAP + 1
            finally:
                await fw.stop()
            assert all(s.fileno() == -1 for s in listen.made)

    run(go())


def test_guard_answers_the_port_verbs_errors_with_their_code() -> None:
    service = PortService(Tables())

    async def go() -> None:
        with pytest.raises(TtrpcError) as e:
            await guard("ReadPort", service.read_port)(pb.ReadPortRequest(connection_id=3))  # type: ignore[arg-type]
        assert e.value.code == Code.NOT_FOUND

    run(go())


def test_stop_ends_open_connections_and_closes_what_a_late_bind_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_ports, "SCAN_INTERVAL", 0.05)
    listen = Listen()

    async def go() -> None:
        async with guest(tmp_path) as (tables, service, client), echo_server() as port:
            fw = PortForwarder(NetworkPlan("netns", "/run/netns/test"), "pod", listen)
            fw.start(client)
            try:
                tables.listeners = [("0.0.0.0", port)]
                await until(lambda: fw.ports == [port])
                reader, writer = await asyncio.open_connection("127.0.0.1", listen.bound[port])
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"  # relayed, still open
                assert len(fw._relays) == 1
            finally:
                await fw.stop()
            assert fw._relays == set() and fw.ports == []
            assert await reader.read() == b""  # the host's end is closed
            writer.close()
            # the guest's end is left to the VM's end (stop runs as the VM stops)
            [guest_end] = service.connections.values()
            guest_end.writer.close()
            await guest_end.writer.wait_closed()
            await asyncio.sleep(0.1)  # the echo server sees its end

    run(go())

    # a bind still running in its thread when the forwarder stops
    started, release = threading.Event(), threading.Event()

    def slow(netns: str, address: str, ports: list[int]) -> dict[int, socket.socket | OSError]:
        started.set()
        release.wait(10)
        return listen(netns, address, ports)

    async def late() -> None:
        async with guest(tmp_path) as (tables, _, client):
            tables.listeners = [("0.0.0.0", 4321)]
            fw = PortForwarder(NetworkPlan("netns", "/run/netns/test"), "pod", slow)
            fw.start(client)
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            await fw.stop()  # while the thread binds
            release.set()
            await until(lambda: 4321 in listen.bound)
            await until(lambda: all(s.fileno() == -1 for s in listen.made))
            assert fw.ports == []

    run(late())
