"""Task events forwarded to containerd's ttrpc events service ($TTRPC_ADDRESS).

``publish`` only queues: the task path never waits on the event stream. One worker
sends in order, re-dialling when containerd's socket fails; an event is dropped only
after it failed ``MAX_ATTEMPTS`` times (containerd restarting for long).

The queue holds at most ``MAX_QUEUED`` events; when it is full the oldest waiting
event is dropped (with a rate-limited line counting them). Dropping, not blocking:
``publish`` is called from the task path and from exit callbacks, which must never
wait on containerd; and the newest events say how the tasks are now, while containerd
reads the tasks' state (State, Wait) again when it reconnects to a shim anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from google.protobuf import text_format
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from carapace.protocols.containerd import events_service_pb2 as evpb
from carapace.shim.params import strip_unix
from carapace.ttrpc import Client, TtrpcError
from carapace.ttrpc.ratelimit import RateLimitedLog

log = logging.getLogger("carapace.shim.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
MAX_ATTEMPTS = 20
RETRY_DELAY = 0.25
#: The most events waiting to be sent (an event is a few hundred bytes: the queue
#: stays well under a MiB whatever happens to containerd).
MAX_QUEUED = 1024
TOPICS = {
    "TaskCreate": "/tasks/create",
    "TaskStart": "/tasks/start",
    "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete",
    "TaskOOM": "/tasks/oom",
    "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused",
    "TaskResumed": "/tasks/resumed",
}


def oneline(msg: Message) -> str:
    """A message as one log line."""
    return text_format.MessageToString(msg, as_one_line=True)


def topic_of(event: Message) -> str:
    return TOPICS[event.DESCRIPTOR.name]


def envelope(namespace: str, event: Message, now: float | None = None) -> evpb.ForwardRequest:
    """The ForwardRequest containerd expects: the event as an Any whose type URL is the
    message's full name (``containerd.events.TaskExit``), the way containerd marshals it."""
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if now is None else now) * 1e9))
    any_event = AnyPb(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
    return evpb.ForwardRequest(
        envelope=evpb.Envelope(
            timestamp=ts, namespace=namespace, topic=topic_of(event), event=any_event
        )
    )


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = strip_unix(address)
        self.namespace = namespace
        self._queue: collections.deque[evpb.ForwardRequest] = collections.deque()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: Client | None = None
        self._worker: asyncio.Task[None] | None = None
        #: Events dropped because the queue was full.
        self.dropped = 0
        self._drop_log = RateLimitedLog(log)
        self._fail_log = RateLimitedLog(log)

    def publish(self, event: Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event %s %s", topic_of(event), oneline(event))
        if not self.address:
            return
        if len(self._queue) >= MAX_QUEUED:
            old = self._queue.popleft()
            self.dropped += 1
            self._drop_log(
                "%d events wait for containerd already; dropping the oldest (%s)",
                MAX_QUEUED,
                old.envelope.topic,
            )
        self._queue.append(envelope(self.namespace, event))
        self._idle.clear()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._run())

    async def _send(self, req: evpb.ForwardRequest) -> None:
        if self._client is None or self._client.closed:
            self._client = await Client.connect_unix(self.address)
        await self._client.call(SERVICE, "Forward", req, Empty, timeout=10)

    async def _run(self) -> None:
        try:
            while self._queue:
                req = self._queue.popleft()
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    try:
                        await self._send(req)
                        break
                    except (OSError, TtrpcError) as e:
                        self._fail_log(
                            "forwarding %s to %s failed (attempt %d): %s",
                            req.envelope.topic,
                            self.address,
                            attempt,
                            e,
                        )
                        if self._client is not None:
                            with contextlib.suppress(Exception):
                                await self._client.close()
                            self._client = None
                        await asyncio.sleep(RETRY_DELAY * min(attempt, 8))
        finally:
            if not self._queue:
                self._idle.set()

    async def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every queued event was sent or given up."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
