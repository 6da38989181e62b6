"""A process's stdio fifos (carapace.shim.stdio), with real fifos."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.shim.stdio import InputFifo, OutputFifo, ProcessStdio

T = TypeVar("T")

MIB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """File descriptors a test opens; closed afterwards whatever happens."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


async def open_writer(path: str, timeout: float = 2) -> int:
    """Open ``path`` for writing the way a client does, once a reader waits on it
    (without blocking the event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)
            continue
        os.set_blocking(fd, True)
        return fd


def open_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("open ")]


def non_daemon_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]


async def no_open_thread_left() -> None:
    """The thread that opened (or waited to open) the fifo has ended."""
    deadline = time.monotonic() + 1
    while open_threads():
        assert time.monotonic() < deadline, f"threads left: {open_threads()}"
        await asyncio.sleep(0.005)


# --- OutputFifo ------------------------------------------------------------------------


def test_output_writes_arrive_in_order(fifo: str, fds: list[int]) -> None:
    async def main() -> None:
        out = OutputFifo(fifo)  # opening never waits for a reader
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        fds.append(reader)
        for i in range(100):
            await out.write(f"line {i}\n".encode())
        expected = b"".join(f"line {i}\n".encode() for i in range(100))
        assert os.read(reader, 2 * len(expected)) == expected
        out.close()
        out.close()  # idempotent
        assert os.read(reader, 10) == b""  # the only writer is gone

    run(main())


def test_output_without_a_reader_yet_is_buffered(fifo: str, fds: list[int]) -> None:
    async def main() -> None:
        out = OutputFifo(fifo)
        await out.write(b"early\n")
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        fds.append(reader)
        await out.write(b"late\n")
        assert os.read(reader, 100) == b"early\nlate\n"
        out.close()

    run(main())


def test_large_write_to_a_slow_reader_does_not_block_the_loop(fifo: str, fds: list[int]) -> None:
    async def main() -> None:
        out = OutputFifo(fifo)
        reader = os.open(fifo, os.O_RDONLY)  # blocking reads, in a thread
        fds.append(reader)
        data = bytes(range(256)) * (MIB // 256)
        got = bytearray()

        def slow_reader() -> None:
            while len(got) < len(data):
                got.extend(os.read(reader, 64 * 1024))
                time.sleep(0.005)

        thread = threading.Thread(target=slow_reader, daemon=True)
        thread.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        started = time.monotonic()
        await out.write(data)
        elapsed = time.monotonic() - started
        tick_task.cancel()
        thread.join(5)
        assert bytes(got) == data
        # the write waited for the reader (a fifo holds 64 KiB) ...
        assert elapsed > 0.03
        # ... while the loop kept running other coroutines
        assert ticks >= 10, (ticks, elapsed)
        out.close()

    run(main())


def test_output_after_close_is_dropped(fifo: str, fds: list[int]) -> None:
    async def main() -> None:
        out = OutputFifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        fds.append(reader)
        out.close()
        await out.write(b"nobody")  # neither raises nor writes
        assert os.read(reader, 10) == b""

    run(main())


# --- InputFifo ------------------------------------------------------------------------------


async def collect(stdin: InputFifo, into: list[bytes]) -> None:
    async for chunk in stdin.chunks():
        into.append(chunk)


def test_input_yields_what_the_writer_writes_until_eof(fifo: str, fds: list[int]) -> None:
    async def main() -> None:
        stdin = InputFifo(fifo)
        got: list[bytes] = []
        task = asyncio.create_task(collect(stdin, got))
        writer = await open_writer(fifo)
        fds.append(writer)
        os.write(writer, b"hello ")
        await asyncio.sleep(0.01)
        os.write(writer, b"world\n")
        await asyncio.sleep(0.01)
        assert b"".join(got) == b"hello world\n"
        assert not task.done()
        os.close(writer)  # the client closes its end: end of file
        await asyncio.wait_for(task, 1)
        assert b"".join(got) == b"hello world\n"
        stdin.close()
        await no_open_thread_left()

    run(main())


def test_input_larger_than_a_read(fifo: str, fds: list[int]) -> None:
    async def main() -> None:
        stdin = InputFifo(fifo)
        got: list[bytes] = []
        task = asyncio.create_task(collect(stdin, got))
        writer = await open_writer(fifo)
        fds.append(writer)
        data = os.urandom(300 * 1024)
        await asyncio.to_thread(os.write, writer, data)  # blocks until read
        os.close(writer)
        await asyncio.wait_for(task, 2)
        assert b"".join(got) == data
        stdin.close()

    run(main())


def test_close_input_delivers_buffered_data_then_ends(fifo: str, fds: list[int]) -> None:
    """CloseIO while the client keeps the fifo open: what it wrote is still delivered."""

    async def main() -> None:
        stdin = InputFifo(fifo)
        got: list[bytes] = []
        task = asyncio.create_task(collect(stdin, got))
        writer = await open_writer(fifo)
        fds.append(writer)
        os.write(writer, b"first\n")
        async with asyncio.timeout(1):
            while not got:
                await asyncio.sleep(0.005)
        os.write(writer, b"second\n" + b"x" * 60000)
        stdin.close_input()
        await asyncio.wait_for(task, 1)  # ends although the writer is still open
        assert b"".join(got) == b"first\nsecond\n" + b"x" * 60000
        stdin.close()

    run(main())


def test_close_input_when_nothing_is_buffered(fifo: str, fds: list[int]) -> None:
    async def main() -> None:
        stdin = InputFifo(fifo)
        got: list[bytes] = []
        task = asyncio.create_task(collect(stdin, got))
        writer = await open_writer(fifo)
        fds.append(writer)
        await asyncio.sleep(0.02)  # chunks() waits for data
        stdin.close_input()
        await asyncio.wait_for(task, 1)
        assert got == []
        stdin.close()

    run(main())


def test_close_while_waiting_for_a_writer_releases_chunks(fifo: str) -> None:
    """A client that never opens its end of stdin must not keep chunks() (and its
    opening thread) waiting once the fifo is closed."""

    async def main() -> None:
        stdin = InputFifo(fifo)
        got: list[bytes] = []
        task = asyncio.create_task(collect(stdin, got))
        await asyncio.sleep(0.05)  # the opening thread waits in open(2) for a writer
        assert len(open_threads()) == 1
        assert not task.done()
        stdin.close()
        await asyncio.wait_for(task, 0.5)
        assert got == []
        await no_open_thread_left()

    run(main())
    assert non_daemon_threads() == []


async def release_openers(path: str) -> None:
    """Be the writer a stuck opening thread waits for (cleanup after a failed test)."""
    deadline = time.monotonic() + 2
    while open_threads() and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        await asyncio.sleep(0.005)


def test_close_before_the_opening_thread_reached_open(
    fifo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same as above when the opening thread is scheduled late (made deterministic
    by delaying its open(2))."""
    real_open = os.open

    def late_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if threading.current_thread().name.startswith("open "):
            time.sleep(0.05)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", late_open)

    async def main() -> None:
        stdin = InputFifo(fifo)
        got: list[bytes] = []
        task = asyncio.create_task(collect(stdin, got))
        await asyncio.sleep(0)  # chunks() started its opening thread
        assert len(open_threads()) == 1
        stdin.close()
        try:
            await asyncio.wait_for(task, 0.2)
        finally:
            await release_openers(fifo)
        assert got == []

    run(main())


