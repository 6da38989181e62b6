"""What the shim watches and enforces about its pod's VM from the host, without
trusting the guest (the workload, the guest kernel and the agent may all be hostile).

- **The VM's exit**: a VM that exits while the pod runs is lost; processes that were
  created but never started are reported exited (``VM_LOST_STATUS``), the running
  ones are ended by their relays.
- **OOM events**: only for containers of this pod (a guest can name any id), at most
  one per container per ``OOM_INTERVAL``; the rest is counted in rate-limited lines.
- **Killing**: a SIGKILL has a deadline (``[runtime] kill_timeout``). By then the
  process has exited (for the pod's sandbox container: every process of the pod has),
  or the shim stops the VM itself (SIGKILL to QEMU) and reports every process of the
  pod exited with ``KILLED_STATUS``: a pod never stays Terminating because the agent
  acknowledged a signal and did nothing, or never answered.
- **The agent connection**: broken by the guest (a protocol violation) or gone while
  the VM runs, the pod cannot be managed any more: the VM is stopped from the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf.message import Message

from carapace.errors import CarapaceError, NotFound
from carapace.protocols.containerd import events_pb2 as ev
from carapace.protocols.containerd import task_types_pb2 as tt
from carapace.sandbox import Runstate
from carapace.shim.interfaces import SandboxLike
from carapace.shim.tasks import VM_LOST_STATUS, Container, Proc
from carapace.ttrpc.ratelimit import RateLimitedLog, shorten

log = logging.getLogger("carapace.shim")

#: How long a failed call waits to see whether the VM just died (see ``vm_gone``).
VM_GONE_WAIT = 2.0
#: Exit status of the processes of a VM the shim stopped after a SIGKILL (128 + 9).
KILLED_STATUS = 128 + signal.SIGKILL
#: Seconds a SIGKILL waits for the guest before the shim stops the VM (the default of
#: ``[runtime] kill_timeout``).
DEFAULT_KILL_TIMEOUT = 10.0
#: OOM events of one container closer together than this are one event.
OOM_INTERVAL = 1.0
#: How long stopping the VM by force waits for QEMU to be gone.
STOP_WAIT = 5.0
STARTED = (tt.RUNNING, tt.PAUSED)


class PodWatch:
    """The host-side watches of one pod's VM (see the module's doc)."""

    def __init__(
        self,
        pod_id: str,
        containers: dict[str, Container],
        exited: Callable[[Proc, int], None],
        publish: Callable[[Message], None],
        current: Callable[[], SandboxLike | None],
    ) -> None:
        self.pod_id = pod_id
        self.containers = containers
        self.exited = exited
        self.publish = publish
        self.current = current
        self.kill_timeout = DEFAULT_KILL_TIMEOUT
        #: The VM exited (or was stopped by force) while the pod ran.
        self.lost = False
        #: Why the shim stopped the VM itself ("" while it did not).
        self.forced = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deadlines: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._last_oom: dict[str, float] = {}
        self._forged_oom = RateLimitedLog(log)
        self._repeated_oom = RateLimitedLog(log, logging.INFO)

    @property
    def gone(self) -> bool:
        """Whether the VM is lost or being stopped by force: the guest is no use."""
        return self.lost or bool(self.forced)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def start(self, sb: SandboxLike, kill_timeout: float) -> None:
        """Watch the freshly started ``sb``."""
        self.kill_timeout = kill_timeout
        self._spawn(self._watch_vm(sb))
        self._spawn(self._watch_oom(sb))
        self._spawn(self._watch_agent(sb))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _procs(self) -> list[Proc]:
        return [p for c in self.containers.values() for p in c.procs]

    def _running(self, sb: SandboxLike) -> bool:
        """Whether ``sb`` is still the pod's running VM (not being shut down on purpose)."""
        return self.current() is sb and sb.state is Runstate.RUNNING

    # -- the VM and the agent connection ------------------------------------------------

    async def _watch_vm(self, sb: SandboxLike) -> None:
        await sb.wait_vm()
        if self._running(sb):
            self.lost = True
            if self.forced:
                log.info("pod %s: the VM is stopped", self.pod_id)
            else:
                log.error("pod %s: the VM exited unexpectedly", self.pod_id)
            for p in self._procs():
                if p.relay is None:  # created, never started: nothing else will end it
                    self.exited(p, VM_LOST_STATUS)

    async def vm_gone(self, sb: SandboxLike, wait: float = VM_GONE_WAIT) -> bool:
        """Whether the pod's VM is gone. A VM that was just killed drops the agent's
        connection (and so its processes) a moment before its exit is seen: wait for
        it a little before taking a failed call for a real error."""
        if self.gone:
            return True
        try:
            await asyncio.wait_for(sb.wait_vm(), wait)
        except (TimeoutError, CarapaceError):
            return False
        return True

    async def _watch_agent(self, sb: SandboxLike) -> None:
        try:
            violation = await sb.agent_closed()
        except CarapaceError:
            return
        if not self._running(sb) or await self.vm_gone(sb):
            return  # shut down on purpose, or the VM's exit says why (see _watch_vm)
        why = f"the guest broke the agent protocol ({violation})" if violation else ""
        await self.stop_vm(sb, why or "the agent connection is gone", VM_LOST_STATUS)

    async def stop_vm(self, sb: SandboxLike, why: str, status: int = KILLED_STATUS) -> None:
        """Stop the VM from the host: every process of the pod that has not exited is
        reported exited with ``status`` first, then QEMU is killed."""
        if self.forced:
            return
        self.forced = why
        log.error("pod %s: %s; stopping the VM from the host", self.pod_id, why)
        for p in self._procs():
            self.exited(p, status)
        sb.kill_vm()
        with contextlib.suppress(TimeoutError, CarapaceError):
            await asyncio.wait_for(sb.wait_vm(), STOP_WAIT)

    # -- OOM events ------------------------------------------------------------------------

    async def _watch_oom(self, sb: SandboxLike) -> None:
        while sb.state is Runstate.RUNNING:
            try:
                cid = await sb.oom_event()
            except CarapaceError as e:
                log.debug("OOM events stopped: %s", e)
                return
            self.oom(cid)

    def oom(self, cid: str, now: float | None = None) -> bool:
        """Publish the guest's OOM event for ``cid`` if it may be one; whether it was."""
        if cid not in self.containers:
            self._forged_oom(
                "pod %s: ignoring OOM events for containers not in the pod: %s",
                self.pod_id,
                shorten(cid),
            )
            return False
        now = time.monotonic() if now is None else now
        last = self._last_oom.get(cid)
        if last is not None and now - last < OOM_INTERVAL:
            self._repeated_oom(
                "container %s: OOM events less than %gs apart taken as one", cid, OOM_INTERVAL
            )
            return False
        self._last_oom[cid] = now
        log.warning("container %s: OOM kill in the guest", cid)
        self.publish(ev.TaskOOM(container_id=cid))
        return True

    # -- killing ---------------------------------------------------------------------------

    async def kill(
        self, sb: SandboxLike, p: Proc, sig: int, all_processes: bool, pod_end: bool
    ) -> None:
        """Signal ``p`` through the guest. A SIGKILL arms a deadline first: by then
        ``p`` (with ``pod_end``: every process of the pod) has exited, or ``stop_vm``."""
        if sig == signal.SIGKILL:
            self._arm_deadline(sb, p, pod_end)
        try:
            await sb.kill(p.container_id, sig, p.exec_id, all_processes)
        except CarapaceError as e:
            if sig == signal.SIGKILL and self.forced:
                return  # the shim stopped the VM meanwhile: the process is dead
            # a VM going down takes its processes: what containerd's CRI takes as done
            if not await self.vm_gone(sb):
                raise
            raise NotFound(f"process {p.id} already finished (its VM is gone: {e})") from e

    def _arm_deadline(self, sb: SandboxLike, p: Proc, pod_end: bool) -> None:
        key = ("" if pod_end else p.container_id, p.exec_id)
        t = self._deadlines.get(key)
        if t is None or t.done():
            self._deadlines[key] = self._spawn(self._deadline(sb, p, pod_end))

    async def _deadline(self, sb: SandboxLike, p: Proc, pod_end: bool) -> None:
        procs = [p]
        if pod_end:  # the pod ends: every process that was started must be gone too
            procs += [q for q in self._procs() if q is not p and q.status in STARTED]
        waits = [asyncio.ensure_future(q.exited.wait()) for q in procs if not q.exited.is_set()]
        if not waits:
            return
        try:
            _, pending = await asyncio.wait(waits, timeout=self.kill_timeout)
        finally:
            for w in waits:
                w.cancel()
        if not pending or not self._running(sb) or self.lost:
            return
        alive = ", ".join(sorted({q.id for q in procs if not q.exited.is_set()}))
        what = f"the pod's sandbox container {p.id}" if pod_end else f"process {p.id}"
        await self.stop_vm(
            sb,
            f"{alive} still running {self.kill_timeout:g}s after the SIGKILL of {what} "
            "(the guest did not kill)",
        )
