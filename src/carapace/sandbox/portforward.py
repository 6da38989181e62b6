"""Port forwarding into the pod's VM (``kubectl port-forward``).

containerd's CRI PortForward dials ``localhost:PORT`` inside the pod's network
namespace on the host. Nothing of the guest listens there: the pod's interfaces are
taps joined to CNI's veths (network/tcfilter.py) and the services listen in the VM.
``PortForwarder`` keeps a listener on 127.0.0.1:PORT in that namespace for each TCP
port something listens on in the guest (the agent's ListeningPorts long poll) and
relays each connection it accepts through the agent (OpenPortConnection, WritePort,
ReadPort, ClosePort), the way a process's stdio is relayed (sandbox/stdio.py).

Only a pod with a network namespace (mode netns) has listeners; with the user-mode
network or none there is no namespace to listen in, and nothing is done. A port the
host cannot bind there (in use) is logged, not fatal. What the guest says is checked:
ports in range, at most ``MAX_PORTS`` listeners, connection ids unique, no read larger
than asked; at most ``MAX_CONNECTIONS`` connections are relayed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable

from carapace.agent.client import AgentClient
from carapace.errors import AgentError, CarapaceError
from carapace.network.netns import listen_tcp
from carapace.sandbox.netplan import NetworkPlan
from carapace.ttrpc.ratelimit import RateLimitedLog

log = logging.getLogger("carapace.sandbox")

#: Where the listeners are, in the pod's network namespace (containerd dials
#: localhost over IPv4).
LOOPBACK = "127.0.0.1"
#: How long one ListeningPorts call waits in the guest for a change (seconds).
WAIT = 60.0
#: The least time between two ListeningPorts calls: a guest that answers at once
#: every time cannot make the host spin.
POLL_GAP = 0.1
#: The wait after a failed call or accept before the next (seconds).
RETRY = 1.0
#: The most ports with a listener; beyond these (the lowest), ports are not forwarded.
MAX_PORTS = 256
#: The most connections relayed at once; one more is closed as it is accepted.
MAX_CONNECTIONS = 256
#: Bytes read from the host's end at a time, and asked of the guest's end.
UP_CHUNK = 256 << 10
DOWN_CHUNK = 1 << 20
#: How long ClosePort may take at the end of a connection (seconds).
CLOSE_TIMEOUT = 5.0

#: ``listen(netns, address, ports)``: a listening socket (or the error) per port.
Listen = Callable[[str, str, list[int]], dict[int, socket.socket | OSError]]


def checked_ports(reported: Iterable[int]) -> tuple[list[int], list[int]]:
    """(the TCP ports of the guest's report, sorted, each once; what in it is no port)."""
    ports: set[int] = set()
    bad: set[int] = set()
    for port in reported:
        (ports if 1 <= port <= 65535 else bad).add(port)
    return sorted(ports), sorted(bad)


def port_changes(
    current: Iterable[int], wanted: Iterable[int], limit: int = MAX_PORTS
) -> tuple[list[int], list[int]]:
    """(ports to open, ports to close), sorted, to go from listeners on ``current``
    to listeners on the lowest ``limit`` ports of ``wanted``."""
    target = set(sorted(set(wanted))[:limit])
    have = set(current)
    return sorted(target - have), sorted(have - target)


class PortForwarder:
    """Listeners in the pod's network namespace for the guest's listening TCP ports,
    and the relays of their connections. ``start`` after the agent answers, ``stop``
    before it is closed: every socket and task is closed on every path."""

    def __init__(self, plan: NetworkPlan, sandbox_id: str, listen: Listen = listen_tcp) -> None:
        #: The namespace to listen in ("": none, nothing is forwarded).
        self.netns = plan.netns if plan.mode == "netns" else ""
        self.sandbox_id = sandbox_id
        self._listen = listen
        self._listeners: dict[int, tuple[socket.socket, asyncio.Task[None]]] = {}
        self._unbound: set[int] = set()  # ports the host could not bind (logged)
        self._relays: set[asyncio.Task[None]] = set()
        self._connections: set[int] = set()  # ids of the guest's open connections
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._log_changes = RateLimitedLog(log, logging.INFO)
        self._log_bind = RateLimitedLog(log)
        self._log_guest = RateLimitedLog(log)
        self._log_relay = RateLimitedLog(log, logging.INFO)

    @property
    def ports(self) -> list[int]:
        """The ports listened on now, sorted."""
        return sorted(self._listeners)

    def start(self, agent: AgentClient) -> None:
        """Begin watching the guest's ports (nothing without a network namespace)."""
        if not self.netns or self._watch is not None:
            return
        self._stopping = False
        self._watch = asyncio.ensure_future(self._run(agent))

    async def stop(self) -> None:
        """Close every listener and connection; end every task. Never raises."""
        self._stopping = True
        watch, self._watch = self._watch, None
        if watch is not None:  # first: it opens listeners
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await self._close(list(self._listeners))  # then: they start relays
        relays = list(self._relays)
        for t in relays:
            t.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        self._unbound.clear()
        self._connections.clear()

    # -- the watch ------------------------------------------------------------------

    async def _run(self, agent: AgentClient) -> None:
        known: list[int] = []
        try:
            while True:
                try:
                    reported = await agent.listening_ports(known, WAIT)
                except AgentError as e:
                    if agent.client.closed:  # the VM is gone: its ports with it
                        log.debug("sandbox %s: port forwarding ends: %s", self.sandbox_id, e)
                        return
                    self._log_guest("sandbox %s: port forwarding: %s", self.sandbox_id, e)
                    await asyncio.sleep(RETRY)
                    continue
                known, bad = checked_ports(reported)
                if bad:
                    self._log_guest(
                        "sandbox %s: the guest reports listening ports out of range "
                        "(accepted: 1 to 65535): %s",
                        self.sandbox_id,
                        bad[:8],
                    )
                await self._apply(agent, known)
                await asyncio.sleep(POLL_GAP)
        except Exception:
            log.exception("sandbox %s: port forwarding stopped", self.sandbox_id)
        finally:
            if not self._stopping:
                await self._close(list(self._listeners))

    async def _apply(self, agent: AgentClient, wanted: list[int]) -> None:
        """Listen on the ports of ``wanted`` (the lowest MAX_PORTS), no other."""
        current = set(self._listeners) | self._unbound
        to_open, to_close = port_changes(current, wanted, MAX_PORTS)
        if len(wanted) > MAX_PORTS:
            self._log_guest(
                "sandbox %s: the guest listens on %d TCP ports; the lowest %d are forwarded",
                self.sandbox_id,
                len(wanted),
                MAX_PORTS,
            )
        self._unbound.difference_update(to_close)
        await self._close(to_close)
        made = await self._bind(to_open) if to_open else {}
        for port, sock in made.items():
            if isinstance(sock, OSError):
                self._unbound.add(port)
                self._log_bind(
                    "sandbox %s: TCP port %d of the guest is not forwarded: cannot listen on "
                    "%s:%d in the pod's network namespace %s: %s",
                    self.sandbox_id,
                    port,
                    LOOPBACK,
                    port,
                    self.netns,
                    sock.strerror or sock,
                )
                continue
            self._listeners[port] = (sock, asyncio.ensure_future(self._accept(agent, port, sock)))
        if to_open or to_close:
            self._log_changes(
                "sandbox %s: forwarding TCP ports %s from %s:PORT of the pod's network namespace",
                self.sandbox_id,
                self.ports,
                LOOPBACK,
            )

    async def _bind(self, ports: list[int]) -> dict[int, socket.socket | OSError]:
        """Listeners on ``ports`` in the namespace (a thread joins it); their sockets
        are closed if this is cancelled meanwhile."""
        work = asyncio.ensure_future(asyncio.to_thread(self._listen, self.netns, LOOPBACK, ports))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(_close_made)
            raise
        except (CarapaceError, OSError) as e:  # the namespace is gone (the pod goes)
            return {port: OSError(str(e)) for port in ports}

    async def _close(self, ports: Iterable[int]) -> None:
        """Stop listening on ``ports`` (connections made already go on)."""
        closing = [self._listeners.pop(p) for p in ports if p in self._listeners]
        for _, task in closing:
            task.cancel()

        def close(_: object = None) -> None:
            for sock, _task in closing:
                sock.close()

        # each socket is closed once no accept waits on it, even if this is cancelled
        accepts = asyncio.gather(*(t for _, t in closing), return_exceptions=True)
        try:
            await asyncio.shield(accepts)
        finally:
            if accepts.done():
                close()
            else:
                accepts.add_done_callback(close)

    # -- connections ----------------------------------------------------------------

    async def _accept(self, agent: AgentClient, port: int, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except Exception as e:  # out of files, say
                self._log_relay("sandbox %s: accept on port %d: %s", self.sandbox_id, port, e)
                await asyncio.sleep(RETRY)
                continue
            if len(self._relays) >= MAX_CONNECTIONS:
                conn.close()
                self._log_relay(
                    "sandbox %s: %d forwarded connections are open; one to port %d is closed",
                    self.sandbox_id,
                    MAX_CONNECTIONS,
                    port,
                )
                continue
            relay = asyncio.ensure_future(self._relay(agent, port, conn))
            self._relays.add(relay)
            relay.add_done_callback(self._relays.discard)

    async def _relay(self, agent: AgentClient, port: int, conn: socket.socket) -> None:
        """Relay one accepted connection to ``port`` in the guest, both ways, until
        both ends are done (or either fails)."""
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        cid = 0
        try:
            opened = await agent.open_port(port)
            if opened in self._connections:
                raise AgentError(f"agent OpenPortConnection: connection id {opened} is in use")
            cid = opened
            self._connections.add(cid)
            await _pump(agent, cid, reader, writer)
        except (AgentError, ConnectionError, OSError) as e:
            self._log_relay(
                "sandbox %s: a forwarded connection to port %d ends: %s", self.sandbox_id, port, e
            )
        except Exception:
            log.exception("sandbox %s: relaying a connection to port %d", self.sandbox_id, port)
        finally:
            writer.close()
            if cid:
                self._connections.discard(cid)
                if not self._stopping:  # else the VM stops: the guest's end goes with it
                    with contextlib.suppress(AgentError):
                        await agent.close_port(cid, timeout=CLOSE_TIMEOUT)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _pump(
    agent: AgentClient, cid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Bytes both ways between the host's end and the guest's connection ``cid``; an
    end of file is passed on as a half close; returns once both ways ended."""

    async def up() -> None:
        while True:
            data = await reader.read(UP_CHUNK)
            if not data:
                await agent.close_port(cid, write_only=True)
                return
            await agent.write_port(cid, data)

    async def down() -> None:
        while True:
            data, eof = await agent.read_port(cid, DOWN_CHUNK)
            if data:
                writer.write(data)
                await writer.drain()
            if eof:
                if writer.can_write_eof():
                    writer.write_eof()
                return

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _close_made(work: asyncio.Future[dict[int, socket.socket | OSError]]) -> None:
    """Close the sockets a bind made for a caller that went away."""
    if work.cancelled() or work.exception() is not None:
        return
    for sock in work.result().values():
        if isinstance(sock, socket.socket):
            sock.close()
