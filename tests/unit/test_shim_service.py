"""The shim's Task service (carapace.shim.service) with a fake sandbox and a fake event
publisher: pod grouping, rollback, event order and exit statuses, without a VM."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.message import Message

from carapace.config import Config
from carapace.errors import AgentError, HostError, StateError
from carapace.hostcgroup import CgroupStats
from carapace.network.stats import InterfaceStats
from carapace.oci import Spec
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.containerd import metrics_pb2
from carapace.protocols.containerd import shim_pb2 as api
from carapace.protocols.containerd import task_types_pb2 as tt
from carapace.protocols.contract import CRI_CONTAINER_TYPE, CRI_SANDBOX_ID, guest_namespace_path
from carapace.sandbox import ProcessIO, Runstate, SandboxOptions
from carapace.shim.events import topic_of
from carapace.shim.params import METRICS_URL
from carapace.shim.service import TaskService
from carapace.shim.tasks import VM_LOST_STATUS
from carapace.ttrpc import Code, TtrpcError

T = TypeVar("T")

POD = "pod1"
VM_PID = 4242


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


# --- fakes ----------------------------------------------------------------------------------


class FakeSandbox:
    """A sandbox whose processes exit when the test says so, recording every call."""

    def __init__(self, config: Config, options: SandboxOptions) -> None:
        self.config = config
        self.options = options
        self.calls: list[tuple[Any, ...]] = []
        self._state = Runstate.CREATED
        self.vm_pid = 0
        self._vm_exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._exits: dict[tuple[str, str], asyncio.Future[int]] = {}
        self._next_pid = 7
        self.fail_create: Exception | None = None
        self.host = CgroupStats(cpu_usage_ns=123_000, memory_bytes=64 << 20, pids=9)
        #: what the guest answers SignalProcess with: None (ok), an error, or "hang"
        self.kill_answer: Exception | str | None = None
        self._agent_closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.oom_events: asyncio.Queue[str] = asyncio.Queue()

    @property
    def state(self) -> Runstate:
        return self._state

    def _exit(self, cid: str, exec_id: str) -> asyncio.Future[int]:
        key = (cid, exec_id)
        if key not in self._exits:
            self._exits[key] = asyncio.get_running_loop().create_future()
        return self._exits[key]

    # what the test controls

    def exit(self, cid: str, status: int, exec_id: str = "") -> None:
        self._exit(cid, exec_id).set_result(status)

    def lose_vm(self) -> None:
        self._vm_exit.set_result(1)
        if not self._agent_closed.done():
            self._agent_closed.set_result("")

    def break_agent(self, violation: str) -> None:
        """The guest broke the protocol: the host closed the agent's connection."""
        self._agent_closed.set_result(violation)
        for f in self._exits.values():
            if not f.done():
                f.set_exception(AgentError(f"agent WaitProcess: {violation}"))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    # the sandbox's API

    async def start(self) -> None:
        self.calls.append(("start",))
        self._state, self.vm_pid = Runstate.RUNNING, VM_PID

    async def destroy(self) -> None:
        self.calls.append(("destroy",))
        self._state = Runstate.DELETED
        if not self._vm_exit.done():
            self._vm_exit.set_result(0)

    async def wait_vm(self) -> int:
        # as a process's wait: a waiter given up on leaves the exit to come untouched
        return await asyncio.shield(self._vm_exit)

    async def oom_event(self) -> str:
        return await self.oom_events.get()

    def kill_vm(self) -> None:
        self.calls.append(("kill_vm",))
        if not self._vm_exit.done():
            self.lose_vm()
        for f in self._exits.values():  # the agent's connection drops: relays fail
            if not f.done():
                f.set_exception(AgentError("agent WaitProcess: ttrpc connection closed"))

    async def agent_closed(self) -> str:
        return await asyncio.shield(self._agent_closed)

    async def create_container(
        self, container_id: str, spec: Spec, rootfs: Path, overlay: bool = True
    ) -> None:
        self.calls.append(("create_container", container_id, spec, rootfs, overlay))
        if self.fail_create is not None:
            raise self.fail_create

    async def start_container(self, container_id: str) -> int:
        self.calls.append(("start_container", container_id))
        self._next_pid += 1
        return self._next_pid

    async def remove_container(self, container_id: str) -> None:
        self.calls.append(("remove_container", container_id))
        if self._state is not Runstate.RUNNING:
            raise StateError(f"sandbox is {self._state}")

    async def start_exec(self, container_id: str, exec_id: str, process: dict[str, Any]) -> int:
        self.calls.append(("start_exec", container_id, exec_id, process))
        self._next_pid += 1
        return self._next_pid

    async def remove_exec(self, container_id: str, exec_id: str) -> None:
        self.calls.append(("remove_exec", container_id, exec_id))

    async def kill(
        self, container_id: str, sig: int, exec_id: str = "", all_processes: bool = False
    ) -> None:
        self.calls.append(("kill", container_id, sig, exec_id, all_processes))
        if self._vm_exit.done():
            raise AgentError("agent SignalProcess: ttrpc connection closed (UNAVAILABLE)")
        if self.kill_answer == "hang":
            await asyncio.shield(self._vm_exit)  # no answer while the VM lives
            raise AgentError("agent SignalProcess: ttrpc connection closed (UNAVAILABLE)")
        if isinstance(self.kill_answer, Exception):
            raise self.kill_answer

    async def relay(
        self, container_id: str, exec_id: str, io: ProcessIO, started: Awaitable[Any]
    ) -> int:
        await started
        return await self._exit(container_id, exec_id)

    async def processes(self, container_id: str) -> list[int]:
        return [1]

    async def pause(self, container_id: str) -> None:
        self.calls.append(("pause", container_id))

    async def resume(self, container_id: str) -> None:
        self.calls.append(("resume", container_id))

    async def stats(self, container_id: str) -> pb.StatsContainerResponse:
        self.calls.append(("stats", container_id))
        return pb.StatsContainerResponse()

    def host_stats(self) -> CgroupStats:
        self.calls.append(("host_stats",))
        return self.host

    async def network_stats(self) -> tuple[InterfaceStats, ...]:
        self.calls.append(("network_stats",))
        return (InterfaceStats("eth0", rx_bytes=1500, rx_packets=3, tx_bytes=700, tx_packets=2),)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        self.calls.append(("update", container_id, resources))


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[Message] = []

    def publish(self, event: Message) -> None:
        self.events.append(event)

    def topics(self) -> list[str]:
        return [topic_of(e) for e in self.events]


