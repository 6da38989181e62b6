"""Run a function inside a network namespace named by a path (``/var/run/netns/NAME``,
``/proc/PID/ns/net``).

The function runs on a thread of its own that joins the namespace with setns(2) and
leaves it before it ends, so no caller's thread (an event loop's, an executor's) is
ever in another namespace. A socket opened by the function (pyroute2's ``IPRoute``, an
``AF_PACKET`` socket) and a tap made through ``/dev/net/tun`` belong to that namespace
for good; file descriptors are the process's, so they outlive the thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from carapace.errors import InvalidArgument, NotFound
from carapace.hostinfo import is_host_namespace_file

log = logging.getLogger("carapace.network")

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
#: ioctl(2) on an nsfs file: the namespace's CLONE_NEW* type (Linux 4.11).
NS_GET_NSTYPE = 0xB703


class NotNetworkNamespace(InvalidArgument):
    """The path names something that is not a network namespace (e.g. the empty file
    left under /var/run/netns once its namespace was unmounted)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def open_netns(path: str) -> int:
    """An O_CLOEXEC descriptor of the network namespace at ``path``.

    Raises NotFound if nothing is there, NotNetworkNamespace (an InvalidArgument) if it
    is not a network namespace, InvalidArgument if it is the host's own."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {path}: no such file") from None
    except OSError as e:
        raise InvalidArgument(f"network namespace {path}: {e.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            raise NotNetworkNamespace(
                f"{path} is not a namespace; accepted: a network namespace's path, "
                "e.g. /var/run/netns/NAME or /proc/PID/ns/net"
            ) from None
        if kind != CLONE_NEWNET:
            raise NotNetworkNamespace(f"{path} is a namespace but not a network namespace")
        if is_host_namespace_file("network", os.fstat(fd)):
            raise InvalidArgument(
                f"network namespace {path} is the host's own; a pod may not use the "
                "host's network: give the pod a network namespace of its own"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_netns(path: str) -> None:
    """Raise as ``open_netns`` does unless ``path`` is a network namespace not the host's."""
    os.close(open_netns(path))


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns to {what}: {os.strerror(err)}")


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """``fn()`` inside the network namespace at ``path``, on a thread of its own (the
    calling thread waits; it never changes namespace). Its exception is raised here."""
    target = open_netns(path)
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException as e:
            error.append(e)
            return
        try:
            _setns(target, path)
            try:
                result.append(fn())
            finally:
                try:
                    _setns(own, "the process's namespace")
                except OSError as e:  # the thread ends now: nothing else runs on it
                    log.warning("leaving network namespace %s: %s", path, e)
        except BaseException as e:
            error.append(e)
        finally:
            os.close(own)

    thread = threading.Thread(target=body, name=f"netns {path}")
    try:
        thread.start()
        thread.join()
    finally:
        os.close(target)
    if error:
        raise error[0]
    return result[0]


async def run_in_netns_async(path: str, fn: Callable[[], T]) -> T:
    """``run_in_netns`` for a coroutine: the wait happens on an executor thread, so
    the event loop keeps running."""
    return await asyncio.to_thread(run_in_netns, path, fn)


def listen_tcp(
    path: str, address: str, ports: Iterable[int], backlog: int = 128
) -> dict[int, socket.socket | OSError]:
    """For each of ``ports``, a non-blocking TCP socket listening on ``address``:port
    inside the network namespace at ``path`` (it belongs to that namespace for good),
    or the error that kept it from being made (the port in use there, say). Raises as
    ``open_netns`` for a path that is no network namespace of a pod."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def make() -> dict[int, socket.socket | OSError]:
        made: dict[int, socket.socket | OSError] = {}
        try:
            for port in ports:
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                except OSError as e:
                    made[port] = e
                    continue
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((address, port))
                    sock.listen(backlog)
                    sock.setblocking(False)
                except OSError as e:
                    sock.close()
                    made[port] = e
                    continue
                made[port] = sock
        except BaseException:
            for s in made.values():
                if isinstance(s, socket.socket):
                    s.close()
            raise
        return made

    return run_in_netns(path, make)
