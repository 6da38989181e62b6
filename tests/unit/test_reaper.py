"""Child reaping for the guest agent (carapace.guest.reaper), with real child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.guest.reaper import Reaper, exit_status

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


def fork_and_wait(child: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child()
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return status


def test_exit_status_of_an_exit_code() -> None:
    assert exit_status(fork_and_wait(lambda: os._exit(3))) == 3
    assert exit_status(fork_and_wait(lambda: os._exit(0))) == 0
    assert exit_status(fork_and_wait(lambda: os._exit(255))) == 255


def test_exit_status_of_a_signal_death() -> None:
    status = fork_and_wait(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert exit_status(status) == 137
    status = fork_and_wait(lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert exit_status(status) == 128 + signal.SIGTERM


def test_exit_status_of_a_killed_child() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            time.sleep(60)
        finally:
            os._exit(0)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert exit_status(status) == 137


def test_exit_status_of_a_stopped_status() -> None:
    stopped = (signal.SIGSTOP << 8) | 0x7F  # what waitpid reports with WUNTRACED
    assert exit_status(stopped) == 255


def sh(script: str) -> int:
    return os.posix_spawn("/bin/sh", ["sh", "-c", script], {"PATH": "/usr/bin:/bin"})


async def until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="no /bin/sh")
def test_reaper_resolves_waiters() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        a = sh("sleep 0.2; exit 4")
        b = sh("sleep 0.3; exit 0")
        c = sh("sleep 0.2; kill -9 $$")
        fa, fb, fc = reaper.wait(a), reaper.wait(b), reaper.wait(c)
        assert not fa.done()
        assert list(await asyncio.gather(fa, fb, fc)) == [4, 0, 137]
        assert reaper._unclaimed == {}
        assert reaper._waiters == {}

    run(main())


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="no /bin/sh")
def test_reaper_child_that_exits_before_wait() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        pid = sh("exit 7")
        # the SIGCHLD handler reaps it while nobody waits for it yet
        await until(lambda: pid in reaper._unclaimed)
        fut = reaper.wait(pid)
        assert fut.done()
        assert fut.result() == 7
        assert pid not in reaper._unclaimed

    run(main())


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="no /bin/sh")
def test_reaper_install_reaps_children_that_exited_before() -> None:
    pid = sh("exit 9")
    # let it exit and become a zombie before there is any handler
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)

    async def main() -> int:
        reaper = Reaper()
        reaper.install()
        return await reaper.wait(pid)

    assert run(main()) == 9


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="no /bin/sh")
def test_reaper_two_waiters_for_one_pid() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        pid = sh("sleep 0.1; exit 2")
        f1, f2 = reaper.wait(pid), reaper.wait(pid)
        assert await f1 == 2
        assert await f2 == 2

    run(main())


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="no /bin/sh")
def test_reaper_unclaimed_statuses_are_bounded() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.MAX_UNCLAIMED = 2
        reaper.install()
        pids = []
        for code in (1, 2, 3):
            pid = sh(f"exit {code}")
            await until(lambda pid=pid: pid in reaper._unclaimed)
            pids.append(pid)
        # the oldest was dropped to make room
        assert list(reaper._unclaimed) == pids[1:]
        assert await reaper.wait(pids[2]) == 3

    run(main())
