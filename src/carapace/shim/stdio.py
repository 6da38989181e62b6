"""The fifos containerd hands a shim for a process's stdin, stdout and stderr.

Output fifos are opened read-write, as containerd's own shims do: opening never
blocks, and a reader that comes and goes never makes the writer fail. Stdin is
opened for reading once the client opened its end, and ends when the client closes
it or containerd says so (CloseIO); what is buffered is read first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator


class FdWait:
    """Waiting for an fd of ours to be readable (or writable), one waiter at a time.

    The event loop must forget an fd before it is closed: its number is soon another
    file's (a new connection, say), and a loop that still thinks it watches that
    number never adds the new file to its selector, so nothing ever reads it. A
    waiter cancelled with its task forgets the fd at once; ``forget`` (called before
    closing the fd) forgets it and wakes the waiter."""

    def __init__(self, writable: bool = False) -> None:
        self.writable = writable
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fut: asyncio.Future[None] | None = None

    async def wait(self, fd: int) -> None:
        """Until ``fd`` is ready, or ``forget`` was called."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if self.writable:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        self._fd, self._loop, self._fut = fd, loop, fut
        try:
            await fut
        finally:
            self.forget()

    def forget(self) -> None:
        """The loop stops watching the fd (still open: the caller closes it after)."""
        if self._fd >= 0 and self._loop is not None and not self._loop.is_closed():
            if self.writable:
                self._loop.remove_writer(self._fd)
            else:
                self._loop.remove_reader(self._fd)
        self._fd = -1
        self._loop = None
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)
        self._fut = None


async def _open_in_thread(path: str, flags: int, opened: threading.Event) -> int:
    """open(2) that may block (a fifo waiting for its other end), in a daemon thread:
    a client that never opens its end must not keep the shim from exiting. ``opened``
    is set once the open returned."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def run() -> None:
        try:
            fd = os.open(path, flags)
        except OSError as e:
            opened.set()
            loop.call_soon_threadsafe(_settle, fut, None, e)
        else:
            opened.set()
            loop.call_soon_threadsafe(_settle, fut, fd, None)

    threading.Thread(target=run, name=f"open {path}", daemon=True).start()
    return await fut


def _release_opener(path: str, opened: threading.Event, patience: float = 10.0) -> None:
    """Be, briefly, the writer a thread blocked opening ``path`` for reading waits for.
    Retries until that thread is in open(2) (before it, a writer cannot open)."""

    def run() -> None:
        deadline = time.monotonic() + patience
        while not opened.is_set() and time.monotonic() < deadline:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                return
            except OSError:
                time.sleep(0.01)

    threading.Thread(target=run, name=f"release {path}", daemon=True).start()


def _settle(fut: asyncio.Future[int], fd: int | None, error: OSError | None) -> None:
    if fut.done():  # nobody waits any more
        if fd is not None:
            os.close(fd)
    elif error is not None:
        fut.set_exception(error)
    else:
        assert fd is not None
        fut.set_result(fd)


def open_fifo(path: str) -> int:
    """Open a fifo (or any file containerd named) read-write and non-blocking."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class OutputFifo:
    """An output stream of a process: bytes written in order, never blocking the loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = open_fifo(path)
        self.broken = False
        self._writable = FdWait(writable=True)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken and self.fd >= 0:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                await self._writable.wait(self.fd)
                continue
            except OSError:  # the reader went away for good
                self.broken = True
                return
            view = view[n:]

    def close(self) -> None:
        self._writable.forget()  # before the fd's number can be another file's
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class InputFifo:
    """A process's stdin: yields what the client writes until it closes its end of the
    fifo (end of file) or containerd's CloseIO says stdin is closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.closing = asyncio.Event()
        self._opening = False
        self._opened = threading.Event()
        self._closed = False
        self._readable = FdWait()

    def close_input(self) -> None:
        """The client closed stdin: deliver what is buffered, then end."""
        self.closing.set()
        self._readable.forget()  # chunks() reads what is there and ends

    def _read(self) -> bytes | None:
        """Up to 64 KiB, b"" at end of file, None when nothing is there now."""
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return None

    async def _open(self) -> bool:
        """Open the fifo for reading; that waits for the client to open its end (a
        reader that opened first would see end of file before anything was written)."""
        if self._closed:
            return False
        self._opening = True
        try:
            fd = await _open_in_thread(self.path, os.O_RDONLY | os.O_CLOEXEC, self._opened)
        finally:
            self._opening = False
        if self._closed:  # closed while opening
            os.close(fd)
            return False
        self.fd = fd
        os.set_blocking(fd, False)
        return True

    async def chunks(self) -> AsyncIterator[bytes]:
        if not await self._open():
            return
        while self.fd >= 0:
            data = self._read()
            if data:
                yield data
                continue
            if data == b"" or self.closing.is_set():
                return
            await self._readable.wait(self.fd)

    def close(self) -> None:
        self._closed = True
        self._readable.forget()  # before the fd's number can be another file's
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        elif self._opening:
            _release_opener(self.path, self._opened)


class ProcessStdio:
    """The fifos of one process; empty paths mean the stream is not wanted."""

    def __init__(self, stdin: str, stdout: str, stderr: str, terminal: bool) -> None:
        self.paths = (stdin, stdout, stderr)
        self.terminal = terminal
        self.stdin: InputFifo | None = None
        self.stdout: OutputFifo | None = None
        self.stderr: OutputFifo | None = None

    def open(self) -> None:
        stdin, stdout, stderr = self.paths
        try:
            if stdin:
                self.stdin = InputFifo(stdin)
            if stdout:
                self.stdout = OutputFifo(stdout)
            if stderr:
                self.stderr = OutputFifo(stderr)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
