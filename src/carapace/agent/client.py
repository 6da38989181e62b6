"""The host's typed client of the guest agent API (ttrpc over virtio-serial).

The agent is not trusted: the ttrpc client closes the connection on a protocol
violation, an error text from the guest is cut to ``MAX_ERROR_TEXT`` before it goes
into an error (and so a log line or containerd's reply), and OOM events are kept only
for well-formed container ids, at most ``MAX_OOM_QUEUED`` of them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
from typing import Any, TypeVar

from google.protobuf.message import Message

from carapace.errors import AgentError, agent_error
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import AGENT_SERVICE as SERVICE
from carapace.protocols.contract import ID_RE
from carapace.ttrpc import Client, TtrpcError
from carapace.ttrpc.ratelimit import RateLimitedLog, shorten

log = logging.getLogger("carapace.agent")

M = TypeVar("M", bound=Message)
DEFAULT_TIMEOUT = 60.0
#: The most characters of an error text from the guest kept in an error.
MAX_ERROR_TEXT = 512
#: OOM events kept until taken; beyond that the oldest is dropped (a guest can make
#: them as fast as it likes; the newest say which containers are killed now).
MAX_OOM_QUEUED = 256


class AgentClient:
    def __init__(self, client: Client) -> None:
        self.client = client
        # OOM events: one GetOOMEvent long poll at a time feeds this queue, so that a
        # caller giving up (timeout, cancellation) never makes an event go missing
        self._oom_events: collections.deque[str] = collections.deque(maxlen=MAX_OOM_QUEUED)
        self._oom_ready = asyncio.Event()
        self._oom_poll: asyncio.Task[None] | None = None
        self._bad_oom = RateLimitedLog(log)
        self._oom_dropped = RateLimitedLog(log)

    @classmethod
    async def over(cls, sock: socket.socket) -> AgentClient:
        """A client on a connection made already (a pool VM's, handed over)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(Client(reader, writer))

    @classmethod
    async def connect(cls, socket_path: str, attempts: int = 100) -> AgentClient:
        last: Exception | None = None
        for _ in range(attempts):
            try:
                return cls(await Client.connect_unix(socket_path))
            except (ConnectionRefusedError, FileNotFoundError) as e:
                last = e
                await asyncio.sleep(0.02)
        raise AgentError(f"cannot connect to the agent socket {socket_path}: {last}")

    async def _call(
        self, method: str, req: Message, resp: type[M], timeout: float | None = DEFAULT_TIMEOUT
    ) -> M:
        try:
            return await self.client.call(SERVICE, method, req, resp, timeout=timeout)
        except TtrpcError as e:
            text = e.message
            if len(text) > MAX_ERROR_TEXT:
                text = f"{text[:MAX_ERROR_TEXT]}... ({len(text)} characters in all)"
            raise agent_error(f"agent {method}: {text} ({e.code.name})", e.reason) from e

    async def wait_closed(self) -> None:
        """Return once the connection to the agent is gone (closed by either side, or
        broken by a protocol violation of the guest: see ``violation``)."""
        await self.client.wait_closed()

    @property
    def violation(self) -> str:
        """How the guest broke the protocol, if it did ("" otherwise)."""
        return self.client.violation

    async def close(self) -> None:
        poll, self._oom_poll = self._oom_poll, None
        if poll is not None:
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
        await self.client.close()

    async def check(self, timeout: float | None) -> bool:
        r = await self._call("Check", pb.CheckRequest(), pb.HealthCheckResponse, timeout)
        return r.status == pb.HealthCheckResponse.SERVING

    async def reseed_random_dev(self, data: bytes) -> None:
        await self._call("ReseedRandomDev", pb.ReseedRandomDevRequest(data=data), pb.Empty)

    async def set_guest_date_time(self, ns: int) -> None:
        sec, usec = divmod(ns // 1000, 1_000_000)
        req = pb.SetGuestDateTimeRequest(sec=sec, usec=usec)
        await self._call("SetGuestDateTime", req, pb.Empty)

    async def guest_details(self) -> pb.GuestDetailsResponse:
        return await self._call(
            "GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse
        )

    async def version(self) -> pb.VersionCheckResponse:
        return await self._call("Version", pb.CheckRequest(), pb.VersionCheckResponse)

    async def create_sandbox(
        self, sandbox_id: str, hostname: str, storages: list[pb.Storage]
    ) -> None:
        await self._call(
            "CreateSandbox",
            pb.CreateSandboxRequest(sandbox_id=sandbox_id, hostname=hostname, storages=storages),
            pb.Empty,
        )

    async def destroy_sandbox(self, timeout: float) -> None:
        await self._call("DestroySandbox", pb.DestroySandboxRequest(), pb.Empty, timeout)

    async def create_container(
        self,
        container_id: str,
        spec: dict[str, Any],
        rootfs: str,
        overlay: bool,
        storages: list[pb.Storage] | None = None,
    ) -> None:
        await self._call(
            "CreateContainer",
            pb.CreateContainerRequest(
                container_id=container_id,
                oci_spec=json.dumps(spec).encode(),
                rootfs=rootfs,
                rootfs_overlay=overlay,
                storages=storages or [],
            ),
            pb.Empty,
        )

    async def start_container(self, container_id: str) -> int:
        r = await self._call(
            "StartContainer",
            pb.StartContainerRequest(container_id=container_id),
            pb.StartContainerResponse,
        )
        return r.pid

    async def remove_container(self, container_id: str, timeout: int = 10) -> None:
        await self._call(
            "RemoveContainer",
            pb.RemoveContainerRequest(container_id=container_id, timeout_seconds=timeout),
            pb.Empty,
            timeout + 30,
        )

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> int:
        r = await self._call(
            "ExecProcess",
            pb.ExecProcessRequest(
                container_id=container_id, exec_id=exec_id, process=json.dumps(process).encode()
            ),
            pb.ExecProcessResponse,
        )
        return r.pid

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        """Forget an exited exec'd process (its streams, terminal and files)."""
        await self._call(
            "RemoveProcess",
            pb.RemoveProcessRequest(container_id=container_id, exec_id=exec_id),
            pb.Empty,
        )

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all_processes: bool = False
    ) -> None:
        await self._call(
            "SignalProcess",
            pb.SignalProcessRequest(
                container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes
            ),
            pb.Empty,
        )

    async def wait_process(self, container_id: str, exec_id: str = "") -> int:
        r = await self._call(
            "WaitProcess",
            pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id),
            pb.WaitProcessResponse,
            None,
        )
        return r.status

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        r = await self._call(
            "WriteStdin",
            pb.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data),
            pb.WriteStreamResponse,
            None,
        )
        return r.len

    async def read_stream(
        self, stream: str, container_id: str, exec_id: str, length: int = 0
    ) -> tuple[bytes, bool]:
        """(data, eof) from the process's "stdout" or "stderr"."""
        method = "ReadStdout" if stream == "stdout" else "ReadStderr"
        r = await self._call(
            method,
            pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=length),
            pb.ReadStreamResponse,
            None,
        )
        return r.data, r.eof

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._call(
            "CloseStdin", pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id), pb.Empty
        )

    async def tty_win_resize(
        self, container_id: str, exec_id: str, rows: int, columns: int
    ) -> None:
        await self._call(
            "TtyWinResize",
            pb.TtyWinResizeRequest(
                container_id=container_id, exec_id=exec_id, row=rows, column=columns
            ),
            pb.Empty,
        )

    async def pause_container(self, container_id: str) -> None:
        """Freeze every process of the container (cgroup freezer, through crun)."""
        await self._call(
            "PauseContainer", pb.PauseContainerRequest(container_id=container_id), pb.Empty
        )

    async def resume_container(self, container_id: str) -> None:
        await self._call(
            "ResumeContainer", pb.ResumeContainerRequest(container_id=container_id), pb.Empty
        )

    async def stats_container(self, container_id: str) -> pb.StatsContainerResponse:
        """The container's cgroup v2 numbers in the guest (see ``shim.metrics`` to turn
        them into containerd's metrics)."""
        return await self._call(
            "StatsContainer",
            pb.StatsContainerRequest(container_id=container_id),
            pb.StatsContainerResponse,
        )

    async def list_processes(self, container_id: str) -> list[int]:
        """The guest pids of every process of the container, sorted."""
        r = await self._call(
            "ListProcesses",
            pb.ListProcessesRequest(container_id=container_id),
            pb.ListProcessesResponse,
        )
        return list(r.pids)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply OCI ``linux.resources`` (LinuxResources) to a container."""
        await self._call(
            "UpdateContainer",
            pb.UpdateContainerRequest(
                container_id=container_id, resources=json.dumps(resources).encode()
            ),
            pb.Empty,
        )

    async def online_cpu_mem(
        self, expected_cpus: int, timeout: float, max_online: int = 0
    ) -> tuple[int, int]:
        """Have the guest online every hot-added CPU and memory block and wait (up to
        ``timeout`` seconds) until ``expected_cpus`` CPUs are online (0: no wait);
        ``max_online``: offline CPUs beyond this many. Returns (online CPUs, MemTotal
        in KiB)."""
        r = await self._call(
            "OnlineCPUMem",
            pb.OnlineCPUMemRequest(
                expected_cpus=expected_cpus,
                timeout_ms=int(timeout * 1000),
                max_online_cpus=max_online,
            ),
            pb.OnlineCPUMemResponse,
            timeout + DEFAULT_TIMEOUT,
        )
        return r.online_cpus, r.mem_total_kb

    async def update_interface(self, iface: pb.Interface) -> pb.Interface:
        """Configure the guest NIC whose MAC is ``iface.mac``: its name, MTU and
        addresses (exactly these), and bring it up; the interface as it now is."""
        return await self._call(
            "UpdateInterface", pb.UpdateInterfaceRequest(interface=iface), pb.Interface
        )

    async def update_routes(self, routes: list[pb.Route]) -> list[pb.Route]:
        """Replace the routes of the interfaces carapace configured with ``routes``;
        the guest's main-table routes as they now are."""
        r = await self._call(
            "UpdateRoutes",
            pb.UpdateRoutesRequest(routes=pb.Routes(routes=routes)),
            pb.Routes,
        )
        return list(r.routes)

    async def add_arp_neighbors(self, neighbors: list[pb.ARPNeighbor]) -> None:
        """Add permanent neighbour entries (IPv4 ARP, IPv6 ND) in the guest."""
        await self._call(
            "AddARPNeighbors", pb.AddARPNeighborsRequest(neighbors=neighbors), pb.Empty
        )

    async def list_interfaces(self) -> list[pb.Interface]:
        """Every interface of the guest, lo included."""
        r = await self._call("ListInterfaces", pb.ListInterfacesRequest(), pb.Interfaces)
        return list(r.interfaces)

    async def list_routes(self) -> list[pb.Route]:
        """The guest's main-table routes, IPv4 and IPv6."""
        r = await self._call("ListRoutes", pb.ListRoutesRequest(), pb.Routes)
        return list(r.routes)

    # -- port forwarding ----------------------------------------------------------------

    async def listening_ports(self, known: list[int], wait: float) -> list[int]:
        """The TCP ports something listens on in the guest, as soon as they differ
        from ``known`` or after ``wait`` seconds; as the guest says (unchecked)."""
        req = pb.ListeningPortsRequest(known_ports=known, timeout_ms=int(wait * 1000))
        r = await self._call("ListeningPorts", req, pb.ListeningPortsResponse, wait + 30)
        return list(r.ports)

    async def open_port(self, port: int) -> int:
        """Connect to ``port`` in the guest; the connection's id (never 0)."""
        req = pb.OpenPortConnectionRequest(port=port)
        r = await self._call("OpenPortConnection", req, pb.OpenPortConnectionResponse)
        if r.connection_id == 0:
            raise AgentError("agent OpenPortConnection: connection id 0, which names none")
        return r.connection_id

    async def write_port(self, connection: int, data: bytes) -> None:
        req = pb.WritePortRequest(connection_id=connection, data=data)
        await self._call("WritePort", req, pb.WriteStreamResponse, None)

    async def read_port(self, connection: int, length: int) -> tuple[bytes, bool]:
        """(data, eof) of a port connection: at most ``length`` bytes."""
        req = pb.ReadPortRequest(connection_id=connection, len=length)
        r = await self._call("ReadPort", req, pb.ReadStreamResponse, None)
        if len(r.data) > length:
            raise AgentError(f"agent ReadPort: {len(r.data)} bytes, more than the {length} asked")
        return r.data, r.eof

    async def close_port(
        self, connection: int, write_only: bool = False, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        req = pb.ClosePortRequest(connection_id=connection, write_only=write_only)
        await self._call("ClosePort", req, pb.Empty, timeout)

    async def get_oom_event(self, timeout: float | None = None) -> str | None:
        """The id of the container of the next OOM kill in the sandbox, waiting as long
        as needed (``timeout=None``) or ``timeout`` seconds (then None).

        Events are taken from the agent by one long poll per client that runs from
        the first call until ``close``; each event goes to exactly one caller."""
        if self._oom_events:
            return self._oom_events.popleft()
        if self._oom_poll is not None and self._oom_poll.done():
            failed, self._oom_poll = self._oom_poll, None  # the next call polls again
            _raise_poll_failure(failed)  # a failure no caller saw yet
        if self.client.closed:
            raise AgentError("agent GetOOMEvent: the agent connection is closed")
        if self._oom_poll is None:
            self._oom_poll = asyncio.ensure_future(self._poll_oom_events())
        poll = self._oom_poll
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._oom_events:  # an event not taken stays queued for the next caller
            self._oom_ready.clear()
            left = None if deadline is None else deadline - loop.time()
            if poll.done() or (left is not None and left <= 0):
                break
            ready = asyncio.ensure_future(self._oom_ready.wait())
            try:
                await asyncio.wait({ready, poll}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
        if self._oom_events:
            return self._oom_events.popleft()
        if poll.done():
            if self._oom_poll is poll:
                self._oom_poll = None  # the next call polls again
            _raise_poll_failure(poll)
        return None

    async def _poll_oom_events(self) -> None:
        while True:
            r = await self._call("GetOOMEvent", pb.GetOOMEventRequest(), pb.OOMEvent, None)
            cid = r.container_id
            # not an id the host makes (check_id): not about a container of the pod
            if not ID_RE.fullmatch(cid):
                self._bad_oom(
                    "agent: dropping OOM events naming no possible container: %s",
                    shorten(cid),
                )
                continue
            if len(self._oom_events) == self._oom_events.maxlen:
                self._oom_dropped(
                    "agent: %d OOM events wait already; dropping the oldest", MAX_OOM_QUEUED
                )
            self._oom_events.append(cid)
            self._oom_ready.set()


def _raise_poll_failure(poll: asyncio.Task[None]) -> None:
    if poll.cancelled():
        raise AgentError("agent GetOOMEvent: the agent client is closed")
    exc = poll.exception()
    if isinstance(exc, AgentError):
        raise exc
    raise AgentError(f"agent GetOOMEvent: the long poll stopped: {exc!r}")
