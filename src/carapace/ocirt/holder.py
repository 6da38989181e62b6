"""The host process that stands for a container's process (or an exec's).

runc's callers need a real host process per container: the pid in ``--pid-file``.
containerd's runc shim and conmon reap it (they are subreapers) and take its exit
status for the container's; dockerd reads ``/proc/<pid>/ns/net`` to set up the
container's network, and kills the pid when a kill does not end the container;
Podman's pod members name the infra's ``/proc/<pid>/ns/*``. In a pod VM the process
runs in the guest, so ``create`` forks this stand-in:

- it enters the spec's network, ipc and uts namespaces (a new one where the spec names
  no path): what an engine puts into its network namespace (after ``create``'s
  prestart hooks, before the VM boots) becomes the pod's interfaces;
- it keeps the process's stdio, which the pod's service opens through
  ``/proc/<pid>/fd/N`` (stdin is relayed through a fifo: a pipe whose writer is gone
  cannot be opened again), and with a terminal the host pty's slave end, whose master
  went to ``--console-socket``; a window size change (SIGWINCH: the slave is its
  controlling terminal) becomes a ``ResizePty``;
- catchable signals sent to it are forwarded to the container's process;
- it waits for the process (``Wait``) and exits with its status (128+N for a signal).
  A stand-in for an exec deletes the exec from the service first.

It is forked before anything is decided and waits on a pipe: ``go`` hands it the
service's socket once the container exists; the pipe closed without ``go`` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import stat
import struct
import sys
import termios
import threading
import tty
from dataclasses import dataclass
from typing import Any

from google.protobuf.empty_pb2 import Empty

from carapace import linux
from carapace.errors import HostError
from carapace.protocols.containerd import shim_pb2 as api
from carapace.shim.params import TASK_SERVICE as SERVICE
from carapace.ttrpc import TtrpcError
from carapace.ttrpc.client import Client

#: The status a stand-in exits with when the service is gone (its VM with it).
LOST_STATUS = 128 + signal.SIGKILL
#: Signals a stand-in forwards to the container's process.
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGTSTP,
    signal.SIGALRM,
    signal.SIGPIPE,
)


def is_dev_null(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return True  # closed: as good as /dev/null
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def _reopenable(fd: int) -> bool:
    """Whether the service may open our ``fd`` again by ``/proc/PID/fd/N`` and write
    to it as we would: a pipe or a terminal (a regular file would be opened at offset
    0, a socket cannot be opened)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


@dataclass
class StdioPlan:
    """How a process's stdio reaches the service: ``paths`` (stdin, stdout, stderr) it
    opens, ``relays`` (fifo, our fd) the stand-in copies; fifos made by ``make``."""

    paths: tuple[str, str, str]
    relays: list[tuple[str, int]]

    @classmethod
    def make(cls, pid: int, terminal_fd: int, fifo_prefix: str) -> StdioPlan:
        if terminal_fd >= 0:
            slave = f"/proc/{pid}/fd/{terminal_fd}"
            return cls((slave, slave, ""), [])
        paths: list[str] = []
        relays: list[tuple[str, int]] = []
        for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            if is_dev_null(fd):
                paths.append("")
            elif fd > 0 and _reopenable(fd):
                paths.append(f"/proc/{pid}/fd/{fd}")
            else:  # stdin always: a pipe whose writer is gone cannot be opened again
                fifo = f"{fifo_prefix}{name}"
                os.mkfifo(fifo, 0o600)
                paths.append(fifo)
                relays.append((fifo, fd))
        return cls((paths[0], paths[1], paths[2]), relays)

    def remove(self) -> None:
        for fifo, _ in self.relays:
            with contextlib.suppress(OSError):
                os.unlink(fifo)

    def start_relays(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=_relay, args=(fifo, fd), daemon=True)
            for fifo, fd in self.relays
        ]
        for t in threads:
            t.start()
        return threads


