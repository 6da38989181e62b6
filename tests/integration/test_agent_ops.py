"""The agent's container operations on a real VM: pause/resume, stats, process list,
resource update and OOM-kill events (sharing one pod VM)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import carapace
from carapace.agent.client import AgentClient
from carapace.errors import AgentError
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.protocols import agent_pb2 as pb
from carapace.sandbox import ProcessIO
from carapace.sandbox import Sandbox as AsyncSandbox
from carapace.shim.metrics import V1_UNLIMITED, to_v1_metrics

MiB = 1 << 20
# busybox dd allocates its whole block before reading: 64 MiB against a 32 MiB limit
ALLOCATE_64M = "dd if=/dev/zero of=/dev/null bs=64M count=1"


def agent_of(s: AsyncSandbox) -> AgentClient:
    assert s.agent is not None
    return s.agent


def call(sb: carapace.Sandbox, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``method(agent, *args)`` (an AgentClient coroutine function) on the sandbox's loop."""
    return sb.call_async(lambda s: method(agent_of(s), *args, **kwargs))


@contextmanager
def container(
    sb: carapace.Sandbox,
    cid: str,
    args: list[str],
    resources: dict[str, Any] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    start: bool = True,
) -> Iterator[int]:
    """A container of the shared sandbox (started: its init's guest pid is given),
    removed on the way out."""
    spec = default_spec(args)
    if resources:
        spec["linux"]["resources"] = resources
    spec["mounts"] += mounts or []
    sb.call_async(lambda s: s.create_container(cid, Spec.from_dict(spec), s.image().rootfs))
    try:
        yield sb.call_async(lambda s: s.start_container(cid)) if start else 0
    finally:
        sb.call_async(lambda s: s.remove_container(cid))


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_a_container_id_is_free_again_as_soon_as_it_is_removed(
    shared_sandbox: carapace.Sandbox,
) -> None:
    """The agent answers RemoveContainer before crun's delete of it ends; a container
    created again with the same id at once waits for that delete, and runs."""

    async def rounds(s: AsyncSandbox) -> tuple[list[int], list[str]]:
        codes = [await s.run(["sh", "-c", f"exit {n}"], container_id="again") for n in range(3)]
        return codes, list(s.containers)

    codes, left = shared_sandbox.call_async(rounds)
    assert codes == [0, 1, 2]
    assert "again" not in left


