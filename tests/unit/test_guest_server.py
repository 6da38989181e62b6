"""The guest agent's service: one error guard for every verb, and the registration of
every method of the agent API (carapace.guest.server), without a VM."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message

from carapace.errors import InvalidArgument, NotFound
from carapace.guest.crun import CrunError
from carapace.guest.netlink import NetlinkError
from carapace.guest.pod import Container, Process
from carapace.guest.server import Agent, guard
from carapace.protocols import agent_pb2 as pb
from carapace.protocols.contract import AGENT_SERVICE
from carapace.ttrpc import Client, Code, TtrpcError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


def raising(error: BaseException) -> Any:
    async def handler(req: Any) -> Message:
        raise error

    return handler


# -- the guard ------------------------------------------------------------------------


def test_a_crun_error_becomes_internal_with_crun_s_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    crun = CrunError("crun start c1: container not created")
    with caplog.at_level(logging.WARNING, "carapace.agent"), pytest.raises(TtrpcError) as e:
        run(guard("StartContainer", raising(crun))(pb.StartContainerRequest()))
    assert e.value.code == Code.INTERNAL
    assert e.value.message == "crun start c1: container not created"
    assert e.value.__cause__ is crun
    assert "StartContainer failed: crun start c1" in caplog.text


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("interface MAC '02-00' is not a MAC address"), Code.INVALID_ARGUMENT),
        (NotFound("no interface with MAC 02:00:00:00:09:09 in the guest"), Code.NOT_FOUND),
        (NetlinkError("set eth0 MTU 40", 22, "mtu less than device minimum"), Code.INTERNAL),
    ],
)
def test_carapace_errors_answer_their_code_with_their_message(error: Exception, code: Code) -> None:
    with pytest.raises(TtrpcError) as e:
        run(guard("UpdateInterface", raising(error))(pb.UpdateInterfaceRequest()))
    assert (e.value.code, e.value.message) == (code, str(error))
    assert e.value.__cause__ is error


def test_a_ttrpc_error_passes_as_it_is() -> None:
    own = TtrpcError(Code.NOT_FOUND, "container 'x' not found in the sandbox")
    with pytest.raises(TtrpcError) as e:
        run(guard("StartContainer", raising(own))(pb.StartContainerRequest()))
    assert e.value is own


def test_an_unexpected_error_becomes_unknown_and_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, "carapace.agent"), pytest.raises(TtrpcError) as e:
        run(guard("ExecProcess", raising(FileExistsError(17, "File exists")))(None))
    assert e.value.code == Code.UNKNOWN
    assert e.value.message == "[Errno 17] File exists"
    (record,) = [r for r in caplog.records if r.name == "carapace.agent"]
    assert record.getMessage() == "ExecProcess failed"
    assert record.exc_info is not None


def test_an_unexpected_error_without_a_message_is_named_by_its_type() -> None:
    # what the ttrpc server itself answers for an error that reaches it
    with pytest.raises(TtrpcError) as e:
        run(guard("CreateContainer", raising(TimeoutError()))(None))
    assert (e.value.code, e.value.message) == (Code.UNKNOWN, "TimeoutError")


def test_cancellation_is_not_an_error() -> None:
    # a request's deadline cancels the handler; the server answers DEADLINE_EXCEEDED
    with pytest.raises(asyncio.CancelledError):
        run(guard("WaitProcess", raising(asyncio.CancelledError()))(None))


def test_a_reply_passes_through() -> None:
    async def check(req: pb.CheckRequest) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    guarded = guard("Check", check)
    assert guarded.__name__ == "check"
    assert run(guarded(pb.CheckRequest())).status == pb.HealthCheckResponse.SERVING


# -- the agent's registration -----------------------------------------------------------


def test_the_agent_serves_every_method_of_the_agent_api() -> None:
    service = pb.DESCRIPTOR.services_by_name["Agent"]
    assert service.full_name == AGENT_SERVICE
    expected = {m.name: m.input_type.full_name for m in service.methods}
    agent = Agent()
    served = {name: req.DESCRIPTOR.full_name for name, req, _ in agent.methods}
    assert served == expected
    assert len(agent.methods) == len(expected)


class FakeCrun:
    """Fails the way a real crun does, or with a bug of its own."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls: list[tuple[str, str]] = []

    async def _fail(self, verb: str, container_id: str, *args: Any, **kw: Any) -> None:
        self.calls.append((verb, container_id))
        raise self.error

    async def start(self, container_id: str) -> None:
        await self._fail("start", container_id)

    async def pause(self, container_id: str) -> None:
        await self._fail("pause", container_id)

    async def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        await self._fail("kill", container_id)

    async def update(self, container_id: str, resources_file: str) -> None:
        await self._fail("update", container_id)


