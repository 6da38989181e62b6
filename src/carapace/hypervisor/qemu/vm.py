"""A running QEMU process: start, QMP, graceful shutdown with a deadline, kill."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from pathlib import Path

from qemu.qmp import QMPClient

from carapace.errors import HypervisorError
from carapace.hypervisor import VMSpec
from carapace.hypervisor.qemu.cmdline import qemu_argv

log = logging.getLogger("carapace.qemu")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class QemuVM:
    """One QEMU process running one pod VM."""

    def __init__(self, binary: str, spec: VMSpec, die_with_owner: bool = True) -> None:
        self.binary = binary
        self.spec = spec
        self.die_with_owner = die_with_owner
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None

    @property
    def argv(self) -> list[str]:
        return qemu_argv(self.binary, self.spec)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> int:
        """Start QEMU; returns its pid once the agent socket exists."""
        if not Path(self.binary).exists():
            raise HypervisorError(
                f"QEMU binary {self.binary} not found; install qemu-system-x86 or set "
                "[hypervisor] path in configuration.toml"
            )
        log_file = open(self.spec.qemu_log, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_owner else None,
            )
        finally:
            log_file.close()
        # QEMU creates its sockets before it starts the guest
        while not self.spec.agent_socket.exists():
            if self.proc.returncode is not None:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 0.01)
        if self.proc.returncode is not None:
            raise HypervisorError(
                f"QEMU exited with status {self.proc.returncode} at start: "
                f"{tail(self.spec.qemu_log, 5) or '(no output)'}"
            )
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def qmp_connect(self) -> QMPClient:
        if self.qmp is None:
            qmp = QMPClient(f"carapace-{self.spec.name}")
            await qmp.connect(str(self.spec.qmp_socket))
            self.qmp = qmp
        return self.qmp

    async def qmp_execute(self, command: str, **args: object) -> object:
        qmp = await self.qmp_connect()
        return await qmp.execute(command, args or None)

    async def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the guest to power off, then ``quit``, then kill."""
        if self.proc is None:
            return
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.warning("VM %s did not power off in %gs; quitting it", self.spec.name, timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp_execute("quit"), 2)
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.kill()
                await self.proc.wait()
        await self.close_qmp()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    async def close_qmp(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