class FakeServer:
    """Collects what the service registers, as the ttrpc server would call it."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[Any], Awaitable[Message]]] = {}

    def register_typed(
        self,
        service: str,
        method: str,
        req_type: type[Message],
        handler: Callable[[Any], Awaitable[Message]],
    ) -> None:
        self.handlers[method] = handler


class Pod:
    """A TaskService for pod ``POD`` with its fakes."""

    def __init__(self, tmp_path: Path, config_text: str = "") -> None:
        self.tmp_path = tmp_path
        config = tmp_path / "carapace.toml"
        config.write_text(config_text)
        self.events = FakePublisher()
        self.sandboxes: list[FakeSandbox] = []
        self.fail_create: Exception | None = None
        self.service = TaskService(
            POD, "k8s.io", self.events, str(config), sandbox_factory=self._make
        )
        server = FakeServer()
        self.service.register(server)  # type: ignore[arg-type]
        self.call = server.handlers

    def _make(self, config: Config, options: SandboxOptions) -> FakeSandbox:
        sb = FakeSandbox(config, options)
        sb.fail_create = self.fail_create
        self.sandboxes.append(sb)
        return sb

    @property
    def sb(self) -> FakeSandbox:
        assert len(self.sandboxes) == 1
        return self.sandboxes[0]

    def bundle(self, cid: str, annotations: dict[str, str], **spec: Any) -> str:
        bundle = self.tmp_path / cid
        (bundle / "rootfs").mkdir(parents=True)
        config = {
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"]},
            "root": {"path": "rootfs"},
            "annotations": annotations,
            **spec,
        }
        (bundle / "config.json").write_text(json.dumps(config))
        return str(bundle)

    async def create(
        self, cid: str, annotations: dict[str, str], **spec: Any
    ) -> api.CreateTaskResponse:
        req = api.CreateTaskRequest(id=cid, bundle=self.bundle(cid, annotations, **spec))
        resp = await self.call["Create"](req)
        assert isinstance(resp, api.CreateTaskResponse)
        return resp

    async def create_pause(self) -> api.CreateTaskResponse:
        return await self.create(POD, sandbox_annotations())

    async def start(self, cid: str, exec_id: str = "") -> None:
        await self.call["Start"](api.StartRequest(id=cid, exec_id=exec_id))

    async def wait(self, cid: str, exec_id: str = "") -> int:
        resp = await self.call["Wait"](api.WaitRequest(id=cid, exec_id=exec_id))
        assert isinstance(resp, api.WaitResponse)
        return resp.exit_status


def sandbox_annotations() -> dict[str, str]:
    return {CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: POD, "io.katacontainers.x": "1"}


def container_annotations(pod: str = POD) -> dict[str, str]:
    return {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: pod}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def pod(tmp_path: Path) -> Pod:
    return Pod(tmp_path)


# --- Create -------------------------------------------------------------------------------


def test_the_pods_sandbox_container_boots_the_sandbox(pod: Pod) -> None:
    async def go() -> None:
        resp = await pod.create_pause()
        sb = pod.sb
        opts = sb.options
        assert opts.sandbox_id == POD
        assert opts.join_owner is True
        assert opts.hostname == "carapace"
        assert isinstance(opts.sandbox_spec, Spec)
        # the pod's annotations travel once: in the sandbox container's spec
        assert opts.sandbox_spec.annotations == sandbox_annotations()
        assert opts.annotations == {}
        assert sb.names() == ["start", "create_container"]
        _, cid, spec, rootfs, overlay = sb.calls[1]
        assert (cid, rootfs, overlay) == (POD, Path(pod.tmp_path / POD / "rootfs"), False)
        assert spec.terminal is False
        assert resp.pid == VM_PID
        assert pod.events.topics() == ["/tasks/create"]
        assert pod.events.events[0].pid == VM_PID  # type: ignore[attr-defined]
        await pod.service.close()

    run(go())


def test_the_spec_hostname_names_the_sandbox(pod: Pod) -> None:
    async def go() -> None:
        await pod.create(POD, sandbox_annotations(), hostname="web-0")
        assert pod.sb.options.hostname == "web-0"
        await pod.service.close()

    run(go())


def test_a_second_container_joins_the_pods_namespaces(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        pause_pid = pod.service.containers[POD].init.pid
        ns = [{"type": "pid", "path": "/proc/99/ns/pid"}, {"type": "network", "path": "/x"}]
        resp = await pod.create("c1", container_annotations(), linux={"namespaces": ns})
        assert resp.pid == VM_PID
        assert len(pod.sandboxes) == 1  # no second VM
        _, cid, spec, _, _ = pod.sb.calls[-1]
        assert cid == "c1"
        assert spec.to_dict()["linux"]["namespaces"] == [
            {"type": "pid", "path": guest_namespace_path(pause_pid, "pid")},
            {"type": "network"},
        ]
        assert set(pod.service.containers) == {POD, "c1"}
        await pod.service.close()

    run(go())


def test_a_container_of_another_pod_is_refused(pod: Pod) -> None:
    async def go() -> None:
        with pytest.raises(TtrpcError) as exc:
            await pod.create("c1", container_annotations("pod2"))
        assert exc.value.code == Code.INVALID_ARGUMENT
        assert "pod2" in exc.value.message and POD in exc.value.message
        assert pod.sandboxes == [] and pod.service.containers == {}
        assert pod.events.events == []

    run(go())


def test_a_container_before_its_pods_sandbox_is_refused(pod: Pod) -> None:
    async def go() -> None:
        with pytest.raises(TtrpcError) as exc:
            await pod.create("c1", container_annotations())
        assert exc.value.code == Code.FAILED_PRECONDITION
        assert pod.sandboxes == [] and pod.service.containers == {}

    run(go())


def test_a_bad_bundle_is_refused_naming_the_field(pod: Pod) -> None:
    async def go() -> None:
        with pytest.raises(TtrpcError) as exc:
            await pod.create(POD, sandbox_annotations(), hostname=3)
        assert exc.value.code == Code.INVALID_ARGUMENT
        assert "hostname" in exc.value.message
        assert pod.sandboxes == []

    run(go())


def test_create_failure_destroys_the_sandbox_it_booted(pod: Pod) -> None:
    async def go() -> None:
        pod.fail_create = HostError("no room")
        with pytest.raises(TtrpcError) as exc:
            await pod.create_pause()
        assert exc.value.code == Code.UNKNOWN and "no room" in exc.value.message
        assert pod.sb.names() == ["start", "create_container", "destroy"]
        assert pod.service.sandbox is None
        assert pod.service.containers == {}
        assert pod.events.events == []

    run(go())


def test_create_failure_of_a_joining_container_keeps_the_pod(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        pod.sb.fail_create = HostError("no room")
        with pytest.raises(TtrpcError):
            await pod.create("c1", container_annotations())
        assert "destroy" not in pod.sb.names()
        assert pod.service.sandbox is pod.sb
        assert set(pod.service.containers) == {POD}
        assert pod.events.topics() == ["/tasks/create"]
        await pod.service.close()

    run(go())


def test_the_same_container_twice(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        with pytest.raises(TtrpcError) as exc:
            await pod.call["Create"](api.CreateTaskRequest(id=POD, bundle=str(pod.tmp_path)))
        assert exc.value.code == Code.ALREADY_EXISTS
        await pod.service.close()

    run(go())


# --- Start, Wait, exit ----------------------------------------------------------------------


def test_start_wait_and_the_exit_event(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        assert pod.service.containers[POD].init.status == tt.RUNNING
        waiter = asyncio.ensure_future(pod.wait(POD))
        await settle()
        assert not waiter.done()
        pod.sb.exit(POD, 3)
        assert await waiter == 3
        assert pod.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        exit_event = pod.events.events[-1]
        assert exit_event.container_id == POD  # type: ignore[attr-defined]
        assert exit_event.exit_status == 3  # type: ignore[attr-defined]
        assert exit_event.pid == VM_PID  # type: ignore[attr-defined]
        with pytest.raises(TtrpcError) as exc:
            await pod.start(POD)
        assert exc.value.code == Code.FAILED_PRECONDITION
        await pod.service.close()

    run(go())


def test_an_exec_runs_and_exits(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        process = AnyPb(value=json.dumps({"args": ["ls"]}).encode())
        await pod.call["Exec"](api.ExecProcessRequest(id=POD, exec_id="e1", spec=process))
        await pod.start(POD, "e1")
        assert pod.sb.calls[-1] == ("start_exec", POD, "e1", {"args": ["ls"], "terminal": False})
        pod.sb.exit(POD, 0, exec_id="e1")
        assert await pod.wait(POD, "e1") == 0
        assert pod.events.topics()[2:] == [
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
        ]
        await pod.call["Delete"](api.DeleteRequest(id=POD, exec_id="e1"))
        assert pod.sb.calls[-1:] == [("remove_exec", POD, "e1")]
        await pod.service.close()

    run(go())


def test_kill_of_a_created_exec_never_reaches_the_sandbox(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        process = AnyPb(value=json.dumps({"args": ["ls"]}).encode())
        await pod.call["Exec"](api.ExecProcessRequest(id=POD, exec_id="e1", spec=process))
        before = list(pod.sb.calls)
        await pod.call["Kill"](api.KillRequest(id=POD, exec_id="e1", signal=9))
        assert pod.sb.calls == before
        assert await pod.wait(POD, "e1") == 128 + 9
        assert pod.events.topics()[-1] == "/tasks/exit"
        with pytest.raises(TtrpcError) as exc:  # it is gone
            await pod.call["Kill"](api.KillRequest(id=POD, exec_id="e1", signal=9))
        assert exc.value.code == Code.NOT_FOUND
        await pod.service.close()

    run(go())


def test_kill_of_a_running_container_goes_to_the_sandbox(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        await pod.call["Kill"](api.KillRequest(id=POD, signal=15, all=True))
        assert pod.sb.calls[-1] == ("kill", POD, 15, "", True)
        await pod.service.close()

    run(go())


def test_kill_while_the_vm_is_lost_is_not_found_as_cri_expects(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        pod.sb.lose_vm()
        with pytest.raises(TtrpcError) as exc:
            await pod.call["Kill"](api.KillRequest(id=POD, signal=9))
        assert exc.value.code == Code.NOT_FOUND and "its VM is gone" in str(exc.value)
        await pod.service.close()

    run(go())


# --- Delete, the end of the pod ----------------------------------------------------------------


def test_deleting_the_last_container_destroys_the_sandbox(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        await pod.create("c1", container_annotations())
        with pytest.raises(TtrpcError) as exc:  # running: kill it first
            await pod.call["Delete"](api.DeleteRequest(id=POD))
        assert exc.value.code == Code.FAILED_PRECONDITION
        pod.sb.exit(POD, 0)
        await pod.wait(POD)
        await pod.call["Delete"](api.DeleteRequest(id=POD))
        assert "destroy" not in pod.sb.names()  # c1 is still there
        resp = await pod.call["Delete"](api.DeleteRequest(id="c1"))
        assert isinstance(resp, api.DeleteResponse)
        assert resp.pid == VM_PID
        # the last container is not removed from the VM on its own: it goes with it
        assert pod.sb.names()[-2:] == ["remove_container", "destroy"]
        assert pod.service.sandbox is None and pod.service.containers == {}
        assert pod.events.topics()[-2:] == ["/tasks/delete", "/tasks/delete"]
        last = pod.events.events[-1]
        assert last.container_id == "c1" and last.pid == VM_PID  # type: ignore[attr-defined]
        await pod.service.close()

    run(go())


def test_a_lost_vm_ends_created_processes_with_255(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.start(POD)
        await pod.create("c1", container_annotations())  # created, never started
        pod.sb.lose_vm()
        assert await pod.wait("c1") == VM_LOST_STATUS
        exit_event = pod.events.events[-1]
        assert pod.events.topics()[-1] == "/tasks/exit"
        assert exit_event.container_id == "c1"  # type: ignore[attr-defined]
        assert exit_event.exit_status == VM_LOST_STATUS  # type: ignore[attr-defined]
        # the running one is ended by its relay, not by the watcher
        assert not pod.service.containers[POD].init.exited.is_set()
        # the sandbox is no longer running: deleting still works
        pod.sb._state = Runstate.STOPPED
        resp = await pod.call["Delete"](api.DeleteRequest(id="c1"))
        assert resp.exit_status == VM_LOST_STATUS  # type: ignore[attr-defined]
        await pod.service.close()

    run(go())


def test_a_delete_racing_a_vm_that_just_died_succeeds(pod: Pod) -> None:
    """The agent's connection drops a moment before the VM's exit is seen: a Delete in
    between waits for the VM instead of failing; with the VM alive the error stands."""

    async def go() -> None:
        await pod.create_pause()
        await pod.create("c1", container_annotations())
        pod.sb._state = Runstate.STOPPED  # remove_container fails: the agent is gone
        with pytest.raises(TtrpcError):  # the VM still runs (wait_vm never returns)
            await pod.call["Delete"](api.DeleteRequest(id="c1"))
        asyncio.get_running_loop().call_later(0.3, pod.sb.lose_vm)
        resp = await pod.call["Delete"](api.DeleteRequest(id="c1"))
        assert isinstance(resp, api.DeleteResponse)
        assert "c1" not in pod.service.containers
        await pod.service.close()

    run(go())


def test_a_vm_shut_down_on_purpose_is_not_lost(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.call["Delete"](api.DeleteRequest(id=POD))  # created: deletable
        await settle()
        assert pod.sb.names()[-1] == "destroy"
        assert not pod.service.watch.lost
        assert "/tasks/exit" not in pod.events.topics()

    run(go())


# --- Stats --------------------------------------------------------------------------------------


def metrics_of(resp: Message) -> metrics_pb2.Metrics:
    assert isinstance(resp, api.StatsResponse)
    assert resp.stats.type_url == METRICS_URL
    return metrics_pb2.Metrics.FromString(resp.stats.value)


def test_stats_of_the_pause_container_are_the_pods_host_cost(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        m = metrics_of(await pod.call["Stats"](api.StatsRequest(id=POD)))
        assert "host_stats" in pod.sb.names() and "stats" not in pod.sb.names()
        assert m.cpu.usage.total == 123_000
        assert m.memory.usage.usage == 64 << 20
        assert m.pids.current == 9
        (net,) = m.network
        assert (net.name, net.rx_bytes, net.rx_packets, net.tx_bytes) == ("eth0", 1500, 3, 700)
        await pod.service.close()

    run(go())


def test_stats_of_a_container_come_from_the_guest(pod: Pod) -> None:
    async def go() -> None:
        await pod.create_pause()
        await pod.create("c1", container_annotations())
        metrics_of(await pod.call["Stats"](api.StatsRequest(id="c1")))
        assert ("stats", "c1") in pod.sb.calls
        assert "host_stats" not in pod.sb.names()
        await pod.service.close()

    run(go())


def test_a_plain_container_is_its_own_pod_and_not_a_pause(tmp_path: Path) -> None:
    """``ctr run``: no annotations; the container makes its pod and its stats are its own."""

    async def go() -> None:
        pod = Pod(tmp_path)
        pod.service.pod_id = "solo"
        await pod.create("solo", {})
        assert pod.sb.options.sandbox_id == "solo"
        metrics_of(await pod.call["Stats"](api.StatsRequest(id="solo")))
        assert ("stats", "solo") in pod.sb.calls
        await pod.service.close()

    run(go())


# --- the guest is not trusted (issue 14: forged events, kills it ignores) -------------------

FAST_KILL = "[runtime]\nkill_timeout = 0.3\n"


def test_forged_oom_events_never_reach_containerd(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The guest names containers that are not in the pod (1,000 of them, and a 1 MiB
    id): none is published and the log gets a line, not a thousand; a real container's
    OOM is published, its repeats within a second are one event."""

    async def go() -> None:
        pod = Pod(tmp_path)
        await pod.create_pause()
        await pod.create("c1", container_annotations())
        for i in range(1000):
            pod.sb.oom_events.put_nowait(f"forged-{i}")
        pod.sb.oom_events.put_nowait("x" * (1 << 20))
        for _ in range(50):
            pod.sb.oom_events.put_nowait("c1")
        while not pod.sb.oom_events.empty():
            await asyncio.sleep(0.01)
        await settle()
        assert pod.events.topics().count("/tasks/oom") == 1
        assert pod.events.events[-1].container_id == "c1"  # type: ignore[attr-defined]
        await pod.service.close()

    with caplog.at_level(logging.INFO, logger="carapace.shim"):
        run(go())
    forged = [r for r in caplog.records if "not in the pod" in r.getMessage()]
    assert len(forged) == 1 and len(forged[0].getMessage()) < 300
    assert len([r for r in caplog.records if "less than" in r.getMessage()]) == 1


