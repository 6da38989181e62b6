"""The Sandbox's lifecycle with fakes of the VM and the agent (no root, no VM): its
Runstate moves, its guard, and rollback when any step of start fails (nothing that was
recorded as made is left behind), on a cgroup v1 tree in a temporary directory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from carapace.config import Config
from carapace.errors import (
    AlreadyExists,
    HypervisorError,
    InvalidArgument,
    NotFound,
    StateError,
)
from carapace.hostcgroup import CgroupV1
from carapace.hypervisor import AccelChoice, VMSpec
from carapace.image.store import GuestImage
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.sandbox import HostFacts, Runstate, Sandbox, SandboxOptions, SandboxParts
from carapace.sandbox.state import SandboxRecord

V1_HIERARCHIES = ("blkio", "cpu,cpuacct", "memory", "pids")


class Boom(HypervisorError):
    """The failure a fake injects."""


@dataclass
class FakeVM:
    """A VM that only pretends; ``fail`` names the method that raises."""

    spec: VMSpec
    fail: str = ""
    pre_exec: list[Callable[[], None]] = field(default_factory=list)
    started: bool = False
    stopped: bool = False
    vcpus: int = 0
    memory_added: int = 0
    _exit: asyncio.Event = field(default_factory=asyncio.Event)

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise Boom(f"fake VM: {name} failed")

    @property
    def pid(self) -> int | None:
        return 0 if not self.started else 999_999_999

    @property
    def returncode(self) -> int | None:
        return 0 if self._exit.is_set() else None

    @property
    def can_unplug_vcpus(self) -> bool:
        return False

    async def start(self) -> int:
        self._maybe_fail("start")
        self.started = True
        self.vcpus = self.spec.vcpus
        self.spec.agent_socket.touch()
        return 999_999_999  # no such process: release must not kill anything

    def exited(self) -> bool:
        return self._exit.is_set()

    async def wait(self) -> int:
        await self._exit.wait()
        return 0

    async def stop(self, timeout: float) -> None:
        self.stopped = True
        self._exit.set()

    def kill(self) -> None:
        self._exit.set()

    def console_tail(self, lines: int = 15) -> str:
        return "fake console"

    async def vcpu_threads(self) -> dict[int, int]:
        self._maybe_fail("vcpu_threads")
        return {i: os.getpid() for i in range(self.vcpus)}

    async def plugged_vcpus(self) -> int:
        return self.vcpus

    async def check_vcpus(self, n: int) -> None:
        self._maybe_fail("check_vcpus")

    async def set_vcpus(self, n: int) -> None:
        self.vcpus = n

    async def add_memory(self, mib: int) -> int:
        self.memory_added += mib
        return mib


@dataclass
class FakeAgent:
    fail: str = ""
    calls: list[str] = field(default_factory=list)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    closed: bool = False
    online: tuple[int, int] = (1, 1 << 20)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            raise Boom(f"fake agent: {name} failed")

    async def check(self, timeout: float | None) -> bool:
        self._call("check")
        return True

    async def create_sandbox(self, sandbox_id: str, hostname: str, storages: Any) -> None:
        self._call("create_sandbox")

    async def guest_details(self) -> Any:
        self._call("guest_details")
        return SimpleNamespace(boot_id="boot-1")

    async def destroy_sandbox(self, timeout: float) -> None:
        self._call("destroy_sandbox")

    async def close(self) -> None:
        self.closed = True

    async def create_container(
        self,
        cid: str,
        spec: dict[str, Any],
        rootfs: str,
        overlay: bool,
        storages: list[Any] | None = None,
    ) -> None:
        self._call("create_container")
        self.containers[cid] = {"spec": spec, "rootfs": rootfs, "overlay": overlay}

    async def start_container(self, cid: str) -> int:
        self._call("start_container")
        return 7

    async def remove_container(self, cid: str, timeout: int = 10) -> None:
        self._call("remove_container")
        self.containers.pop(cid, None)

    async def online_cpu_mem(self, want: int, timeout: float, max_online: int) -> tuple[int, int]:
        self._call("online_cpu_mem")
        return (want or self.online[0]), self.online[1]


class FakeMounts:
    def __init__(self) -> None:
        self.mounted: dict[str, str] = {}

    def bind_mount(
        self, source: str, target: str, readonly: bool = False, recursive: bool = True
    ) -> None:
        self.mounted[target] = source

    def make_shared(self, target: str) -> None:
        assert target in self.mounted

    def make_slave(self, target: str) -> None:
        assert target in self.mounted

    def umount(self, target: str, lazy: bool = False) -> None:
        self.mounted.pop(target)

    def is_mountpoint(self, path: str) -> bool:
        return path in self.mounted


@dataclass
class Rig:
    tmp: Path
    config: Config
    parts: SandboxParts
    agent: FakeAgent
    mounts: FakeMounts
    vms: list[FakeVM]
    cgroot: Path

    def cgroup_dirs(self) -> list[Path]:
        """Every cgroup directory below the hierarchies' roots."""
        return sorted(p for h in V1_HIERARCHIES for p in (self.cgroot / h).rglob("*") if p.is_dir())

    def sandbox(self, **options: Any) -> Sandbox:
        return Sandbox(self.config, SandboxOptions(**options), parts=self.parts)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    cgroot = tmp_path / "cgroup"
    for h in V1_HIERARCHIES:
        (cgroot / h).mkdir(parents=True)
    image_dir = tmp_path / "image"
    (image_dir / "rootfs").mkdir(parents=True)
    for name in ("vmlinux", "initrd.img"):
        (image_dir / name).write_text("x")
    image = GuestImage(image_dir / "vmlinux", image_dir / "initrd.img", image_dir / "rootfs", {})
    config = Config()
    config.runtime.run_dir = str(tmp_path / "run")
    config.runtime.state_dir = str(tmp_path / "state")
    config.hypervisor.shared_fs = "virtio-9p"  # a test below fakes virtiofsd
    agent = FakeAgent()
    mounts = FakeMounts()
    vms: list[FakeVM] = []
    fail_vm = {"at": ""}

    def new_vm(binary: str, spec: VMSpec, die_with_owner: bool) -> FakeVM:
        vm = FakeVM(spec, fail=fail_vm["at"])
        vms.append(vm)
        return vm

    async def connect_agent(path: str) -> FakeAgent:
        if agent.fail == "connect":
            raise Boom("fake agent: connect failed")
        return agent

    parts = SandboxParts(
        host=lambda: HostFacts(
            usable_cpus=2, memory_total=8 << 30, file_max=1 << 20, nofile_cap=20000
        ),
        new_vm=new_vm,  # type: ignore[arg-type]
        choose_accelerator=lambda *a: AccelChoice("tcg", "fake"),
        connect_agent=connect_agent,  # type: ignore[arg-type]
        cgroup_driver=lambda: CgroupV1(str(cgroot)),
        mounts=mounts,
        image=lambda d: image,
    )
    r = Rig(tmp_path, config, parts, agent, mounts, vms, cgroot)
    r.fail_vm = fail_vm  # type: ignore[attr-defined]
    return r


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def spec(*args: str, **extra: Any) -> Spec:
    data = default_spec(list(args) or ["true"])
    data.update(extra)
    return Spec.from_dict(data)


