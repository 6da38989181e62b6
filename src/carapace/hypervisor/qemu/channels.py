"""The sockets between carapace and QEMU, made by carapace and handed to QEMU as fds.

QEMU never creates a socket file: the agent's and QMP's listening sockets are bound by
carapace and made mode 0600 before they listen (whatever the umask, nobody but root
connects to them, ever), and the serial console is one end of a socket pair whose other
end the host reads into a capped log (``hypervisor.console``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from carapace.daemons import listen_unix
from carapace.hypervisor.base import VMSpec


@dataclass(frozen=True)
class ChannelFds:
    """The fds QEMU inherits for its channels (see ``cmdline.qemu_argv``)."""

    agent: int  # listening: the agent's virtio-serial port
    qmp: int  # listening: the QMP monitor
    console: int  # connected: the serial console


@dataclass
class Channels:
    """The sockets of one VM: QEMU's ends (closed here once QEMU has them) and the
    host's end of the console."""

    agent: socket.socket
    qmp: socket.socket
    console_qemu: socket.socket
    console_host: socket.socket

    @classmethod
    def open(cls, spec: VMSpec) -> Channels:
        made: list[socket.socket] = []
        try:
            made.append(listen_unix(spec.agent_socket))
            made.append(listen_unix(spec.qmp_socket))
            made.extend(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
        except BaseException:
            for s in made:
                s.close()
            raise
        agent, qmp, console_qemu, console_host = made
        return cls(agent, qmp, console_qemu, console_host)

    @property
    def fds(self) -> ChannelFds:
        return ChannelFds(self.agent.fileno(), self.qmp.fileno(), self.console_qemu.fileno())

    @property
    def qemu_fds(self) -> list[int]:
        """The fds QEMU must inherit."""
        f = self.fds
        return [f.agent, f.qmp, f.console]

    def close_qemu_ends(self) -> None:
        """Close carapace's copies of what QEMU inherited (its own stay open)."""
        for s in (self.agent, self.qmp, self.console_qemu):
            s.close()

    def close(self) -> None:
        self.close_qemu_ends()
        self.console_host.close()
