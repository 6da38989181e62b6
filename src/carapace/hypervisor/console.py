"""The guest's serial console on the host, capped: the guest writes as much as it likes,
the host keeps at most ``CONSOLE_LOG_MAX`` bytes of the newest output.

QEMU's serial port goes to a socket whose other end the VM's owner reads
(``ConsoleLog.pump``); the bytes go to ``console.log`` until it holds half the cap,
then that file becomes ``console.log.1`` (replacing the older half) and a new
``console.log`` starts. ``console_tail`` reads the last lines of the two by seeking
from their ends. A reader that stops (its owner gone) costs the guest nothing on the
host: QEMU drops console output nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import BinaryIO

from carapace.hypervisor.base import tail

log = logging.getLogger("carapace.console")

#: The most bytes of console output kept on the host (both files together).
CONSOLE_LOG_MAX = 1 << 20
_READ_CHUNK = 64 << 10
_GATHER = 0.02


def _open(path: Path) -> BinaryIO:
    """``path`` for appending, mode 0600 whatever the umask."""
    return os.fdopen(
        os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab"
    )


def older(path: Path) -> Path:
    """Where the older half of a capped log is kept."""
    return path.with_name(path.name + ".1")


class ConsoleLog:
    """A log of at most ``cap`` bytes in two files: ``path`` (newest) and ``path.1``."""

    def __init__(self, path: Path, cap: int = CONSOLE_LOG_MAX) -> None:
        self.path = path
        self.half = max(1, cap // 2)
        self._file: BinaryIO = _open(path)
        self._size = self._file.tell()
        #: Every byte the guest wrote, kept or not.
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        while data:
            room = self.half - self._size
            if room <= 0:
                self._rotate()
                continue
            chunk, data = data[:room], data[room:]
            self._file.write(chunk)
            self._size += len(chunk)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        self.path.replace(older(self.path))
        self._file = _open(self.path)
        self._size = 0

    def close(self) -> None:
        self._file.close()

    async def pump(self, sock: socket.socket) -> None:
        """Copy what arrives on ``sock`` (the host's end of the serial port) until EOF."""
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
            while data := await reader.read(_READ_CHUNK):
                self.write(data)
                if len(data) < _READ_CHUNK // 2:
                    # QEMU's serial port writes a byte at a time: let output gather in
                    # the socket rather than wake for each byte (the guest only waits
                    # when the socket's buffer is full)
                    await asyncio.sleep(_GATHER)
        except (ConnectionError, OSError) as e:
            log.debug("console of %s: %s", self.path.parent.name, e)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
            else:
                sock.close()
            self.close()


def console_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a capped log (``ConsoleLog``), read from the ends."""
    newest = tail(path, lines)
    have = len(newest.splitlines())
    if have >= lines or not older(path).exists():
        return newest
    before = tail(older(path), lines - have)
    return "\n".join(t for t in (before, newest) if t)