def test_chunks_after_close_ends_at_once(fifo: str) -> None:
    async def main() -> None:
        stdin = InputFifo(fifo)
        stdin.close()
        got: list[bytes] = []
        try:
            await asyncio.wait_for(collect(stdin, got), 0.2)
        finally:
            await release_openers(fifo)
        assert got == []

    run(main())


# --- ProcessStdio -----------------------------------------------------------------------------


def test_process_stdio_opens_what_is_named(tmp_path: Path) -> None:
    paths = []
    for name in ("stdin", "stdout", "stderr"):
        os.mkfifo(tmp_path / name)
        paths.append(str(tmp_path / name))

    async def main() -> None:
        both = ProcessStdio(paths[0], paths[1], paths[2], terminal=False)
        both.open()
        assert both.stdin is not None and both.stdout is not None and both.stderr is not None
        both.close()
        assert both.stdout.fd == -1 and both.stderr.fd == -1

        none = ProcessStdio("", paths[1], "", terminal=True)
        none.open()
        assert none.stdin is None and none.stderr is None and none.stdout is not None
        none.close()

    run(main())


def test_process_stdio_open_failure_closes_what_was_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "stdout")
    stdio = ProcessStdio("", str(tmp_path / "stdout"), str(tmp_path / "missing" / "err"), False)
    with pytest.raises(FileNotFoundError):
        stdio.open()
    assert stdio.stdout is not None and stdio.stdout.fd == -1
