"""The agent's ttrpc service: every verb registered through one error guard, served
on the virtio-serial port the host connects to."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from carapace.guest import sysinit
from carapace.guest.clone import CloneService
from carapace.guest.containers import ContainerService
from carapace.guest.crun import CrunError
from carapace.guest.pod import CONTAINERS_DIR, Pod
from carapace.guest.processes import ProcessService
from carapace.guest.sandbox import AGENT_VERSION, SandboxService
from carapace.guest.stdio import StdioService, read_pipe, write_pipe
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import AGENT_PORT_NAME, AGENT_SERVICE, AGENT_SERVING
from carapace.ttrpc import Code, Server, TtrpcError
from carapace.ttrpc.errors import CARAPACE_CODES

if TYPE_CHECKING:
    from carapace.guest.network import NetworkService
    from carapace.guest.ports import PortService

log = logging.getLogger("carapace.agent")

Handler = Callable[[Any], Awaitable[Message]]

#: Expected failures of a request and the status each is answered with. Anything else
#: a handler raises is a bug of the agent: logged with its traceback, answered UNKNOWN.
EXPECTED_ERRORS: tuple[tuple[type[Exception], Code], ...] = (
    (CrunError, Code.INTERNAL),
    # carapace's own errors, with the codes the shim answers them with too
    *CARAPACE_CODES,
)
#: The module of the network verbs' kernel errors (``NetlinkError``: the kernel refused,
#: with its errno and text), answered INTERNAL too. Imported with the network service,
#: the first time a network verb is called (a pod without a network never needs it).
NETLINK_MODULE = "carapace.guest.netlink"


def expected_code(e: Exception) -> Code | None:
    """The status an expected failure is answered with (None: a bug of the agent)."""
    for cls, code in EXPECTED_ERRORS:
        if isinstance(e, cls):
            return code
    netlink = sys.modules.get(NETLINK_MODULE)
    if netlink is not None and isinstance(e, netlink.NetlinkError):
        return Code.INTERNAL
    return None


def guard(method: str, handler: Handler) -> Handler:
    """``handler`` answering every failure as a TtrpcError: its own as they are, the
    expected ones with their code and message, anything else as UNKNOWN."""

    @functools.wraps(handler)
    async def run(req: Any) -> Message:
        try:
            return await handler(req)
        except TtrpcError:
            raise
        except Exception as e:
            code = expected_code(e)
            if code is not None:
                log.warning("%s failed: %s", method, e)
                reason = e.reason if isinstance(e, CrunError) else ""
                raise TtrpcError(code, str(e), reason) from e
            log.exception("%s failed", method)
            raise TtrpcError(Code.UNKNOWN, str(e) or type(e).__name__) from e

    return run


class LazyNetwork:
    """The network service (guest/network.py and its netlink code), imported and made
    the first time one of its verbs is called: off the path to "agent ready"."""

    def __init__(self) -> None:
        self._service: NetworkService | None = None

    def service(self) -> NetworkService:
        if self._service is None:
            from carapace.guest.network import NetworkService

            self._service = NetworkService()
        return self._service

    def verb(self, name: str) -> Handler:
        """The handler of the service's method ``name``."""

        async def call(req: Any) -> Message:
            handler: Handler = getattr(self.service(), name)
            return await handler(req)

        call.__name__ = call.__qualname__ = name
        return call


class LazyPorts:
    """The port forwarding service (guest/ports.py), imported and made the first time
    one of its verbs is called: a pod no one forwards to never loads it."""

    def __init__(self) -> None:
        self._service: PortService | None = None

    def verb(self, name: str) -> Handler:
        async def call(req: Any) -> Message:
            if self._service is None:
                from carapace.guest.ports import PortService

                self._service = PortService()
            handler: Handler = getattr(self._service, name)
            return await handler(req)

        call.__name__ = call.__qualname__ = name
        return call