def test_pause_freezes_a_container_and_resume_thaws_it(
    shared_sandbox: carapace.Sandbox, tmp_path: Path
) -> None:
    sb = shared_sandbox
    cid = "pauser"
    # the counter goes to a host directory bound into the container (a volume), so
    # the host can read it while every process of the container is frozen
    out = tmp_path / f"{cid}-out"
    out.mkdir()
    counter = out / "counter"

    def value() -> int:
        try:
            return int(counter.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    mount = {
        "destination": "/out",
        "type": "bind",
        "source": str(out),
        "options": ["rbind", "rw"],
    }
    loop = "i=0; while true; do i=$((i+1)); echo $i > /out/counter; sleep 0.1; done"
    try:
        with container(sb, cid, ["sh", "-c", loop], mounts=[mount]):
            wait_for("the counter to start", lambda: value() >= 3)
            call(sb, AgentClient.pause_container, cid)
            time.sleep(0.3)  # a write in flight when the freeze came lands by now
            frozen = value()
            time.sleep(1.5)
            assert value() == frozen, "the counter advanced while the container was paused"
            # a paused container still answers stats, and its processes are all there
            assert call(sb, AgentClient.stats_container, cid).pids_current >= 1
            call(sb, AgentClient.resume_container, cid)
            wait_for("the counter to advance after resume", lambda: value() >= frozen + 3)
            # paused again, a container can still be removed (SIGKILL ends frozen tasks)
            call(sb, AgentClient.pause_container, cid)
    finally:
        for f in out.iterdir():
            f.unlink()
        out.rmdir()


def test_pause_and_resume_of_unknown_or_exited_containers_fail(
    shared_sandbox: carapace.Sandbox,
) -> None:
    sb = shared_sandbox
    with pytest.raises(AgentError, match=r"'nope' not found.*NOT_FOUND"):
        call(sb, AgentClient.pause_container, "nope")
    with pytest.raises(AgentError, match=r"'nope' not found.*NOT_FOUND"):
        call(sb, AgentClient.resume_container, "nope")
    with container(sb, "quick", ["true"]):
        assert sb.call_async(lambda s: s.wait("quick")) == 0
        with pytest.raises(AgentError, match=r"not running.*FAILED_PRECONDITION"):
            call(sb, AgentClient.pause_container, "quick")


def test_stats_of_a_running_container(shared_sandbox: carapace.Sandbox) -> None:
    sb = shared_sandbox
    # some CPU time and some memory: a shell loop that keeps a 4 MiB string
    busy = "x=$(head -c 4000000 /dev/zero | tr '\\0' a); while true; do :; done"
    with container(sb, "statted", ["sh", "-c", busy]):

        def stats() -> pb.StatsContainerResponse:
            r: pb.StatsContainerResponse = call(sb, AgentClient.stats_container, "statted")
            return r

        wait_for(
            "the string to be built and CPU time to be used",
            lambda: stats().memory_current > 4_000_000 and stats().cpu_stat["usage_usec"] > 200_000,
        )
        s = stats()
        assert s.memory_current > 4_000_000
        assert s.memory_peak >= s.memory_current  # the guest's 6.1 kernel has memory.peak
        assert s.memory_max == 0  # no limit
        assert s.pids_current >= 1 and s.pids_max == 0
        assert s.memory_stat["anon"] > 0
        assert "oom_kill" in s.memory_events
        assert s.cpu_stat["user_usec"] + s.cpu_stat["system_usec"] > 0
        m = to_v1_metrics(s)
        assert m.memory.usage.usage == s.memory_current > 0
        assert m.memory.usage.limit == V1_UNLIMITED
        assert m.cpu.usage.total == s.cpu_stat["usage_usec"] * 1000 > 0
    with pytest.raises(AgentError, match="NOT_FOUND"):
        call(sb, AgentClient.stats_container, "statted")


def test_list_processes(shared_sandbox: carapace.Sandbox) -> None:
    sb = shared_sandbox
    with container(sb, "forker", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"]) as init_pid:
        wait_for(
            "three processes", lambda: len(call(sb, AgentClient.list_processes, "forker")) >= 3
        )
        pids = call(sb, AgentClient.list_processes, "forker")
        assert len(pids) >= 3, pids
        assert pids == sorted(set(pids)) and all(p > 1 for p in pids)
        assert init_pid in pids  # guest pids, the container's init among them


def test_update_sets_the_memory_limit(shared_sandbox: carapace.Sandbox) -> None:
    sb = shared_sandbox
    with container(sb, "updated", ["sleep", "1000"]):
        assert call(sb, AgentClient.stats_container, "updated").memory_max == 0
        call(sb, AgentClient.update_container, "updated", {"memory": {"limit": 48 * MiB}})
        s = call(sb, AgentClient.stats_container, "updated")
        assert s.memory_max == 48 * MiB
        assert to_v1_metrics(s).memory.usage.limit == 48 * MiB
        call(sb, AgentClient.update_container, "updated", {"pids": {"limit": 64}})
        assert call(sb, AgentClient.stats_container, "updated").pids_max == 64
        # crun's own words come back when it refuses
        with pytest.raises(AgentError, match=r"crun update updated: .*memory\.max"):
            call(sb, AgentClient.update_container, "updated", {"memory": {"limit": -5}})


def test_an_oom_kill_of_init_is_reported(shared_sandbox: carapace.Sandbox) -> None:
    sb = shared_sandbox
    assert call(sb, AgentClient.get_oom_event, timeout=0.1) is None  # nothing pending
    with container(
        sb, "oomer", ALLOCATE_64M.split(), resources={"memory": {"limit": 32 * MiB}}, start=False
    ):
        status = sb.call_async(
            lambda s: s.relay("oomer", "", ProcessIO(), s.start_container("oomer"))
        )
        assert status == 137
        assert call(sb, AgentClient.get_oom_event) == "oomer"  # no timeout: it is there
        s = call(sb, AgentClient.stats_container, "oomer")
        assert s.memory_events["oom_kill"] == 1
        assert to_v1_metrics(s).memory_oom_control.oom_kill == 1
    assert call(sb, AgentClient.get_oom_event, timeout=0.5) is None  # reported once
    # the sandbox and its other containers are unharmed
    assert sb.run(["echo", "alive"]).text == "alive\n"


def test_an_oom_kill_in_a_running_container_is_reported_while_it_runs(
    shared_sandbox: carapace.Sandbox,
) -> None:
    sb = shared_sandbox
    script = f"{ALLOCATE_64M}; echo dd=$? > /dev/null; sleep 1000"
    with (
        container(sb, "bystander", ["sleep", "1000"]),
        container(sb, "oomer2", ["sh", "-c", script], resources={"memory": {"limit": 32 * MiB}}),
    ):
        assert call(sb, AgentClient.get_oom_event, timeout=60) == "oomer2"
        assert call(sb, AgentClient.stats_container, "oomer2").memory_events["oom_kill"] == 1
        assert len(call(sb, AgentClient.list_processes, "oomer2")) >= 1  # still running
        assert call(sb, AgentClient.list_processes, "bystander")
        assert call(sb, AgentClient.stats_container, "bystander").memory_events["oom_kill"] == 0
    assert call(sb, AgentClient.get_oom_event, timeout=0.5) is None


def test_an_oom_kill_after_update_container_lowered_the_limit(
    shared_sandbox: carapace.Sandbox,
) -> None:
    sb = shared_sandbox
    # the shell allocates when the host sends SIGUSR1, after the limit was lowered
    script = f"trap '{ALLOCATE_64M}' USR1; while true; do sleep 0.2; done"
    with container(sb, "squeezed", ["sh", "-c", script]):
        call(sb, AgentClient.update_container, "squeezed", {"memory": {"limit": 32 * MiB}})
        sb.call_async(lambda s: s.kill("squeezed", signal.SIGUSR1))
        assert call(sb, AgentClient.get_oom_event, timeout=60) == "squeezed"