def test_a_sigkill_the_guest_ignores_stops_the_vm_by_the_deadline(tmp_path: Path) -> None:
    """The agent acknowledges SIGKILL and kills nothing: by kill_timeout the shim stops
    the VM itself, Wait answers 137, and Delete works (it used to say "is running")."""

    async def go() -> None:
        pod = Pod(tmp_path, FAST_KILL)
        await pod.create_pause()
        await pod.start(POD)
        await pod.create("c1", container_annotations())
        await pod.start("c1")
        waiter = asyncio.ensure_future(pod.wait("c1"))
        await pod.call["Kill"](api.KillRequest(id="c1", signal=9))
        await asyncio.sleep(0.1)
        assert not waiter.done() and "kill_vm" not in pod.sb.names()
        assert await asyncio.wait_for(waiter, 2) == 137
        assert "kill_vm" in pod.sb.names()
        assert await pod.wait(POD) == 137  # every process of the pod
        exits = [e for e in pod.events.events if topic_of(e) == "/tasks/exit"]
        assert sorted((e.container_id, e.exit_status) for e in exits) == [  # type: ignore[attr-defined]
            ("c1", 137),
            (POD, 137),
        ]
        with pytest.raises(TtrpcError) as exc:  # CRI takes NotFound as done
            await pod.call["Kill"](api.KillRequest(id="c1", signal=9))
        assert exc.value.code == Code.NOT_FOUND
        await pod.call["Delete"](api.DeleteRequest(id="c1"))
        await pod.call["Delete"](api.DeleteRequest(id=POD))
        assert pod.sb.names()[-1] == "destroy" and pod.service.containers == {}
        await pod.service.close()

    run(go())


