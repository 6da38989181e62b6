"""The stdio of container processes: pipes or a pty (crun's console socket), relayed
to the host by the WriteStdin, ReadStdout, ReadStderr, CloseStdin and TtyWinResize
verbs."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
import struct
import termios
from collections.abc import Awaitable, Callable

from carapace.guest.pod import Pod, Process
from carapace.guest.reaper import Reaper
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError

READ_CHUNK = 1 << 20  # most bytes one ReadStdout answer carries

#: ``launch(stdio, console_socket)``: runs crun create or exec for a process, with
#: its stdin/stdout/stderr fds (pipes) or the console socket crun sends the pty to.
Launch = Callable[[tuple[int, int, int] | None, str | None], Awaitable[None]]


# -- stream relays ----------------------------------------------------------------


async def read_pipe(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK)
    await loop.connect_read_pipe(lambda: _EIOTolerantProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


async def write_pipe(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    dummy = asyncio.StreamReader()  # StreamReaderProtocol gives drain() and wait_closed()
    transport, proto = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(dummy), os.fdopen(fd, "wb", 0)
    )
    return asyncio.StreamWriter(transport, proto, dummy, loop)


class _EIOTolerantProtocol(asyncio.StreamReaderProtocol):
    """A pty master reads EIO once the terminal's last user is gone: that is EOF."""

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            exc = None
        super().connection_lost(exc)


def close_process_streams(p: Process) -> None:
    if p.stdin is not None:
        p.stdin.close()
    for reader in (p.stdout, p.stderr):
        # a reader's pipe closes itself at end of file; one never read to the end is
        # closed here (StreamReader keeps its transport private)
        transport = getattr(reader, "_transport", None)
        if transport is not None and not transport.is_closing():
            transport.close()
    p.close_child_ends()
    if p.master_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(p.master_fd)
        p.master_fd = -1


# -- starting a process with its stdio ----------------------------------------------


#: Where crun's console sockets are made: a unix socket path has at most 107 bytes,
#: and a container's directory with a 64-character exec id (CRI's, Docker's) is longer.
CONSOLE_DIR = "/run/carapace-console"


def console_socket_path(workdir: str, tag: str) -> str:
    """A short socket path of its own for the process ``tag`` of ``workdir``."""
    os.makedirs(CONSOLE_DIR, mode=0o700, exist_ok=True)
    digest = hashlib.sha256(f"{workdir}\0{tag}".encode()).hexdigest()[:32]
    return os.path.join(CONSOLE_DIR, f"{digest}.sock")


async def spawn(proc: Process, workdir: str, launch: Launch, reaper: Reaper) -> None:
    """Create stdio for ``proc``, run ``launch(stdio, console_socket)`` (crun create
    or exec), then read the pid and start waiting for the process."""
    tag = proc.exec_id or "init"
    pid_file = os.path.join(workdir, f"{tag}.pid")
    console_task: asyncio.Task[int] | None = None
    stdio: tuple[int, int, int] | None = None
    sock_path: str | None = None
    listener: socket.socket | None = None
    try:
        if proc.terminal:
            sock_path = console_socket_path(workdir, tag)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock_path)
            listener.listen(1)
            listener.setblocking(False)
            console_task = asyncio.ensure_future(receive_fd(listener))
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            proc.fds_to_close = [in_r, out_w, err_w]
            stdio = (in_r, out_w, err_w)
            proc.stdin = await write_pipe(in_w)
            proc.stdout = await read_pipe(out_r)
            proc.stderr = await read_pipe(err_r)
        await launch(stdio, sock_path)
        proc.close_child_ends()
        if console_task is not None:
            master = await asyncio.wait_for(console_task, 10)
            proc.master_fd = master
            proc.stdout = await read_pipe(os.dup(master))
            proc.stdin = await write_pipe(os.dup(master))
        with open(pid_file) as f:
            proc.pid = int(f.read().strip())
        proc.exit = reaper.wait(proc.pid)
    except BaseException:
        proc.close_child_ends()
        if console_task is not None:
            console_task.cancel()
        close_process_streams(proc)
        raise
    finally:
        if listener is not None:
            listener.close()
        if sock_path:
            with contextlib.suppress(OSError):
                os.unlink(sock_path)


async def receive_fd(listener: socket.socket) -> int:
    """Accept crun's connection on the console socket and take the pty master fd."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    with conn:
        conn.setblocking(False)
        fds = array.array("i")
        while True:
            try:
                _msg, anc, _flags, _addr = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
                break
            except BlockingIOError:
                await _readable(loop, conn.fileno())
        for level, ctype, data in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise OSError("crun sent no terminal fd on the console socket")
        return fds[0]


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


# -- the verbs ----------------------------------------------------------------------


class StdioService:
    """WriteStdin, ReadStdout, ReadStderr, CloseStdin, TtyWinResize."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod

    async def write_stdin(self, req: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        p = self.pod.process(req.container_id, req.exec_id)
        if p.stdin is None or p.stdin.is_closing():
            raise TtrpcError(Code.FAILED_PRECONDITION, "stdin is closed")
        p.stdin.write(req.data)
        try:
            await p.stdin.drain()
        except (ConnectionError, OSError) as e:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"stdin: {e}") from e
        return pb.WriteStreamResponse(len=len(req.data))

    async def read_stdout(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await _read(self.pod.process(req.container_id, req.exec_id).stdout, req.len)

    async def read_stderr(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await _read(self.pod.process(req.container_id, req.exec_id).stderr, req.len)

    async def close_stdin(self, req: pb.CloseStdinRequest) -> pb.Empty:
        p = self.pod.process(req.container_id, req.exec_id)
        if p.terminal and p.stdin is not None and not p.stdin.is_closing():
            p.stdin.write(b"\x04")  # a terminal has no EOF of its own: send ^D
            return pb.Empty()
        if p.stdin is not None:
            p.stdin.close()
        return pb.Empty()

    async def tty_win_resize(self, req: pb.TtyWinResizeRequest) -> pb.Empty:
        p = self.pod.process(req.container_id, req.exec_id)
        if p.master_fd < 0:
            raise TtrpcError(Code.FAILED_PRECONDITION, "the process has no terminal")
        fcntl.ioctl(p.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", req.row, req.column, 0, 0))
        return pb.Empty()


async def _read(stream: asyncio.StreamReader | None, n: int) -> pb.ReadStreamResponse:
    if stream is None:
        return pb.ReadStreamResponse(eof=True)
    data = await stream.read(min(n or READ_CHUNK, READ_CHUNK))
    # the last bytes of a stream whose writers are gone come with its end: one
    # exchange fewer per stream of a short-lived process
    return pb.ReadStreamResponse(data=data, eof=not data or stream.at_eof())