# -- a whole life -----------------------------------------------------------------------


def test_start_create_remove_destroy(rig: Rig) -> None:
    async def life() -> None:
        sb = rig.sandbox(sandbox_id="pod1")
        assert sb.state is Runstate.CREATED and sb.vm_pid == 0
        await sb.start()
        assert sb.state is Runstate.RUNNING
        assert sb.vm_pid == 999_999_999 and sb.accel == "tcg" and sb.boot_id == "boot-1"
        assert SandboxRecord.load(sb.run_dir).state is Runstate.RUNNING
        cg = rig.cgroot / "cpu,cpuacct" / "carapace" / "pod1"
        assert cg.is_dir(), rig.cgroup_dirs()
        rootfs = rig.tmp / "image" / "rootfs"
        await sb.create_container("c1", spec("sleep", "1"), rootfs)
        views = {str(sb.run_dir / "mounts"): str(sb.run_dir / "mounts")}
        views[str(sb.run_dir / "shared")] = str(sb.run_dir / "mounts")
        made = sb.run_dir / "mounts" / "c1" / "rootfs"  # the VM sees it in shared/
        assert rig.mounts.mounted == {**views, str(made): str(rootfs)}
        assert rig.agent.containers["c1"]["rootfs"] == "/run/carapace/shared/c1/rootfs"
        assert SandboxRecord.load(sb.run_dir).mounts == [*views, str(made)]
        assert await sb.start_container("c1") == 7
        await sb.remove_container("c1")
        assert rig.mounts.mounted == views and not (sb.run_dir / "mounts" / "c1").exists()
        await sb.destroy()
        assert sb.state is Runstate.DELETED
        assert rig.vms[0].stopped and rig.agent.closed
        assert "destroy_sandbox" in rig.agent.calls
        assert not sb.run_dir.exists()
        assert rig.cgroup_dirs() == []
        await sb.destroy()  # idempotent

    run(life())


