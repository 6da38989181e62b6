"""A hostile agent, for tests only: the agent as an attacker who owns the guest would
make it, to show that the host stays bounded and the pod still dies (issue 14).

It is switched on only by the kernel command line, ``carapace.hostile=MODE[,MODE...]``,
which only the host sets (``[hypervisor] kernel_params``; no annotation reaches it).
PID 1 reads it once at boot, before any container exists; nothing a container does
can switch it on. Without the parameter nothing here runs. Modes:

- ``oom-flood``: GetOOMEvent answers at once with forged events: ``FORGED_OOM`` ids of
  no container of the pod, then ``HUGE_OOM`` ids of 1 MiB, then real events as usual.
- ``frame-flood``: once a container was started, the agent writes ``FRAME_FLOOD``
  frames no ttrpc server sends (requests to the host, responses on streams the host
  never opened, oversize headers) on the agent port, as fast as the port takes them.
- ``ignore-kill``: SignalProcess answers OK and signals nothing.
- ``console-flood``: ``CONSOLE_FLOOD_MIB`` MiB written to the serial console from
  boot (in a thread), then the line ``CONSOLE_DONE`` with the byte count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from google.protobuf.message import Message

from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import AGENT_SERVICE
from carapace.ttrpc import Server
from carapace.ttrpc.wire import MSG_REQUEST, MSG_RESPONSE, encode_header

log = logging.getLogger("carapace.agent.hostile")

PARAM = "carapace.hostile"
MODES = ("oom-flood", "frame-flood", "ignore-kill", "console-flood")
FORGED_OOM = 1000
HUGE_OOM = 300
FRAME_FLOOD = 500_000
CONSOLE_FLOOD_MIB = 50
CONSOLE_DONE = "CARAPACE-HOSTILE-CONSOLE-DONE"
#: Logged (to the console) once every forged OOM event was answered, with their count.
OOM_DONE = "CARAPACE-HOSTILE-OOM-DONE"
CONSOLE_DEVICE = "/dev/ttyS0"

Handler = Callable[[Any], Awaitable[Message]]


def modes_of(cmdline: str) -> frozenset[str]:
    """The hostile modes a kernel command line asks for (unknown ones are ignored)."""
    modes: set[str] = set()
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == PARAM:
            modes |= {m for m in value.split(",") if m in MODES}
    return frozenset(modes)


def forged_oom_ids() -> Iterator[str]:
    for i in range(FORGED_OOM):
        yield f"forged-{i}"
    for _ in range(HUGE_OOM):
        yield "x" * (1 << 20)


def flood_frames() -> list[bytes]:
    """Frames no ttrpc server sends to its client, in turns."""
    return [
        encode_header(8, 1, MSG_REQUEST) + b"garbage!",  # a request to the host
        encode_header(0, 2, MSG_RESPONSE),  # an even stream: the server's own
        encode_header(0, 0x7FFFFFFF, MSG_RESPONSE),  # a stream never opened
        encode_header(0xFFFFFFFF, 5, MSG_RESPONSE),  # 4 GiB announced
        encode_header(3, 9, 42) + b"???",  # a type that does not exist
    ]


def flood_console(path: str = CONSOLE_DEVICE, mib: int = CONSOLE_FLOOD_MIB) -> int:
    """Write ``mib`` MiB of lines to the console; returns the bytes written."""
    line = b"hostile console flood: the guest writes as much as it likes %09d\n"
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    try:
        n = 0
        while written < mib << 20:
            chunk = b"".join(line % (n + i) for i in range(1024))
            n += 1024
            written += os.write(fd, chunk)
        os.write(fd, f"\n{CONSOLE_DONE} {written}\n".encode())
    finally:
        os.close(fd)
    return written


class Hostile:
    """The agent's handlers and port, turned hostile (see the module's doc)."""

    def __init__(self, modes: frozenset[str]) -> None:
        self.modes = modes
        self.writer: asyncio.StreamWriter | None = None
        self.flooding: asyncio.Task[None] | None = None

    def arm(self, server: Server, methods: dict[str, tuple[type[Message], Handler]]) -> None:
        """Re-register the verbs the modes change on the agent's ``server``;
        ``methods`` are the agent's own (request type, guarded handler) by name."""
        log.warning("HOSTILE AGENT (a test double): %s", ", ".join(sorted(self.modes)))
        if "oom-flood" in self.modes:
            self._oom_flood(server, methods["GetOOMEvent"][1])
        if "ignore-kill" in self.modes:
            server.register_typed(
                AGENT_SERVICE, "SignalProcess", pb.SignalProcessRequest, self._ignore_kill
            )
        if "frame-flood" in self.modes:
            self._frame_flood(server, methods["StartContainer"][1])
        if "console-flood" in self.modes:
            threading.Thread(target=flood_console, name="console-flood", daemon=True).start()

    def _oom_flood(self, server: Server, real: Handler) -> None:
        forged = forged_oom_ids()

        sent = 0

        async def get_oom_event(req: pb.GetOOMEventRequest) -> Message:
            nonlocal sent
            cid = next(forged, None)
            if cid is None:
                if sent >= 0:
                    log.warning("%s %d", OOM_DONE, sent)
                    sent = -1
                return await real(req)
            sent += 1
            return pb.OOMEvent(container_id=cid)

        server.register_typed(AGENT_SERVICE, "GetOOMEvent", pb.GetOOMEventRequest, get_oom_event)

    async def _ignore_kill(self, req: pb.SignalProcessRequest) -> Message:
        log.warning(
            "hostile: ignoring signal %d to %s/%s", req.signal, req.container_id, req.exec_id
        )
        return pb.Empty()

    def _frame_flood(self, server: Server, real: Handler) -> None:
        serve = server.serve_connection

        async def serve_connection(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            self.writer = writer  # the port the host reads
            await serve(reader, writer)

        setattr(server, "serve_connection", serve_connection)  # noqa: B010 - a test double

        async def start_container(req: pb.StartContainerRequest) -> Message:
            reply = await real(req)
            if self.flooding is None and self.writer is not None:
                self.flooding = asyncio.ensure_future(self._flood(self.writer))
            return reply

        server.register_typed(
            AGENT_SERVICE, "StartContainer", pb.StartContainerRequest, start_container
        )

    async def _flood(self, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)  # StartContainer's answer is home
        frames = flood_frames()
        sent = 0
        try:
            while sent < FRAME_FLOOD:
                for _ in range(1000):
                    writer.write(frames[sent % len(frames)])
                    sent += 1
                await asyncio.wait_for(writer.drain(), 2)
        except (OSError, TimeoutError, RuntimeError) as e:
            log.warning("hostile: the host stopped taking frames after %d: %r", sent, e)
            return
        log.warning("hostile: %d frames sent", sent)