class Agent:
    """The agent of one pod VM: its state, the services of its verbs and their server."""

    def __init__(self) -> None:
        self.pod = Pod()
        containers = ContainerService(self.pod)
        processes = ProcessService(self.pod)
        stdio = StdioService(self.pod)
        sandbox = SandboxService(self.pod, containers)
        network = LazyNetwork()
        clone = CloneService()
        ports = LazyPorts()
        self.server = Server()
        #: (method, request type, handler) of every verb of the agent API
        self.methods: tuple[tuple[str, type[Message], Handler], ...] = (
            ("CreateSandbox", pb.CreateSandboxRequest, sandbox.create_sandbox),
            ("DestroySandbox", pb.DestroySandboxRequest, sandbox.destroy_sandbox),
            ("CreateContainer", pb.CreateContainerRequest, containers.create_container),
            ("StartContainer", pb.StartContainerRequest, containers.start_container),
            ("RemoveContainer", pb.RemoveContainerRequest, containers.remove_container),
            ("ExecProcess", pb.ExecProcessRequest, processes.exec_process),
            ("RemoveProcess", pb.RemoveProcessRequest, processes.remove_process),
            ("SignalProcess", pb.SignalProcessRequest, processes.signal_process),
            ("WaitProcess", pb.WaitProcessRequest, processes.wait_process),
            ("WriteStdin", pb.WriteStreamRequest, stdio.write_stdin),
            ("ReadStdout", pb.ReadStreamRequest, stdio.read_stdout),
            ("ReadStderr", pb.ReadStreamRequest, stdio.read_stderr),
            ("CloseStdin", pb.CloseStdinRequest, stdio.close_stdin),
            ("TtyWinResize", pb.TtyWinResizeRequest, stdio.tty_win_resize),
            ("PauseContainer", pb.PauseContainerRequest, containers.pause_container),
            ("ResumeContainer", pb.ResumeContainerRequest, containers.resume_container),
            ("StatsContainer", pb.StatsContainerRequest, containers.stats_container),
            ("ListProcesses", pb.ListProcessesRequest, processes.list_processes),
            ("UpdateContainer", pb.UpdateContainerRequest, containers.update_container),
            ("GetOOMEvent", pb.GetOOMEventRequest, containers.get_oom_event),
            ("GetGuestDetails", pb.GuestDetailsRequest, sandbox.get_guest_details),
            ("OnlineCPUMem", pb.OnlineCPUMemRequest, sandbox.online_cpu_mem),
            ("Check", pb.CheckRequest, sandbox.check),
            ("Version", pb.CheckRequest, sandbox.version),
            ("UpdateInterface", pb.UpdateInterfaceRequest, network.verb("update_interface")),
            ("UpdateRoutes", pb.UpdateRoutesRequest, network.verb("update_routes")),
            ("AddARPNeighbors", pb.AddARPNeighborsRequest, network.verb("add_arp_neighbors")),
            ("ListInterfaces", pb.ListInterfacesRequest, network.verb("list_interfaces")),
            ("ListRoutes", pb.ListRoutesRequest, network.verb("list_routes")),
            ("ReseedRandomDev", pb.ReseedRandomDevRequest, clone.reseed_random_dev),
            ("SetGuestDateTime", pb.SetGuestDateTimeRequest, clone.set_guest_date_time),
            ("ListeningPorts", pb.ListeningPortsRequest, ports.verb("listening_ports")),
            (
                "OpenPortConnection",
                pb.OpenPortConnectionRequest,
                ports.verb("open_port_connection"),
            ),
            ("WritePort", pb.WritePortRequest, ports.verb("write_port")),
            ("ReadPort", pb.ReadPortRequest, ports.verb("read_port")),
            ("ClosePort", pb.ClosePortRequest, ports.verb("close_port")),
        )
        for name, req, handler in self.methods:
            self.server.register_typed(AGENT_SERVICE, name, req, guard(name, handler))

    async def serve(self) -> None:
        """Serve the host on the agent port, one connection after another: when the
        host goes away (the port reads end of file), the next one is waited for."""
        self.pod.reaper.install()
        os.makedirs(CONTAINERS_DIR, exist_ok=True)
        log.info("agent %s %s", AGENT_VERSION, AGENT_SERVING)
        port = -1
        while True:
            if port < 0:
                path = sysinit.find_virtio_port(AGENT_PORT_NAME)
                if path is None:
                    await asyncio.sleep(0.01)
                    continue
                # held open for good, each connection reading and writing copies of it:
                # a close makes the guest kernel throw away what the host sent meanwhile
                # (a host that connected just then lost its first request: seen with a
                # VM that waited in a pool between two hosts)
                port = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                # the boot timeline's last step (the guest clock starts with the kernel)
                log.info("agent port %s opened at %.2fs after boot", path, time.monotonic())
            try:
                reader = await read_pipe(os.dup(port))
                writer = await write_pipe(os.dup(port))
            except OSError:
                await asyncio.sleep(0.01)
                continue
            try:
                await self.server.serve_connection(reader, writer)
            except Exception:
                log.exception("agent connection failed")
            finally:
                writer.close()
            # the host closed its end (or was not connected yet): read again shortly
            await asyncio.sleep(0.01)