@asynccontextmanager
async def serving(agent: Agent) -> AsyncIterator[Client]:
    a, b = socket.socketpair()
    cr, cw = await asyncio.open_connection(sock=a)
    sr, sw = await asyncio.open_connection(sock=b)
    task = asyncio.create_task(agent.server.serve_connection(sr, sw))
    client = Client(cr, cw)
    try:
        yield client
    finally:
        await client.close()
        await agent.server.close()
        await task


def agent_with(tmp_path: Path, crun: FakeCrun) -> Agent:
    """An agent with one running container c1 and the given crun."""
    agent = Agent()
    agent.pod._crun = crun  # type: ignore[assignment]
    init = Process(container_id="c1", exec_id="", terminal=False, pid=4242)
    container = Container(id="c1", bundle=str(tmp_path), rootfs="/", mounts=[], init=init)
    container.started = True
    agent.pod.containers["c1"] = container
    return agent


def call_error(tmp_path: Path, crun: FakeCrun, method: str, req: Message) -> TtrpcError:
    async def go() -> TtrpcError:
        agent = agent_with(tmp_path, crun)
        agent.pod.containers["c1"].init.exit = asyncio.get_running_loop().create_future()
        async with serving(agent) as client:
            with pytest.raises(TtrpcError) as e:
                await client.call(AGENT_SERVICE, method, req, pb.Empty, timeout=5)
        return e.value

    return run(go())


@pytest.mark.parametrize(
    ("method", "req"),
    [
        ("PauseContainer", pb.PauseContainerRequest(container_id="c1")),
        ("SignalProcess", pb.SignalProcessRequest(container_id="c1", signal=9, all=True)),
        ("UpdateContainer", pb.UpdateContainerRequest(container_id="c1", resources=b"{}")),
    ],
)
def test_crun_failures_of_every_verb_answer_internal(
    tmp_path: Path, method: str, req: Message
) -> None:
    crun = FakeCrun(CrunError("crun x c1: boom"))
    e = call_error(tmp_path, crun, method, req)
    assert (e.code, e.message) == (Code.INTERNAL, "crun x c1: boom")
    assert [c for _, c in crun.calls] == ["c1"]
    assert list(tmp_path.iterdir()) == []  # UpdateContainer's resources file is gone


def test_start_container_failing_in_crun_leaves_it_not_started(tmp_path: Path) -> None:
    crun = FakeCrun(CrunError("crun start c1: boom"))

    async def go() -> None:
        agent = agent_with(tmp_path, crun)
        agent.pod.containers["c1"].started = False
        async with serving(agent) as client:
            with pytest.raises(TtrpcError) as e:
                await client.call(
                    AGENT_SERVICE,
                    "StartContainer",
                    pb.StartContainerRequest(container_id="c1"),
                    pb.StartContainerResponse,
                )
            assert (e.value.code, e.value.message) == (Code.INTERNAL, "crun start c1: boom")
            assert not agent.pod.containers["c1"].started

    run(go())


def test_a_bug_in_a_verb_answers_unknown(tmp_path: Path) -> None:
    e = call_error(
        tmp_path,
        FakeCrun(RuntimeError("a bug")),
        "PauseContainer",
        pb.PauseContainerRequest(container_id="c1"),
    )
    assert (e.code, e.message) == (Code.UNKNOWN, "a bug")


def test_lookups_answer_not_found_and_failed_precondition(tmp_path: Path) -> None:
    crun = FakeCrun(CrunError("never"))
    e = call_error(tmp_path, crun, "PauseContainer", pb.PauseContainerRequest(container_id="c9"))
    assert (e.code, e.message) == (Code.NOT_FOUND, "container 'c9' not found in the sandbox")
    e = call_error(
        tmp_path, crun, "WaitProcess", pb.WaitProcessRequest(container_id="c1", exec_id="e1")
    )
    assert (e.code, e.message) == (Code.NOT_FOUND, "exec 'e1' not found in container 'c1'")
    assert crun.calls == []


def test_a_malformed_network_request_answers_invalid_argument(tmp_path: Path) -> None:
    # checked before any netlink request: no root needed
    req = pb.UpdateInterfaceRequest(interface=pb.Interface(mac="02-00-00-00-01-01"))
    e = call_error(tmp_path, FakeCrun(CrunError("never")), "UpdateInterface", req)
    assert e.code == Code.INVALID_ARGUMENT
    assert e.message.startswith("interface MAC '02-00-00-00-01-01' is not a MAC address; accepted")