def test_the_guard_names_the_state(rig: Rig) -> None:
    sb = rig.sandbox(sandbox_id="pod2")
    with pytest.raises(StateError, match=r"create_container needs state running; it is created"):
        run(sb.create_container("c1", spec(), rig.tmp))

    async def twice() -> None:
        await sb.start()
        try:
            with pytest.raises(StateError, match="start needs state created; it is running"):
                await sb.start()
        finally:
            await sb.destroy()
        with pytest.raises(StateError, match="set_size needs state running; it is deleted"):
            await sb.set_size(1, 1024)

    run(twice())


def test_bad_options_make_nothing(rig: Rig) -> None:
    with pytest.raises(InvalidArgument, match="--memory"):
        rig.sandbox(memory="100M")
    with pytest.raises(InvalidArgument, match="sandbox id"):
        rig.sandbox(sandbox_id="../x")
    hostpid = default_spec(["true"])
    hostpid["linux"]["namespaces"] = [{"type": "network"}, {"type": "ipc"}, {"type": "uts"}]
    with pytest.raises(InvalidArgument, match="host's pid namespace"):
        rig.sandbox(sandbox_spec=Spec.from_dict(hostpid))
    assert not (rig.tmp / "run").exists() and rig.cgroup_dirs() == []


def test_a_second_sandbox_with_the_same_id_leaves_the_first_alone(rig: Rig) -> None:
    async def both() -> None:
        first = rig.sandbox(sandbox_id="same")
        await first.start()
        second = rig.sandbox(sandbox_id="same")
        with pytest.raises(AlreadyExists):
            await second.start()
        await second.destroy()
        assert first.run_dir.is_dir() and first.state is Runstate.RUNNING
        await first.destroy()

    run(both())


# -- rollback: a failure at each step of start leaves nothing -----------------------------

START_FAILURES = [
    ("vm", "start"),
    ("agent", "connect"),
    ("agent", "check"),
    ("agent", "create_sandbox"),
    ("agent", "guest_details"),
    ("vm", "vcpu_threads"),  # placing the vCPU threads of a fractional CPU amount
]


@pytest.mark.parametrize(("who", "step"), START_FAILURES)
def test_a_failing_start_step_leaves_nothing(rig: Rig, who: str, step: str) -> None:
    if who == "vm":
        rig.fail_vm["at"] = step  # type: ignore[attr-defined]
    else:
        rig.agent.fail = step
    sb = rig.sandbox(sandbox_id="rollback", cpus=0.5)
    with pytest.raises(HypervisorError):
        run(sb.start())
    assert sb.state is Runstate.DELETED
    assert not sb.run_dir.exists()
    assert rig.cgroup_dirs() == []
    assert rig.mounts.mounted == {}
    if rig.vms and rig.vms[0].started:
        assert rig.vms[0].stopped


def test_a_failing_container_create_leaves_nothing(rig: Rig) -> None:
    async def go() -> None:
        sb = rig.sandbox(sandbox_id="pod3")
        await sb.start()
        rig.agent.fail = "create_container"
        with pytest.raises(Boom):
            await sb.create_container("c1", spec(), rig.tmp / "image" / "rootfs")
        assert "c1" not in sb.containers and len(rig.mounts.mounted) == 2  # the views
        views = [str(sb.run_dir / "mounts"), str(sb.run_dir / "shared")]
        assert SandboxRecord.load(sb.run_dir).mounts == views
        assert not (sb.run_dir / "mounts" / "c1").exists()
        with pytest.raises(NotFound, match="not a directory"):
            await sb.create_container("c2", spec(), rig.tmp / "missing")
        await sb.destroy()

    run(go())


