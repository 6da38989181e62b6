"""A sandbox's persisted state (run_dir/state.json) and cleaning what a dead owner left.

Every resource is recorded here before it is created, so a later process (`carapace
gc`, a shim's delete) can find and release it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from carapace import linux
from carapace.errors import CarapaceError, StateError
from carapace.hostcgroup import CgroupHandle
from carapace.network.tcfilter import teardown
from carapace.protocols.contract import ID_RE, is_pool_vm_name, vm_name
from carapace.storage.virtiofsd import kill_daemons

STATE_FILE = "state.json"


class Runstate(StrEnum):
    """Where a sandbox is in its life."""

    CREATED = "created"  # planned; its run dir, cgroups and VM are being made
    RUNNING = "running"  # the VM is up and its agent answered
    STOPPED = "stopped"  # the VM is gone; what it held is being released
    DELETED = "deleted"  # everything released


#: The moves a sandbox may make; any other is a bug.
TRANSITIONS: dict[Runstate, frozenset[Runstate]] = {
    Runstate.CREATED: frozenset({Runstate.RUNNING, Runstate.STOPPED, Runstate.DELETED}),
    Runstate.RUNNING: frozenset({Runstate.STOPPED, Runstate.DELETED}),
    Runstate.STOPPED: frozenset({Runstate.DELETED}),
    Runstate.DELETED: frozenset(),
}


def check_transition(current: Runstate, new: Runstate, what: str) -> None:
    if new not in TRANSITIONS[current]:
        raise StateError(
            f"{what}: cannot go from state {current.value} to {new.value}; from "
            f"{current.value}: {', '.join(s.value for s in TRANSITIONS[current]) or 'none'}"
        )


class Guarded(Protocol):
    def require(self, what: str, *states: Runstate) -> None:
        """Raise StateError unless in one of ``states``."""


G = TypeVar("G", bound=Guarded)
P = ParamSpec("P")
T = TypeVar("T")


def requires(
    *states: Runstate,
) -> Callable[
    [Callable[Concatenate[G, P], Coroutine[Any, Any, T]]],
    Callable[Concatenate[G, P], Coroutine[Any, Any, T]],
]:
    """Refuse a call unless the object is in one of ``states`` (a StateError naming
    the state it is in and the ones the call needs)."""

    def wrap(
        fn: Callable[Concatenate[G, P], Coroutine[Any, Any, T]],
    ) -> Callable[Concatenate[G, P], Coroutine[Any, Any, T]]:
        async def guarded(self: G, /, *args: P.args, **kwargs: P.kwargs) -> T:
            self.require(fn.__name__, *states)
            return await fn(self, *args, **kwargs)

        functools.update_wrapper(guarded, fn)
        return guarded

    return wrap


def _runstate(value: object) -> Runstate:
    if value == "creating":  # records written before the states had names
        return Runstate.CREATED
    try:
        return Runstate(str(value))
    except ValueError:
        raise ValueError(
            f"state {value!r}; accepted: {', '.join(s.value for s in Runstate)}"
        ) from None


@dataclass
class SandboxRecord:
    id: str
    run_dir: str
    state: Runstate = Runstate.CREATED
    owner_pid: int = field(default_factory=os.getpid)
    created_at: float = field(default_factory=time.time)
    qemu_pid: int = 0
    #: The name QEMU runs under when it is not the sandbox's own (a VM taken from a
    #: pool: ``factory.pool.pool_vm_name``); "" for ``vm_name(id)``.
    qemu_name: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    accel: str = ""
    mounts: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    #: The host cgroup directories made for the sandbox (CgroupHandle.to_record()).
    cgroup: dict[str, Any] = field(default_factory=dict)
    #: Other host cgroups made for it, removed in this order after ``cgroup``.
    more_cgroups: list[dict[str, Any]] = field(default_factory=list)
    #: What carapace made in the pod's network namespace (``netns``, ``taps``, the
    #: ``veths`` it redirected) and the VM's NIC of each guest interface (``nics``).
    network: dict[str, Any] = field(default_factory=dict)
    #: The pod's virtio-fs daemon: the share it serves (``source``), its ``socket``,
    #: and its ``pid`` once it runs.
    virtiofsd: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / STATE_FILE

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, run_dir: Path) -> SandboxRecord:
        data = json.loads((run_dir / STATE_FILE).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "state" in known:
            known["state"] = _runstate(known["state"])
        return cls(**known)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _is_our_qemu(pid: int, name: str) -> bool:
    """Whether process ``pid`` is a QEMU named ``name`` (its ``-name``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(a.startswith(f"{name},".encode()) for a in argv)


def release(record: SandboxRecord, run_root: Path | str, kill_wait: float = 5.0) -> list[str]:
    """Release everything the record lists: the QEMU process (only if it is really that
    sandbox's), mounts, the host cgroups it made, the run dir. Returns what could not be
    released. A record is read from a file a dead owner (or anyone) left: its run dir
    must be ``run_root/<its id>`` and its mounts must lie in it, or nothing is touched.
    Callers that race (containerd cleans up every task of a dead shim at once) take
    turns on a lock of the run dir; the later one finds it gone."""
    bad = check_record(record, Path(run_root))
    if bad:
        return [bad]
    try:
        fd = os.open(record.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.exists(record.run_dir):
            return []
        return _release(record, kill_wait)
    finally:
        os.close(fd)


def check_record(record: SandboxRecord, run_root: Path) -> str:
    """Why a record must not be acted on ('' when it may): its run dir is not
    ``run_root/<id>`` (a planted ``../``), or a mount it lists is outside that."""
    if not isinstance(record.id, str) or not ID_RE.fullmatch(record.id):
        return f"state record with id {str(record.id)[:80]!r}: not a sandbox id; left alone"
    expected = os.path.join(os.path.realpath(run_root), record.id)
    if not isinstance(record.run_dir, str) or os.path.normpath(record.run_dir) != expected:
        return (
            f"state record of {record.id}: run dir {str(record.run_dir)[:200]!r} is not "
            f"{expected}; left alone"
        )
    for m in record.mounts:
        if not isinstance(m, str) or not os.path.normpath(m).startswith(expected + "/"):
            return (
                f"state record of {record.id}: mount {str(m)[:200]!r} is outside {expected}; "
                "left alone"
            )
    return ""


def _release(record: SandboxRecord, kill_wait: float) -> list[str]:
    problems: list[str] = []
    name = record.qemu_name if is_pool_vm_name(record.qemu_name) else vm_name(record.id)
    if record.qemu_pid and pid_alive(record.qemu_pid) and _is_our_qemu(record.qemu_pid, name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.qemu_pid, signal.SIGKILL)
        deadline = time.monotonic() + kill_wait
        while pid_alive(record.qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(record.qemu_pid):
            problems.append(f"QEMU pid {record.qemu_pid} did not die")
    if record.virtiofsd.get("source"):
        left = kill_daemons(Path(record.virtiofsd["source"]), kill_wait)
        if left:
            problems.append(f"virtiofsd {', '.join(map(str, left))} did not die")
    for m in reversed(record.mounts):
        try:
            if linux.is_mountpoint(m):
                linux.umount(m, lazy=True)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):  # unmounted meanwhile
                problems.append(str(e))
    # anything else mounted in the run dir (a mount not recorded, a propagated copy)
    for m in linux.mounts_under(record.run_dir) if not problems else []:
        try:
            linux.umount(m, lazy=True)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                problems.append(str(e))
    still = linux.mounts_under(record.run_dir) if not problems else []
    if still:
        problems.append(f"mounts left in {record.run_dir}: {', '.join(still)}")
    net = record.network
    if net.get("taps") and not problems:
        try:
            teardown(
                net["netns"], [t["tap"] for t in net["taps"]], [t["veth"] for t in net["taps"]]
            )
            record.network = {}
        except CarapaceError as e:
            problems.append(str(e))
    for cg in [record.cgroup, *record.more_cgroups] if not problems else []:
        if not cg:
            continue
        try:
            CgroupHandle.from_record(cg).remove()
        except CarapaceError as e:
            problems.append(str(e))
    if not problems:
        record.cgroup, record.more_cgroups = {}, []
    if not problems:
        shutil.rmtree(record.run_dir, ignore_errors=True)
        if os.path.exists(record.run_dir):
            problems.append(f"run dir {record.run_dir} could not be removed")
    return problems


def stale_sandboxes(run_root: Path) -> list[SandboxRecord]:
    """Sandboxes under ``run_root`` whose owner process is gone."""
    out: list[SandboxRecord] = []
    if not run_root.is_dir():
        return out
    for d in sorted(run_root.iterdir()):
        try:
            rec = SandboxRecord.load(d)
        except (OSError, ValueError, TypeError):
            continue
        if not pid_alive(rec.owner_pid):
            out.append(rec)
    return out
