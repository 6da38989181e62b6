"""Child reaping for the agent, which is PID 1 of the guest.

Every process that exits in the guest outside a container's own PID namespace ends
up as our child (crun's helpers, containers' init processes once crun detaches).
One SIGCHLD handler reaps them all and hands each status to whoever waits for that
pid, so no other code may call waitpid.
"""

from __future__ import annotations

import asyncio
import os
import signal


def exit_status(wait_status: int) -> int:
    """A shell-style exit status: the exit code, or 128 + N for a death by signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


class Reaper:
    """Reaps every child and resolves the futures of those who wait for one."""

    MAX_UNCLAIMED = 4096

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._unclaimed: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_status(status)
            waiters = self._waiters.pop(pid, None)
            if waiters:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(code)
            else:
                if len(self._unclaimed) >= self.MAX_UNCLAIMED:
                    self._unclaimed.pop(next(iter(self._unclaimed)))
                self._unclaimed[pid] = code

    def wait(self, pid: int) -> asyncio.Future[int]:
        """A future resolved with ``pid``'s exit status (already, if it has exited)."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        if pid in self._unclaimed:
            fut.set_result(self._unclaimed.pop(pid))
        else:
            self._waiters.setdefault(pid, []).append(fut)
        return fut
