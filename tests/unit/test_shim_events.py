"""Task events forwarded to containerd (carapace.shim.events), against a real ttrpc
server playing containerd's events service on a temporary unix socket."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from carapace.protocols.containerd import events_pb2 as ev
from carapace.protocols.containerd import events_service_pb2 as evpb
from carapace.shim import events
from carapace.shim.events import TOPICS, Publisher, envelope, topic_of
from carapace.ttrpc import Server

T = TypeVar("T")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE = "k8s.io"

#: containerd's topics (runtime/events.go) for the events a shim publishes.
CONTAINERD_TOPICS = {
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


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


class FakeContainerd:
    """containerd's ttrpc events service: records every forwarded envelope.

    ``gate`` (if set) is awaited by the handler before it records a request."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.received: list[evpb.Envelope] = []
        self.gate: Callable[[evpb.ForwardRequest], Awaitable[None]] | None = None
        self.server: Server | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        server = Server()

        async def forward(req: evpb.ForwardRequest) -> Empty:
            if self.gate is not None:
                await self.gate(req)
            self.received.append(req.envelope)
            self._changed.set()
            return Empty()

        server.register_typed(SERVICE, "Forward", evpb.ForwardRequest, forward)
        await server.serve_unix(self.path)
        self.server = server

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.close()
        self.server = None

    async def wait_for(self, count: int, timeout: float = 3) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self._changed.clear()
                await self._changed.wait()

    def exits(self) -> list[int]:
        out = []
        for env in self.received:
            assert env.topic == "/tasks/exit"
            assert env.event.type_url == "containerd.events.TaskExit"
            out.append(ev.TaskExit.FromString(env.event.value).exit_status)
        return out


def exit_event(i: int) -> ev.TaskExit:
    return ev.TaskExit(container_id="c1", id="c1", pid=1, exit_status=i)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_DELAY", 0.01)


# --- envelope ----------------------------------------------------------------------------


def test_envelope_carries_the_event_as_containerd_marshals_it() -> None:
    exit_ = ev.TaskExit(container_id="c1", id="e1", pid=42, exit_status=137)
    exit_.exited_at.FromSeconds(1_700_000_000)
    req = envelope(NAMESPACE, exit_, now=1_700_000_001.25)
    env = req.envelope
    assert env.event.type_url == "containerd.events.TaskExit"
    assert env.topic == "/tasks/exit"
    assert env.namespace == NAMESPACE
    assert env.timestamp.seconds == 1_700_000_001
    assert abs(env.timestamp.nanos - 250_000_000) < 1000
    assert ev.TaskExit.FromString(env.event.value) == exit_
    # and it survives the wire
    assert evpb.ForwardRequest.FromString(req.SerializeToString()) == req


def test_envelope_timestamp_defaults_to_now() -> None:
    before = time.time_ns()
    env = envelope("default", ev.TaskStart(container_id="c1", pid=7)).envelope
    after = time.time_ns()
    assert before <= env.timestamp.ToNanoseconds() <= after
    assert env.event.type_url == "containerd.events.TaskStart"
    assert env.topic == "/tasks/start"


def test_topics_are_containerds() -> None:
    assert TOPICS == CONTAINERD_TOPICS
    for name, topic in TOPICS.items():
        message: Message = getattr(ev, name)()
        assert topic_of(message) == topic
        env = envelope("ns", message).envelope
        assert env.event.type_url == f"containerd.events.{name}"
        assert env.topic == topic


# --- Publisher ---------------------------------------------------------------------------


def test_events_arrive_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeContainerd(tmp_path / "events.sock")
        await fake.start()
        pub = Publisher(f"unix://{fake.path}", NAMESPACE)
        for i in range(50):
            pub.publish(exit_event(i))
        await fake.wait_for(50)
        assert fake.exits() == list(range(50))
        assert all(env.namespace == NAMESPACE for env in fake.received)
        # more events later, on the same connection or another
        pub.publish(ev.TaskDelete(container_id="c1", pid=1, exit_status=3))
        pub.publish(ev.TaskOOM(container_id="c1"))
        await fake.wait_for(52)
        assert [e.topic for e in fake.received[50:]] == ["/tasks/delete", "/tasks/oom"]
        await pub.close()
        await fake.stop()

    run(main())


