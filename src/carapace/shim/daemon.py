"""The shim's serving daemon (what ``start`` spawns for a pod): logging in
containerd's format to the bundle's ``log`` fifo, and the task API served on the pod's
socket until Shutdown. Imported only in that mode: ``start`` and ``delete`` never pay
for asyncio, logging or the sandbox package."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from carapace import __version__
from carapace.shim.command import LISTEN_FD_ENV, ShimArgs

log = logging.getLogger("carapace.shim")


class LogrusFormatter(logging.Formatter):
    """Times as containerd's own log lines have them: UTC, RFC 3339, with the
    milliseconds (a shim's steps take a few of them)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return logrus_time(record.created)


def logrus_time(seconds: float) -> str:
    """``seconds`` since the epoch as ``2026-11-26T19:28:58.123Z``."""
    whole = int(seconds)
    millis = min(int((seconds - whole) * 1000), 999)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{millis:03d}Z"


def _setup_logging(debug: bool, pod: str) -> None:
    """Log to the ``log`` fifo containerd reads in the bundle (stderr if it is absent)."""
    stream: Any = sys.stderr
    with contextlib.suppress(OSError):
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        stream = os.fdopen(fd, "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        LogrusFormatter(
            f'time="%(asctime)s" level=%(levelname)s msg="%(message)s" '
            f"runtime=io.containerd.carapace.v2 pod={pod[:12]}"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # pyroute2 logs every netlink message at debug level: not the shim's detail
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


async def serve(args: ShimArgs) -> int:
    import asyncio

    from carapace.shim.events import Publisher
    from carapace.shim.service import TaskService
    from carapace.ttrpc import Server

    _setup_logging(args.debug, args.id)
    fd = int(os.environ.pop(LISTEN_FD_ENV))
    listener = socket.socket(fileno=fd)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)
    service = TaskService(args.id, args.namespace, publisher, os.environ.get("CARAPACE_CONFIG"))
    server = Server()
    service.register(server)
    srv = await asyncio.start_unix_server(server.serve_connection, sock=listener)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.shutdown_requested.set)
    log.info(
        "shim %s serving pod %s on %s (pid %d)", __version__, args.id, args.socket, os.getpid()
    )
    try:
        await service.shutdown_requested.wait()
        await asyncio.sleep(0.05)  # let the Shutdown reply leave
    finally:
        srv.close()
        await service.close()
        await publisher.flush(5)
        await publisher.close()
        await server.close()
        if args.socket:
            with contextlib.suppress(OSError):
                os.unlink(args.socket)
        log.info("shim for pod %s exits", args.id)
    return 0