def test_a_sigkill_the_guest_never_answers_stops_the_vm(tmp_path: Path) -> None:
    async def go() -> None:
        pod = Pod(tmp_path, FAST_KILL)
        await pod.create_pause()
        await pod.start(POD)
        pod.sb.kill_answer = "hang"
        await asyncio.wait_for(pod.call["Kill"](api.KillRequest(id=POD, signal=9)), 2)
        assert "kill_vm" in pod.sb.names()
        assert await pod.wait(POD) == 137
        await pod.service.close()

    run(go())


def test_a_sigkill_the_guest_refuses_still_has_its_deadline(tmp_path: Path) -> None:
    async def go() -> None:
        pod = Pod(tmp_path, FAST_KILL)
        await pod.create_pause()
        await pod.start(POD)
        pod.sb.kill_answer = AgentError("agent SignalProcess: no such process (NOT_FOUND)")
        with pytest.raises(TtrpcError):
            await pod.call["Kill"](api.KillRequest(id=POD, signal=9))
        assert await asyncio.wait_for(pod.wait(POD), 2) == 137
        assert "kill_vm" in pod.sb.names()
        await pod.service.close()

    run(go())


def test_the_sandbox_containers_sigkill_ends_the_whole_pod(tmp_path: Path) -> None:
    """The pause exits, but another container the guest was told to kill still runs:
    by the deadline the VM is stopped and that container reported killed."""

    async def go() -> None:
        pod = Pod(tmp_path, FAST_KILL)
        await pod.create_pause()
        await pod.start(POD)
        await pod.create("c1", container_annotations())
        await pod.start("c1")
        await pod.call["Kill"](api.KillRequest(id=POD, signal=9))
        pod.sb.exit(POD, 137)  # the guest killed the pause only
        assert await pod.wait(POD) == 137
        assert await asyncio.wait_for(pod.wait("c1"), 2) == 137
        assert "kill_vm" in pod.sb.names()
        await pod.service.close()

    run(go())