def test_publish_never_waits(tmp_path: Path) -> None:
    """publish() is a plain function that only queues, even when containerd does not
    answer; flush(timeout) then gives up after the timeout."""

    async def main() -> None:
        assert not inspect.iscoroutinefunction(Publisher.publish)
        fake = FakeContainerd(tmp_path / "events.sock")
        release = asyncio.Event()

        async def stuck(req: evpb.ForwardRequest) -> None:
            await release.wait()

        fake.gate = stuck
        await fake.start()
        pub = Publisher(f"unix://{fake.path}", NAMESPACE)
        started = time.monotonic()
        for i in range(200):
            assert pub.publish(exit_event(i)) is None  # type: ignore[func-returns-value]
        assert time.monotonic() - started < 0.5
        assert fake.received == []

        started = time.monotonic()
        await pub.flush(0.1)
        assert 0.09 <= time.monotonic() - started < 1
        assert fake.received == []

        release.set()
        await pub.flush(5)
        # flush returns once every event was sent: containerd has them all
        assert fake.exits() == list(range(200))
        await pub.close()
        await fake.stop()

    run(main())


def test_redial_after_containerd_restarts(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeContainerd(tmp_path / "events.sock")
        await fake.start()
        pub = Publisher(f"unix://{fake.path}", NAMESPACE)
        for i in range(5):
            pub.publish(exit_event(i))
        await pub.flush(3)
        assert fake.exits() == [0, 1, 2, 3, 4]

        await fake.stop()  # containerd goes away; the socket file stays behind
        for i in range(5, 10):
            pub.publish(exit_event(i))
        await asyncio.sleep(0.05)  # the publisher fails a few times meanwhile
        await fake.start()  # containerd is back on the same path
        await fake.wait_for(10)
        assert fake.exits() == list(range(10))

        pub.publish(exit_event(10))
        await fake.wait_for(11)
        assert fake.exits() == list(range(11))
        await pub.close()
        await fake.stop()

    run(main())


def test_redial_when_containerd_dies_during_a_forward(tmp_path: Path) -> None:
    """The event containerd was handling when it died is sent again, then the rest, in
    order."""

    async def main() -> None:
        fake = FakeContainerd(tmp_path / "events.sock")
        in_flight = asyncio.Event()

        async def hang_on_3(req: evpb.ForwardRequest) -> None:
            if ev.TaskExit.FromString(req.envelope.event.value).exit_status == 3:
                in_flight.set()
                await asyncio.sleep(30)

        fake.gate = hang_on_3
        await fake.start()
        pub = Publisher(f"unix://{fake.path}", NAMESPACE)
        for i in range(8):
            pub.publish(exit_event(i))
        await in_flight.wait()
        assert fake.exits() == [0, 1, 2]
        await fake.stop()  # cancels the handler: 3 was never recorded
        fake.gate = None
        await asyncio.sleep(0.03)
        await fake.start()
        await fake.wait_for(8)
        assert fake.exits() == list(range(8))
        await pub.close()
        await fake.stop()

    run(main())


def test_unreachable_containerd(tmp_path: Path) -> None:
    async def main() -> None:
        before = asyncio.all_tasks()
        pub = Publisher(f"unix://{tmp_path}/nobody.sock", NAMESPACE)
        for i in range(3):
            pub.publish(exit_event(i))  # does not raise
        started = time.monotonic()
        await pub.flush(0.1)
        assert time.monotonic() - started < 1
        await pub.close()  # ends the retrying worker
        await asyncio.sleep(0)
        assert asyncio.all_tasks() - before == set()

    run(main())


def test_no_address_publishes_nothing() -> None:
    async def main() -> None:
        before = asyncio.all_tasks()
        pub = Publisher("", NAMESPACE)
        pub.publish(exit_event(1))
        assert asyncio.all_tasks() - before == set()
        await pub.flush(1)
        await pub.close()

    run(main())


def test_the_queue_is_bounded_dropping_the_oldest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """containerd does not take events (stuck): the queue keeps at most MAX_QUEUED, the
    oldest go first, one line says so; once containerd takes them it gets the newest."""

    async def main() -> None:
        fake = FakeContainerd(tmp_path / "events.sock")
        release = asyncio.Event()

        async def stuck(req: evpb.ForwardRequest) -> None:
            await release.wait()

        fake.gate = stuck
        await fake.start()
        pub = Publisher(f"unix://{fake.path}", NAMESPACE)
        pub.publish(exit_event(0))
        await asyncio.sleep(0.05)  # event 0 is in flight, held by containerd
        total = 5 * events.MAX_QUEUED
        for i in range(1, total + 1):
            pub.publish(exit_event(i))
            assert len(pub._queue) <= events.MAX_QUEUED
        assert pub.dropped == total - events.MAX_QUEUED
        release.set()
        await pub.flush(10)
        first_kept = total - events.MAX_QUEUED + 1
        assert fake.exits() == [0, *range(first_kept, total + 1)]
        await pub.close()
        await fake.stop()

    with caplog.at_level(logging.WARNING, logger="carapace.shim.events"):
        run(main())
    assert len([r for r in caplog.records if "dropping the oldest" in r.getMessage()]) == 1