def test_sandbox_only_annotations_are_refused_on_other_containers(rig: Rig) -> None:
    async def go() -> None:
        pod = spec(annotations={"com.github.containers.virtcontainers.sandbox_cpu": "1"})
        sb = rig.sandbox(sandbox_id="pod4", sandbox_spec=pod)
        await sb.start()
        try:
            other = spec(annotations={"com.github.containers.virtcontainers.sandbox_cpu": "2"})
            with pytest.raises(InvalidArgument, match="sandbox_cpu"):
                await sb.create_container("c1", other, rig.tmp / "image" / "rootfs")
            assert rig.agent.containers == {}
        finally:
            await sb.destroy()

    run(go())


def test_container_and_exec_ids_with_a_trailing_newline_are_refused(rig: Rig) -> None:
    # ``ID_RE.match`` with ``$`` took "abc\n" (issue 14): refused before the agent is asked
    async def go() -> None:
        sb = rig.sandbox(sandbox_id="pod6")
        await sb.start()
        try:
            rootfs = rig.tmp / "image" / "rootfs"
            with pytest.raises(InvalidArgument, match=r"^container id 'abc\\n'"):
                await sb.create_container("abc\n", spec(), rootfs)
            assert rig.agent.containers == {}
            await sb.create_container("c1", spec(), rootfs)
            calls = list(rig.agent.calls)
            with pytest.raises(InvalidArgument, match=r"^exec id 'abc\\n'"):
                await sb.start_exec("c1", "abc\n", {"args": ["true"]})
            with pytest.raises(InvalidArgument, match=r"^exec id 'abc\\n'"):
                await sb.exec("c1", "abc\n", {"args": ["true"]})
            assert rig.agent.calls == calls
        finally:
            await sb.destroy()

    run(go())


def test_a_lost_vm_is_seen_by_wait_vm(rig: Rig) -> None:
    async def go() -> None:
        sb = rig.sandbox(sandbox_id="pod5")
        with pytest.raises(StateError, match="has no VM"):
            await sb.wait_vm()
        await sb.start()
        rig.vms[0].kill()
        assert await asyncio.wait_for(sb.wait_vm(), 1) == 0
        await sb.destroy()
        assert sb.state is Runstate.DELETED

    run(go())


class FakeVirtiofsd:
    """A virtio-fs daemon that only pretends; ``die()`` makes it exit."""

    def __init__(self, record_path: Path) -> None:
        self.record_path = record_path
        self.pre_exec: list[Callable[[], None]] = []
        self.started = self.stopped = False
        self._exit = asyncio.Event()

    async def start(self) -> int:
        # recorded before it exists
        assert SandboxRecord.load(self.record_path).virtiofsd["source"].endswith("/shared")
        self.started = True
        return 999_999_998

    async def wait(self) -> int:
        await self._exit.wait()
        return 1

    def die(self) -> None:
        self._exit.set()

    def log_tail(self, lines: int = 5) -> str:
        return "fake daemon log"

    async def stop(self, timeout: float = 2.0) -> None:
        self.stopped = True
        self._exit.set()


def test_virtio_fs_daemon_starts_first_and_its_death_stops_the_vm(rig: Rig) -> None:
    rig.config.hypervisor.shared_fs = "virtio-fs"
    daemons: list[FakeVirtiofsd] = []

    def new_virtiofsd(binary: str, source: Path, sock: Path, log: Path, die: bool) -> FakeVirtiofsd:
        assert sock == source.parent / "virtiofs.sock" and not rig.vms  # before the VM
        daemons.append(FakeVirtiofsd(source.parent))
        return daemons[-1]

    rig.parts.new_virtiofsd = new_virtiofsd  # type: ignore[assignment]

    async def go() -> None:
        sb = rig.sandbox(sandbox_id="pod6")
        await sb.start()
        (d,) = daemons
        assert d.started and len(d.pre_exec) == 1  # joins the sandbox cgroup
        assert rig.vms[0].spec.shared_fs == "virtio-fs"
        assert SandboxRecord.load(sb.run_dir).virtiofsd["pid"] == 999_999_998
        assert rig.mounts.mounted[str(sb.shared_dir)] == str(sb.run_dir / "mounts")
        d.die()  # the guest lost its files: the VM is stopped
        assert await asyncio.wait_for(sb.wait_vm(), 1) == 0
        await sb.destroy()
        assert d.stopped and not sb.run_dir.exists() and rig.mounts.mounted == {}

    run(go())