def test_a_guest_that_kills_in_time_keeps_its_vm(tmp_path: Path) -> None:
    async def go() -> None:
        pod = Pod(tmp_path, FAST_KILL)
        await pod.create_pause()
        await pod.start(POD)
        await pod.create("c1", container_annotations())
        await pod.start("c1")
        await pod.call["Kill"](api.KillRequest(id="c1", signal=9))
        pod.sb.exit("c1", 137)
        await pod.call["Kill"](api.KillRequest(id=POD, signal=15))  # no deadline
        await asyncio.sleep(0.6)
        assert "kill_vm" not in pod.sb.names()
        assert not pod.service.containers[POD].init.exited.is_set()
        await pod.service.close()

    run(go())


def test_a_guest_breaking_the_agent_protocol_loses_its_vm(tmp_path: Path) -> None:
    async def go() -> None:
        pod = Pod(tmp_path)
        await pod.create_pause()
        await pod.start(POD)
        pod.sb.break_agent("a message of type 1 on stream 7")
        assert await asyncio.wait_for(pod.wait(POD), 5) == VM_LOST_STATUS
        for _ in range(400):  # the VM is given VM_GONE_WAIT to exit by itself first
            if "kill_vm" in pod.sb.names():
                break
            await asyncio.sleep(0.01)
        assert "kill_vm" in pod.sb.names()
        assert "broke the agent protocol" in pod.service.watch.forced
        await pod.call["Delete"](api.DeleteRequest(id=POD))
        assert pod.sb.names()[-1] == "destroy"
        await pod.service.close()

    run(go())


def test_execs_of_a_vm_stopped_by_force_are_killed_and_deletable(tmp_path: Path) -> None:
    async def go() -> None:
        pod = Pod(tmp_path, FAST_KILL)
        await pod.create_pause()
        await pod.start(POD)
        process = AnyPb(value=json.dumps({"args": ["sleep", "9"]}).encode())
        await pod.call["Exec"](api.ExecProcessRequest(id=POD, exec_id="e1", spec=process))
        await pod.start(POD, "e1")
        await pod.call["Kill"](api.KillRequest(id=POD, exec_id="e1", signal=9))
        assert await asyncio.wait_for(pod.wait(POD, "e1"), 2) == 137
        assert await pod.wait(POD) == 137  # the VM went: its init with it
        await pod.call["Delete"](api.DeleteRequest(id=POD, exec_id="e1"))
        assert "remove_exec" not in pod.sb.names()  # the guest is not asked any more
        await pod.service.close()

    run(go())
