"""OOM-kill events of the guest's containers, for the GetOOMEvent long poll.

Each live container's ``memory.events`` is watched with inotify (the kernel sends a
modify event when one of its counters changes; containerd and Kata's agent watch it
the same way). When that is not possible the file is polled. Every observed increase
of the ``oom_kill`` counter queues one event carrying the container id; GetOOMEvent
calls take them in order, each event going to exactly one caller. The agent reads
the counter once more when a container's init exits, so a kill just before that exit
is still reported. Stdlib only (inotify through ctypes).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct

from carapace.guest.cgroup import oom_kills

log = logging.getLogger("carapace.agent.oom")

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
#: Most events kept for GetOOMEvent; beyond that the oldest is dropped.
MAX_QUEUED = 1024
POLL_INTERVAL = 0.2


def parse_inotify_events(buf: bytes) -> list[tuple[int, int]]:
    """The (watch descriptor, mask) of each ``struct inotify_event`` in ``buf``."""
    out = []
    offset = 0
    while offset + _EVENT.size <= len(buf):
        wd, mask, _cookie, name_len = _EVENT.unpack_from(buf, offset)
        out.append((wd, mask))
        offset += _EVENT.size + name_len
    return out


class Inotify:
    """A non-blocking inotify instance (libc through ctypes)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add_watch(self, path: str, mask: int = IN_MODIFY) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # fails only if the watch is gone already

    def read(self) -> list[tuple[int, int]]:
        """The pending events (none if there are none)."""
        try:
            return parse_inotify_events(os.read(self.fd, 64 * 1024))
        except BlockingIOError:
            return []

    def close(self) -> None:
        os.close(self.fd)


class _Watch:
    def __init__(self, cgroup_dir: str, count: int, wd: int = -1) -> None:
        self.cgroup_dir = cgroup_dir
        self.count = count
        self.wd = wd  # inotify watch descriptor; -1: polled


class OOMWatcher:
    """Watches containers' cgroups and queues one event per increase of ``oom_kill``."""

    def __init__(self, poll_interval: float = POLL_INTERVAL, use_inotify: bool = True) -> None:
        self.poll_interval = poll_interval
        self._use_inotify = use_inotify
        self._inotify: Inotify | None = None
        self._watches: dict[str, _Watch] = {}
        self._by_wd: dict[int, str] = {}
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self._poller: asyncio.Task[None] | None = None

    @property
    def watched(self) -> set[str]:
        return set(self._watches)

    def watch(self, container_id: str, cgroup_dir: str) -> object:
        """Start watching a container's cgroup (after its creation: it exists then).
        Returns a token for ``forget``."""
        self.forget(container_id)
        w = _Watch(cgroup_dir, oom_kills(cgroup_dir))
        self._watches[container_id] = w
        inotify = self._get_inotify()
        if inotify is not None:
            try:
                w.wd = inotify.add_watch(os.path.join(cgroup_dir, "memory.events"))
                self._by_wd[w.wd] = container_id
            except OSError as e:
                log.warning("cannot watch %s with inotify (%s): polling it", cgroup_dir, e)
        if w.wd < 0 and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        return w

    def check(self, container_id: str) -> None:
        """Read the container's counter now and queue an event if it went up."""
        w = self._watches.get(container_id)
        if w is None:
            return
        count = oom_kills(w.cgroup_dir)
        if count > w.count:
            log.info("container %s: OOM kill (oom_kill %d -> %d)", container_id, w.count, count)
            self._put(container_id)
        if count:  # a cgroup read as gone (0) must not re-report the old kills later
            w.count = count

    def forget(self, container_id: str, token: object | None = None) -> None:
        """Read the counter one last time, then stop watching. Idempotent. With a
        ``token`` from ``watch``, only if the container is still that watch (not a
        later container of the same id)."""
        if container_id not in self._watches:
            return
        if token is not None and self._watches[container_id] is not token:
            return
        self.check(container_id)
        w = self._watches.pop(container_id)
        if w.wd >= 0:
            self._by_wd.pop(w.wd, None)
            if self._inotify is not None:
                self._inotify.rm_watch(w.wd)

    async def next_event(self) -> str:
        """The id of the container of the next OOM kill; waits as long as needed.
        A caller cancelled while waiting takes no event."""
        return await self._events.get()

    def pending(self) -> int:
        return self._events.qsize()

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        self._watches.clear()
        self._by_wd.clear()

    # -- internals -------------------------------------------------------------

    def _put(self, container_id: str) -> None:
        if self._events.qsize() >= MAX_QUEUED:
            dropped = self._events.get_nowait()
            log.warning("OOM event queue full: dropping the oldest (container %s)", dropped)
        self._events.put_nowait(container_id)

    def _get_inotify(self) -> Inotify | None:
        if self._inotify is None and self._use_inotify:
            try:
                self._inotify = Inotify()
            except OSError as e:
                log.warning("inotify is not available (%s): polling memory.events", e)
                self._use_inotify = False
                return None
            asyncio.get_running_loop().add_reader(self._inotify.fd, self._on_inotify)
        return self._inotify

    def _on_inotify(self) -> None:
        if self._inotify is None:
            return
        for wd, mask in self._inotify.read():
            cid = self._by_wd.get(wd)
            if cid is None:
                continue
            if mask & IN_IGNORED:  # the file is gone (cgroup removed): the watch with it
                self._by_wd.pop(wd, None)
                w = self._watches.get(cid)
                if w is not None:
                    w.wd = -1
                continue
            self.check(cid)

    async def _poll(self) -> None:
        while any(w.wd < 0 for w in self._watches.values()):
            await asyncio.sleep(self.poll_interval)
            for cid, w in list(self._watches.items()):
                if w.wd < 0:
                    self.check(cid)