def _relay(fifo: str, fd: int) -> None:
    """Copy between our ``fd`` and the service's end of ``fifo``: stdin to it (closed
    at our end of file), output from it (until the service closes it). The fifo goes
    once both ends are open."""
    try:
        f = os.open(fifo, (os.O_WRONLY if fd == 0 else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.unlink(fifo)
    src, dst = (0, f) if fd == 0 else (f, fd)
    try:
        while data := os.read(src, 65536):
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
    except OSError:
        pass
    finally:
        os.close(f)


@dataclass
class Holder:
    """The parent's handle on a stand-in it forked."""

    pid: int
    go_fd: int

    def go(self, socket_path: str, cid: str, exec_id: str, stdio: StdioPlan) -> None:
        msg = {"socket": socket_path, "id": cid, "exec_id": exec_id, "relays": stdio.relays}
        os.write(self.go_fd, json.dumps(msg).encode() + b"\n")
        os.close(self.go_fd)
        self.go_fd = -1

    def abort(self) -> None:
        """End the stand-in (the container was not made)."""
        if self.go_fd >= 0:
            os.close(self.go_fd)
            self.go_fd = -1
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _enter_namespaces(namespaces: list[tuple[str, str]]) -> None:
    new = 0
    for name, path in namespaces:
        if path:
            linux.setns_path(path, linux.NAMESPACE_FLAGS[name])
        else:
            new |= linux.NAMESPACE_FLAGS[name]
    if new:
        linux.unshare(new)


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def fork(namespaces: list[tuple[str, str]], terminal_fd: int = -1) -> Holder:
    """Fork a stand-in in ``namespaces`` (see ``bundlespec.holder_namespaces``)
    holding ``terminal_fd`` (a pty slave, or -1); returns once it is in them."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the stand-in
        status = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            _close_fds_except({ready_w, go_r, terminal_fd})
            try:
                _enter_namespaces(namespaces)
            except OSError as e:
                os.write(ready_w, f"E{e}".encode())
                os._exit(1)
            if terminal_fd >= 0:
                # the terminal is the process's stdio: the caller's pipes (which it may
                # read to their end, as go-runc reads create's output) are let go
                for fd in (0, 1, 2):
                    os.dup2(terminal_fd, fd)
                os.setsid()
                fcntl.ioctl(terminal_fd, termios.TIOCSCTTY, 0)
            os.write(ready_w, b"R")
            os.close(ready_w)
            status = _child_main(go_r, terminal_fd)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(go_r)
    try:
        answer = os.read(ready_r, 4096)
    finally:
        os.close(ready_r)
    holder = Holder(pid, go_w)
    if answer != b"R":
        holder.abort()
        why = answer[1:].decode(errors="replace") if answer else "it exited"
        raise HostError(f"cannot make the container's host process: {why}")
    return holder


def _read_go(fd: int) -> dict[str, Any] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    os.close(fd)
    msg = json.loads(data)
    return msg if isinstance(msg, dict) else None


def _child_main(go_fd: int, terminal_fd: int) -> int:
    msg = _read_go(go_fd)
    if msg is None:
        return 1  # aborted: the container was not made
    plan = StdioPlan(("", "", ""), [(str(f), int(fd)) for f, fd in msg.get("relays", [])])
    return stand_in(plan, msg["socket"], msg["id"], msg.get("exec_id", ""), terminal_fd)


def stand_in(plan: StdioPlan, sock: str, cid: str, exec_id: str, terminal_fd: int = -1) -> int:
    """Relay, wait for the process, let the output drain; its exit status."""
    threads = plan.start_relays()
    status = asyncio.run(hold(sock, cid, exec_id, terminal_fd))
    for t, (_, fd) in zip(threads, plan.relays, strict=True):
        if fd != 0:  # output: what the service wrote before the exit
            t.join(timeout=5)
    return status


def window_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal ``fd``."""
    packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    return rows, cols


def make_raw(fd: int) -> None:
    """A pty end that only carries bytes: the line discipline is the guest's."""
    tty.setraw(fd, termios.TCSANOW)


async def hold(sock: str, cid: str, exec_id: str, terminal_fd: int = -1) -> int:
    """Stand for the process until it exits; its exit status."""
    loop = asyncio.get_running_loop()
    try:
        client = await Client.connect_unix(sock)
    except OSError:
        return LOST_STATUS
    pending: set[asyncio.Task[object]] = set()

    def spawn(method: str, req: object, resp: type) -> None:
        async def run() -> object:
            with contextlib.suppress(TtrpcError):
                return await client.call(SERVICE, method, req, resp, timeout=30)  # type: ignore[arg-type]
            return None

        task = loop.create_task(run())
        pending.add(task)
        task.add_done_callback(pending.discard)

    def forward(sig: int) -> None:
        spawn("Kill", api.KillRequest(id=cid, exec_id=exec_id, signal=sig), Empty)

    def resize() -> None:
        with contextlib.suppress(OSError):
            rows, cols = window_size(terminal_fd)
            spawn(
                "ResizePty",
                api.ResizePtyRequest(id=cid, exec_id=exec_id, width=cols, height=rows),
                Empty,
            )

    for sig in FORWARDED:
        loop.add_signal_handler(sig, forward, sig)
    if terminal_fd >= 0:
        loop.add_signal_handler(signal.SIGWINCH, resize)
    try:
        resp = await client.call(
            SERVICE, "Wait", api.WaitRequest(id=cid, exec_id=exec_id), api.WaitResponse
        )
        status = resp.exit_status
        if exec_id:  # nobody else deletes an exec: runc's have no delete
            with contextlib.suppress(TtrpcError):
                await client.call(
                    SERVICE,
                    "Delete",
                    api.DeleteRequest(id=cid, exec_id=exec_id),
                    api.DeleteResponse,
                    timeout=30,
                )
    except TtrpcError:
        status = LOST_STATUS
    finally:
        await client.close()
    return status if 0 <= status < 256 else 255
