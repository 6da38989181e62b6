"""The stdio of a process (carapace.shim.stdio) and the service's event loop: a stream
that ends must leave the loop watching none of its fds. A closed fd's number is soon
another file's (the service's next connection); a loop still watching that number
never adds the new file to its selector, and that connection is never answered."""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import termios
import tty
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.shim.stdio import InputFifo, OutputFifo

T = TypeVar("T")
BOUND = 10.0  # a bound on waits that must end, never a measured time


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 2 * BOUND))


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


async def open_writer(path: str) -> int:
    """The client's end of ``path``, once a reader waits in open(2) for it."""
    async with asyncio.timeout(BOUND):
        while True:
            try:
                return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                await asyncio.sleep(0.005)


async def consume(stdin: InputFifo, into: list[bytes]) -> None:
    async for chunk in stdin.chunks():
        into.append(chunk)


async def waiting_reader(path: str) -> tuple[InputFifo, asyncio.Task[None], list[bytes], int]:
    """An InputFifo whose chunks() waits for data (its client's end open, silent)."""
    stdin = InputFifo(path)
    got: list[bytes] = []
    task = asyncio.create_task(consume(stdin, got))
    writer = await open_writer(path)
    async with asyncio.timeout(BOUND):
        while stdin.fd < 0:  # once open, the pump reads, finds nothing and waits
            await asyncio.sleep(0.005)
    await asyncio.sleep(0)
    assert not task.done()
    return stdin, task, got, writer


async def served_at(fd: int) -> bytes:
    """Put a new connection at fd number ``fd`` (as the service's next accept would
    get it) and read what its peer sends through the loop."""
    ours, peer = socket.socketpair()
    if ours.fileno() != fd:
        os.dup2(ours.fileno(), fd)
        ours.close()
        ours = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    try:
        peer.sendall(b"ping")
        return await asyncio.wait_for(reader.readexactly(4), BOUND)
    finally:
        writer.close()
        peer.close()


def test_a_cancelled_stdin_pump_leaves_no_fd_watched(fifo: str) -> None:
    """The process exited: the relay cancels the stdin pump, then the stdio is closed.
    The next connection, given the stdin fd's number, is served."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stdin, task, got, writer = await waiting_reader(fifo)
        fd = stdin.fd
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stdin.close()
        os.close(writer)
        assert not loop.remove_reader(fd), f"the loop still watches closed fd {fd}"
        assert await served_at(fd) == b"ping"
        assert got == []

    run(main())


def test_closing_stdin_under_a_waiting_pump_ends_it_and_leaves_no_fd_watched(fifo: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stdin, task, got, writer = await waiting_reader(fifo)
        fd = stdin.fd
        stdin.close()
        await asyncio.wait_for(task, BOUND)  # the pump ends: its stream is gone
        os.close(writer)
        assert not loop.remove_reader(fd), f"the loop still watches closed fd {fd}"
        assert await served_at(fd) == b"ping"
        assert got == []

    run(main())


def test_close_input_under_a_waiting_pump_ends_it(fifo: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stdin, task, got, writer = await waiting_reader(fifo)
        os.write(writer, b"last words")
        stdin.close_input()
        await asyncio.wait_for(task, BOUND)
        assert got == [b"last words"]
        fd = stdin.fd
        stdin.close()
        os.close(writer)
        assert not loop.remove_reader(fd)

    run(main())


def test_closing_output_under_a_blocked_write_leaves_no_fd_watched(fifo: str) -> None:
    """A write waiting for room (nobody reads the fifo) when the stdio is closed."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        out = OutputFifo(fifo)
        fd = out.fd
        task = asyncio.create_task(out.write(b"x" * (4 << 20)))
        await asyncio.sleep(0)  # the write fills the fifo and waits for room
        assert not task.done()
        out.close()
        await asyncio.wait_for(task, BOUND)
        assert not loop.remove_writer(fd), f"the loop still watches closed fd {fd}"
        assert await served_at(fd) == b"ping"

    run(main())


def test_a_terminal_whose_master_is_in_flight_has_not_ended() -> None:
    """``create`` sends the pty master to the engine's console socket and closes its
    own: while the master is only in flight (in the socket), the terminal is not hung
    up, the slave reads nothing yet (no end of input), and what the engine writes
    once it took the master arrives."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    engine, runtime = socket.socketpair()
    path = f"/proc/self/fd/{slave}"  # how the service opens the stand-in's slave

    async def main() -> None:
        stdin = InputFifo(path)
        got: list[bytes] = []
        task = asyncio.create_task(consume(stdin, got))
        socket.send_fds(runtime, [b"/dev/ptmx"], [master])
        os.close(master)  # only the socket holds the master now
        async with asyncio.timeout(BOUND):
            while stdin.fd < 0:  # once open, the pump reads, finds nothing and waits
                await asyncio.sleep(0.005)
        await asyncio.sleep(0)
        assert not task.done() and got == []
        _, fds, _, _ = socket.recv_fds(engine, 64, 1)
        received = array.array("i", fds)[0]
        try:
            os.write(received, b"typed")
            async with asyncio.timeout(BOUND):
                while not got:
                    await asyncio.sleep(0.005)
            assert got == [b"typed"]
            assert not task.done()
        finally:
            stdin.close()
            await asyncio.wait_for(task, BOUND)
            os.close(received)

    try:
        run(main())
    finally:
        os.close(slave)
        engine.close()
        runtime.close()
