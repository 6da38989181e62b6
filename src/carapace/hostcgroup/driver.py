"""Host cgroup drivers: cgroup v1 (one hierarchy per controller) and v2 (unified).

A cgroup is named by a path relative to the hierarchy root ("carapace/<sandbox-id>").
``driver().create(path, controllers)`` makes it and returns a ``CgroupHandle`` that
remembers exactly which directories it created, so that ``remove()`` (or another
process, through ``to_record()``/``CgroupHandle.from_record()``) deletes those and
never one it found.

Controller names are accepted in either version's spelling: 'blkio' and 'io' are
the same controller, and on v2 'cpuacct' is 'cpu'. On v1, asking for 'cpu' also
places the cgroup in the cpuacct hierarchy when there is one (the CPU usage of
``stats()`` comes from cpuacct.usage; v2 reports it in cpu.stat).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from carapace.errors import HostError, InvalidArgument
from carapace.protocols.contract import VCPU_CGROUP

from . import files
from .blkio import BlkioResult, ResolvedBlkioItem, active_schedulers, blkio_writes
from .files import Version
from .fs import CgroupFs, CgroupGone

DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_THREAD_CHILD = VCPU_CGROUP
_POLL_S = 0.01
#: Attempts at creating a path whose shared parent another owner may be removing (each
#: one fails only if a removal lands in the few system calls between two of ours).
_CREATE_ATTEMPTS = 10


def detect(root: str = DEFAULT_ROOT) -> Version:
    """'v2' if ``root`` is a unified hierarchy (has cgroup.controllers), 'v1' if it holds
    per-controller hierarchies, HostError otherwise."""
    if os.path.isfile(os.path.join(root, "cgroup.controllers")):
        return "v2"
    try:
        entries = os.listdir(root)
    except OSError as exc:
        raise HostError(f"cannot read cgroup root {root}: {exc.strerror}") from None
    for name in entries:
        if os.path.isfile(os.path.join(root, name, "cgroup.procs")) and not name.startswith(
            ("unified", "name=")
        ):
            return "v1"
    raise HostError(
        f"{root} is neither a cgroup v2 mount (no cgroup.controllers) nor a directory of "
        "cgroup v1 hierarchies (no <controller>/cgroup.procs): is cgroupfs mounted?"
    )


def driver(root: str | None = None, fs: CgroupFs | None = None) -> CgroupDriver:
    """The driver for the hierarchy at ``root`` (default /sys/fs/cgroup)."""
    root = root or DEFAULT_ROOT
    return CgroupDriver.for_version(detect(root), root, fs)


def check_relative_path(path: str, what: str = "cgroup path") -> str:
    """A cgroup path below the root: relative, no '.', '..' or empty component."""
    parts = path.split("/")
    if (
        path == ""
        or path.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\x00" in path
        or "\n" in path
    ):
        raise InvalidArgument(
            f"{what} {path!r} must be relative to the hierarchy root, like "
            "'carapace/<sandbox-id>' (no leading '/', no '.', '..' or empty component)"
        )
    return path


def _is_under(root: str, path: str) -> bool:
    root = posixpath.normpath(root)
    path_n = posixpath.normpath(path)
    return path == path_n and path_n != root and path_n.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class CgroupStats:
    """What the host cgroup reports; None where the controller is not there."""

    cpu_usage_ns: int | None
    memory_bytes: int | None
    pids: int | None


class CgroupHandle:
    """One cgroup made by a driver. ``dirs`` maps each controller to its directory
    (on v2 all the same); ``created`` lists the directories this handle made, in the
    order it made them."""

    def __init__(
        self,
        drv: CgroupDriver,
        path: str,
        dirs: dict[str, str],
        created: list[str],
        children: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.driver = drv
        self.path = path
        self.dirs = dirs
        self.created = created
        self.children: dict[str, dict[str, str]] = children or {}

    @property
    def version(self) -> Version:
        return self.driver.version

    @property
    def controllers(self) -> list[str]:
        return sorted(c for c in self.dirs if c)

    def leaves(self) -> list[str]:
        """The cgroup's directory in each hierarchy (one on v2)."""
        return sorted(set(self.dirs.values()))

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes itself into (one per hierarchy)."""
        return [os.path.join(d, files.procs_file()) for d in self.leaves()]

    def preexec_fn(self) -> Callable[[], None]:
        """A function for subprocess's ``preexec_fn``: the child writes itself ('0' is
        the writer) into every hierarchy before exec, so nothing it runs escapes."""
        paths = [p.encode() for p in self.procs_files()]

        def join_self() -> None:
            for p in paths:
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)

        return join_self

    def join(self, pid: int, move_memory: bool = False) -> None:
        """Move process ``pid`` (all its threads) into the cgroup. ``move_memory``: its
        memory is charged here from now on (cgroup v1 leaves the pages a process had
        charged where they were unless memory.move_charge_at_immigrate says so; v2
        never moves them)."""
        memory_dir = self.dirs.get("memory")
        if move_memory and self.version == "v1" and memory_dir is not None:
            knob = os.path.join(memory_dir, "memory.move_charge_at_immigrate")
            if self.driver.fs.exists(knob):
                # anonymous and file pages; newer kernels refuse it (deprecated): then
                # only what the process allocates from now on is charged here
                with contextlib.suppress(HostError):
                    self.driver.fs.write(knob, "3")
        for p in self.procs_files():
            self.driver.fs.write(p, str(pid))

    def origin(self, pid: int) -> list[str]:
        """The directories ``pid`` is in now, in this handle's hierarchies (to move it
        back there with ``move_to`` before the cgroup is removed)."""
        text = self.driver.fs.read(f"/proc/{pid}/cgroup")
        return self.driver.member_dirs(parse_proc_cgroup(text), self.controllers)

    def move_to(self, pid: int, directories: Iterable[str]) -> None:
        """Move ``pid`` (all its threads) into ``directories`` (from ``origin``)."""
        for d in directories:
            self.driver.fs.write(os.path.join(d, files.procs_file()), str(pid))

    def pids(self) -> set[int]:
        """Processes in the cgroup (any hierarchy), with those of its thread children."""
        found: set[int] = set()
        for d in self.leaves() + [d for c in self.children.values() for d in c.values()]:
            found.update(int(x) for x in self._members(d, files.procs_file()))
        return found

    def _members(self, directory: str, name: str) -> list[str]:
        """The ids listed in a membership file; none if it is gone or unreadable (a
        v2 threaded cgroup refuses reads of cgroup.procs)."""
        path = os.path.join(directory, name)
        try:
            return self.driver.fs.read(path).split() if self.driver.fs.exists(path) else []
        except HostError:
            return []

    def add_threads(self, tids: Iterable[int], child: str = DEFAULT_THREAD_CHILD) -> None:
        """Move single threads (vCPUs) into the child cgroup ``child``: v1 writes each
        tid to <cg>/<child>/tasks of the cpu, cpuacct and cpuset hierarchies; v2 makes
        <cg>/<child> a threaded cgroup and writes to its cgroup.threads."""
        self.driver.add_threads(self, list(tids), check_relative_path(child, "child name"))

    def thread_child_dirs(self, child: str = DEFAULT_THREAD_CHILD) -> list[str]:
        """The directories ``add_threads(..., child)`` makes, parents first (to be
        recorded before they exist)."""
        parts = check_relative_path(child, "child name").split("/")
        if self.version == "v1":
            tops = {d for c, d in self.dirs.items() if c in files.THREADED_CONTROLLERS_V1}
        else:
            tops = set(self.leaves()[:1])
        return [os.path.join(t, *parts[: i + 1]) for t in sorted(tops) for i in range(len(parts))]

    def place_threads(self, tids: Iterable[int]) -> None:
        """Move single threads into this cgroup itself (v1: its ``tasks`` in the cpu,
        cpuacct and cpuset hierarchies), leaving the rest of their process where it is.
        cgroup v2 cannot: a thread stays in its process's domain."""
        if self.version != "v1":
            raise HostError(
                f"cgroup {self.path}: cgroup v2 cannot place single threads outside their "
                "process's cgroup (sandbox_cgroup_only = false needs cgroup v1)"
            )
        dirs = {d for c, d in self.dirs.items() if c in files.THREADED_CONTROLLERS_V1}
        for d in sorted(dirs):
            for tid in tids:
                self.driver.fs.write(os.path.join(d, files.threads_file("v1")), str(tid))

    def set_cpu_limit(
        self,
        cpus: float | None,
        period_us: int = files.DEFAULT_CFS_PERIOD_US,
        child: str | None = None,
    ) -> None:
        """Limit CPU bandwidth to ``cpus`` CPUs (None lifts the limit), on the cgroup or
        on its thread child ``child``."""
        writes = files.cpu_limit_writes(self.version, cpus, period_us)
        directory = self._dir("cpu", child)
        for name, value in writes:
            self.driver.fs.write(os.path.join(directory, name), value)

    def set_memory_limit(self, limit_bytes: int | None) -> None:
        """Limit memory to ``limit_bytes`` (None lifts the limit)."""
        writes = files.memory_limit_writes(self.version, limit_bytes)
        directory = self._dir("memory")
        for name, value in writes:
            self.driver.fs.write(os.path.join(directory, name), value)

    def set_blkio(self, items: Sequence[ResolvedBlkioItem], sys_root: str = "/sys") -> BlkioResult:
        """Apply block I/O limits. Limits whose file this host lacks (weights without
        BFQ/CFQ) come back in ``unapplied`` with the reason, weights written for a
        scheduler no device uses in ``warnings``: report both."""
        directory = self._dir("io" if self.version == "v2" else "blkio")
        existing = set(self.driver.fs.listdir(directory))
        plan = blkio_writes(self.version, items, existing, active_schedulers(sys_root))
        for w in plan.applied:
            self.driver.fs.write(os.path.join(directory, w.file), w.line)
        return plan

    def stats(self) -> CgroupStats:
        """CPU time, memory in use and process count, each where its controller is."""
        fs = self.driver.fs
        controller, cpu_file = files.cpu_usage_file(self.version)
        cpu_dir = self.dirs.get(controller) or (self.leaves()[0] if self.version == "v2" else None)
        cpu: int | None = None
        if cpu_dir and fs.exists(os.path.join(cpu_dir, cpu_file)):
            cpu = files.parse_cpu_usage_ns(self.version, fs.read(os.path.join(cpu_dir, cpu_file)))
        mem = self._counter("memory", files.memory_usage_file(self.version))
        pids = self._counter("pids", "pids.current")
        return CgroupStats(cpu, mem, pids)

    def _counter(self, controller: str, name: str) -> int | None:
        d = self.dirs.get(controller)
        if d is None or not self.driver.fs.exists(os.path.join(d, name)):
            return None
        return files.parse_counter(self.driver.fs.read(os.path.join(d, name)))

    def _dir(self, controller: str, child: str | None = None) -> str:
        if child is not None:
            check_relative_path(child, "child name")
            if child not in self.children:
                raise HostError(
                    f"cgroup {self.path} has no thread child {child!r} "
                    f"(children: {sorted(self.children) or 'none'}): add_threads creates it"
                )
            dirs = self.children[child]
        else:
            dirs = self.dirs
        if controller not in dirs:
            raise HostError(
                f"cgroup {self.path}{'/' + child if child else ''} was not created with the "
                f"{controller} controller (it has: {', '.join(sorted(dirs)) or 'none'})"
            )
        return dirs[controller]

    def remove(self, timeout: float = 5.0) -> None:
        """Remove the directories this handle created, deepest first, waiting up to
        ``timeout`` seconds for exiting processes to leave. A created ancestor that
        now holds another owner's cgroups is left to that owner. Raises HostError
        naming each directory that could not be removed (the handle keeps them, so
        remove() can be called again)."""
        fs = self.driver.fs
        deadline = time.monotonic() + timeout
        own = set(self.leaves()) | {d for c in self.children.values() for d in c.values()}
        failures: list[str] = []
        left: list[str] = []
        for d in sorted(self.created, key=lambda p: p.count("/"), reverse=True):
            while fs.isdir(d):
                try:
                    fs.rmdir(d)
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        break  # a shared parent its other owner removed meanwhile
                    subdirs = fs.subdirs(d)
                    if any(os.path.join(d, s) in left for s in subdirs):
                        left.append(d)  # below it is one of ours that could not go
                        break
                    if subdirs and d not in own:
                        break  # a shared ancestor, now in use by another owner's cgroup
                    if exc.errno == errno.EBUSY and not subdirs and time.monotonic() < deadline:
                        time.sleep(_POLL_S)  # processes still leaving
                        continue
                    failures.append(self._why_busy(d, exc, subdirs))
                    left.append(d)
                    break
        self.created = [d for d in self.created if d in left]
        if failures:
            raise HostError("cannot remove cgroup directories: " + "; ".join(failures))

    def _why_busy(self, d: str, exc: OSError, others: list[str]) -> str:
        for name, what in (
            (files.procs_file(), "processes"),
            (files.threads_file(self.version), "threads"),
        ):
            members = self._members(d, name)
            if members:
                return f"{d} still holds {what} {', '.join(members)} (kill them first)"
        if others:
            return f"{d} holds cgroups it did not create: {', '.join(sorted(others))}"
        return f"{d}: {exc.strerror}"

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description from which ``from_record`` rebuilds the handle."""
        return {
            "version": self.version,
            "root": self.driver.root,
            "path": self.path,
            "dirs": dict(self.dirs),
            "children": {k: dict(v) for k, v in self.children.items()},
            "created": list(self.created),
        }

    @staticmethod
    def from_record(record: object, fs: CgroupFs | None = None) -> CgroupHandle:
        """Rebuild a handle (e.g. to remove a crashed owner's cgroup). Every directory
        in the record must lie below its root: a damaged record cannot make remove()
        touch anything else."""

        def bad(why: str) -> InvalidArgument:
            return InvalidArgument(f"cgroup record {record!r} is not usable: {why}")

        if not isinstance(record, dict):
            raise bad("not an object")
        version, root, path = record.get("version"), record.get("root"), record.get("path")
        dirs, children, created = (
            record.get("dirs"),
            record.get("children", {}),
            record.get("created"),
        )
        if version not in ("v1", "v2"):
            raise bad("'version' must be 'v1' or 'v2'")
        if not isinstance(root, str) or not root.startswith("/"):
            raise bad("'root' must be an absolute path")
        if not isinstance(path, str):
            raise bad("'path' must be a string")
        check_relative_path(path)

        def str_map(value: object, what: str) -> dict[str, str]:
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and _is_under(root, v)
                for k, v in value.items()
            ):
                raise bad(f"'{what}' must map controllers to directories below {root}")
            return dict(value)

        dirs_map = str_map(dirs, "dirs")
        if not isinstance(children, dict):
            raise bad("'children' must be an object")
        children_map = {str(k): str_map(v, f"children.{k}") for k, v in children.items()}
        if not isinstance(created, list) or not all(
            isinstance(c, str) and _is_under(root, c) for c in created
        ):
            raise bad(f"'created' must list directories below {root}")
        drv = CgroupDriver.for_version(version, root, fs)
        return CgroupHandle(drv, path, dirs_map, list(created), children_map)


class CgroupDriver(ABC):
    """Creates cgroups in one hierarchy layout. ``fs`` is the host layer (tests pass a
    kernel-like fake for a temporary tree)."""

    version: Version

    def __init__(self, root: str = DEFAULT_ROOT, fs: CgroupFs | None = None) -> None:
        self.root = root.rstrip("/") or "/"
        self.fs = fs or CgroupFs()

    @staticmethod
    def for_version(version: Version, root: str, fs: CgroupFs | None = None) -> CgroupDriver:
        """The driver of ``version`` (its class is in ``v1``/``v2``, which the package
        imports, so that this module needs neither)."""
        for cls in CgroupDriver.__subclasses__():
            if getattr(cls, "version", None) == version:
                return cls(root, fs)
        raise HostError(f"no cgroup driver for version {version!r}; accepted: v1, v2")

    @abstractmethod
    def create(self, path: str, controllers: Iterable[str], own_parents: int = 0) -> CgroupHandle:
        """Create cgroup ``path`` with ``controllers``; the handle records what it made.
        On failure whatever this call made is removed again. ``own_parents``: the first
        components of ``path`` are the runtime's own (e.g. ``carapace``): the handle
        counts them as made even when another handle made them, so whichever removes
        the last cgroup in them removes them too."""

    @abstractmethod
    def add_threads(self, handle: CgroupHandle, tids: list[int], child: str) -> None: ...

    @abstractmethod
    def member_dirs(self, where: dict[str, str], controllers: Iterable[str]) -> list[str]:
        """The directories named by a parsed /proc/PID/cgroup for ``controllers``."""

    def _mkdirs(self, top: str, rel: str, created: list[str], own: int = 0) -> list[str]:
        """mkdir each component of ``rel`` below ``top``, top-down, appending the ones
        made (and the first ``own`` ones, made or found) to ``created``; returns the
        chain of directories. Retries when a shared parent vanishes under us (its
        creator removing it)."""
        for attempt in range(_CREATE_ATTEMPTS):
            chain: list[str] = []
            current = top
            try:
                for i, part in enumerate(rel.split("/")):
                    current = os.path.join(current, part)
                    self._before_mkdir(os.path.dirname(current))
                    made = self.fs.mkdir(current)
                    if (made or i < own) and current not in created:
                        created.append(current)
                    if made:
                        self._after_mkdir(current)
                    chain.append(current)
                return chain
            except (CgroupGone, FileNotFoundError) as exc:
                # a parent went (or is going) away under us: its other owner removed it
                # as we came down (on v2 also while we enabled controllers in it)
                if attempt == _CREATE_ATTEMPTS - 1 or not self.fs.isdir(top):
                    why = exc.strerror if isinstance(exc, OSError) else str(exc)
                    raise HostError(
                        f"cannot create cgroup {current}: a parent was removed under us "
                        f"{attempt + 1} times (by another owner, concurrently); last: {why}"
                    ) from None
            except OSError as exc:
                raise HostError(f"cannot create cgroup {current}: {exc.strerror}") from None
        raise AssertionError("unreachable")

    def _before_mkdir(self, parent: str) -> None:
        """Hook: prepare ``parent`` before a child is made in it (v2 enables controllers)."""
        return None

    def _after_mkdir(self, directory: str) -> None:
        """Hook: initialise a directory this driver just made."""
        return None

    def _undo(self, created: list[str]) -> None:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                self.fs.rmdir(d)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup as {controller: path}; v2's unified line is under ""."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for name in parts[1].split(","):
            out[name] = parts[2]
    return out
