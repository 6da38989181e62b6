"""A VM template: one pod VM booted to "agent ready" and saved, for pods to restore.

The template VM's RAM is a file in the template's directory (on a tmpfs), mapped
shared, so that all its guest memory is in the file; its device state is saved by
migration to ``state`` with ``x-ignore-shared`` (the RAM is not copied again). A clone
starts QEMU with the same command line and ``-incoming`` from ``state``, with that RAM
file mapped:

- private copy-on-write with 9p: clones share the template's pages until they write
  them (the memory saving);
- with virtio-fs, vhost-user needs guest memory the daemon can map, so a clone gets its
  own copy of the file in a memfd (``copy_sparse``: only the pages the template
  touched), mapped shared; and since QEMU cannot migrate a vhost-user-fs device, the
  template has none: the clone hot-adds it once it runs.

The template has no NIC either (clones hot-add theirs, with their own MACs). Whatever
decides the command line is the template's key (``template_key``): the hypervisor's
command line of the template with its paths made neutral, and the identity of the
QEMU binary, kernel and initrd files. A changed image or configuration is a new key,
so a new template; the store keeps the ``MAX_TEMPLATES`` used last.

What a clone must do before anything else (the sandbox does it): reseed the guest's
CRNG from host bytes and set its clock (the agent's ReseedRandomDev and
SetGuestDateTime). The template's agent has never been asked for its boot_id, which
the kernel makes on first read: each clone reads its own, after the reseed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from carapace.agent.client import AgentClient
from carapace.errors import CarapaceError, HypervisorError
from carapace.guest import ALL_MODULES_PARAM
from carapace.hypervisor import VM, VMSpec
from carapace.protocols.contract import SHARED_FS_VIRTIOFS

log = logging.getLogger("carapace.factory")

#: Templates kept in the store: building one more removes the one used longest ago.
MAX_TEMPLATES = 4
#: The format of a template's directory; a change makes every older template unknown.
TEMPLATE_FORMAT = 1
#: The file in a template's directory that says it is complete (written last).
INFO = "template.json"


@dataclass(frozen=True)
class Template:
    """A complete template in its directory."""

    dir: Path
    key: str

    @property
    def memory_file(self) -> Path:
        return self.dir / "memory"

    @property
    def state_file(self) -> Path:
        return self.dir / "state"

    @property
    def info_file(self) -> Path:
        return self.dir / INFO

    def info(self) -> dict[str, object]:
        data = json.loads(self.info_file.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{self.info_file}: not a JSON object")
        return data


def loading_all_modules(kernel_params: str) -> str:
    """``kernel_params`` plus the one that makes the agent load every kernel module it
    would load on demand: a template's clones then find them loaded (a clone has the
    template's command line, so it asks the same)."""
    params = kernel_params.split()
    return " ".join(params if ALL_MODULES_PARAM in params else [*params, ALL_MODULES_PARAM])


def template_spec(spec: VMSpec, run_dir: Path, memory_file: Path) -> VMSpec:
    """The VM a template for pods like ``spec`` is built from: the same machine with
    no NIC and no virtio-fs device (clones hot-add theirs), RAM in ``memory_file``,
    every on-demand kernel module loaded."""
    return dataclasses.replace(
        spec,
        name="template",
        kernel_params=loading_all_modules(spec.kernel_params),
        run_dir=run_dir,
        shared_dir=run_dir / "shared",
        nics=(),
        memory_file=memory_file,
        memory_file_shared=True,
        memory_fd=None,
        incoming=None,
        hotplug_share=spec.shared_fs == SHARED_FS_VIRTIOFS,
        extra_args=(),
    )


def clone_spec(spec: VMSpec, template: Template, memory_fd: int | None = None) -> VMSpec:
    """``spec`` restored from ``template``: no boot NIC (hot-added once it runs), the
    template's RAM (its own copy in ``memory_fd`` for virtio-fs, else the template's
    file, private), and the template's state as the incoming migration."""
    virtiofs = spec.shared_fs == SHARED_FS_VIRTIOFS
    if virtiofs != (memory_fd is not None):
        raise ValueError("a virtio-fs clone needs a memfd copy of the template's RAM, 9p none")
    memory_file = template.memory_file if memory_fd is None else Path(f"/proc/self/fd/{memory_fd}")
    return dataclasses.replace(
        spec,
        kernel_params=loading_all_modules(spec.kernel_params),
        nics=(),
        memory_file=memory_file,
        memory_file_shared=virtiofs,
        memory_fd=memory_fd,
        incoming=template.state_file,
        hotplug_share=virtiofs,
    )


def file_identity(path: str | Path) -> dict[str, object]:
    """What tells one version of a file from another without reading it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return {
        "path": real,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "dev": st.st_dev,
    }


def template_key(
    binary: str,
    spec: VMSpec,
    command_line: Callable[[str, VMSpec], list[str]],
    identity: Callable[[str | Path], dict[str, object]] = file_identity,
) -> tuple[str, dict[str, object]]:
    """(key, the inputs it is the digest of) of the template for pods like ``spec``:
    the template's command line with neutral paths, and the files it starts from."""
    neutral = Path("/template")
    vm = template_spec(spec, neutral / "build", neutral / "memory")
    return command_line_key(binary, vm, command_line, TEMPLATE_FORMAT, identity)


def command_line_key(
    binary: str,
    vm: VMSpec,
    command_line: Callable[[str, VMSpec], list[str]],
    kind: object,
    identity: Callable[[str | Path], dict[str, object]] = file_identity,
) -> tuple[str, dict[str, object]]:
    """(key, the inputs it is the digest of) of the VM ``vm`` (its paths made neutral
    by the caller): its QEMU command line, the identity of the QEMU binary, kernel and
    initrd it starts from, and ``kind`` (what the key is for, and its format)."""
    argv = command_line(binary, vm)
    inputs: dict[str, object] = {
        "format": kind,
        "argv": argv[1:],
        "qemu": identity(binary),
        "kernel": identity(vm.kernel),
        "initrd": identity(vm.initrd),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:24], inputs


def copy_sparse(src: Path, dst_fd: int) -> int:
    """Copy ``src`` into ``dst_fd`` (sized like it), only its data: holes stay holes
    (a template's RAM file holds only the pages its guest touched). Returns the bytes
    copied."""
    copied = 0
    with open(src, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        os.ftruncate(dst_fd, size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after offset
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            pos = start
            while pos < end:
                n = _copy_range(fd, dst_fd, pos, end - pos)
                if n == 0:
                    raise OSError(errno.EIO, f"{src}: short read at {pos}")
                pos += n
            copied += end - start
            offset = end
    return copied


#: Bytes one read/write of ``copy_sparse`` moves.
COPY_CHUNK = 4 << 20


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    data = os.pread(src_fd, min(length, COPY_CHUNK), offset)
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(dst_fd, view[written:], offset + written)
    return len(data)


class TemplateStore:
    """The templates of one directory: found by key, built under a lock per key, the
    oldest removed beyond ``MAX_TEMPLATES``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find(self, key: str) -> Template | None:
        t = Template(self.root / key, key)
        try:
            info = t.info()
        except (OSError, ValueError):
            return None
        if info.get("key") != key or not t.memory_file.is_file() or not t.state_file.is_file():
            return None
        return t

    def templates(self) -> list[Template]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(self.root)):
                t = self.find(entry)
                if t is not None:
                    found.append(t)
        return found

    def remove(self, t: Template) -> None:
        """Remove a template (its lock file stays: a process may be waiting on it)."""
        shutil.rmtree(t.dir, ignore_errors=True)

    def remove_all(self) -> int:
        """Remove every template, anything half-made and the lock files: what the store
        made, never another file of the directory (which may be /dev/shm itself);
        returns how many templates."""
        templates = self.templates()
        for t in templates:
            self.remove(t)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.root):
                path = self.root / name
                if name.endswith(".building") and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif name.endswith(".lock") and path.is_file():
                    path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only when empty
        return len(templates)

    async def get(
        self,
        key: str,
        inputs: dict[str, object],
        build: Callable[[Path], Awaitable[None]],
    ) -> tuple[Template, bool]:
        """The template ``key``: the one in the store, else built now by ``build`` (into
        a directory of its own, made complete by a rename); (template, whether built).
        Only one process builds a key at a time; the others wait for it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            found = self.find(key)
            if found is not None:
                os.utime(found.info_file)  # used now: kept longest
                return found, False
            work = self.root / f"{key}.building"
            shutil.rmtree(work, ignore_errors=True)  # a build that died half-way
            work.mkdir(mode=0o700)
            try:
                started = time.monotonic()
                await build(work)
                info = {
                    "key": key,
                    "built": time.time(),
                    "build_seconds": round(time.monotonic() - started, 3),
                    "inputs": inputs,
                }
                (work / INFO).write_text(json.dumps(info, indent=1))
                for d in ("build", "v"):
                    shutil.rmtree(work / d, ignore_errors=True)
                target = self.root / key
                shutil.rmtree(target, ignore_errors=True)
                os.rename(work, target)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            self._evict(keep=key)
            return Template(target, key), True
        finally:
            os.close(fd)

    def _evict(self, keep: str) -> None:
        others = [t for t in self.templates() if t.key != keep]
        others.sort(key=lambda t: t.info_file.stat().st_mtime)
        for t in others[: max(0, len(others) + 1 - MAX_TEMPLATES)]:
            log.info("removing template %s, used least recently", t.key)
            self.remove(t)


#: Boots a template gets before it is given up (one whose clone does not answer is
#: booted again), and how long its test clone may take to answer.
BUILD_ATTEMPTS = 3
VERIFY_TIMEOUT = 15.0


async def build_template(
    binary: str,
    spec: VMSpec,
    work: Path,
    new_vm: Callable[[str, VMSpec, bool], VM],
    connect_agent: Callable[[str], Awaitable[AgentClient]],
    boot_timeout: float,
) -> None:
    """Boot a template VM for pods like ``spec`` in ``work`` until its agent answers,
    save it there (``memory`` and ``state``), end it, and prove it: a clone restored
    from it must answer. Some saved VMs never resume (seen here under TCG: one build in
    five to one in two, and a bad one stays bad for every clone; the cause is not
    known yet): such a one is thrown away and the VM booted again, up to
    ``BUILD_ATTEMPTS`` times."""
    tspec = template_spec(spec, work / "build", work / "memory")
    vms = _TemplateVMs(binary, new_vm, connect_agent)
    why = ""
    for attempt in range(1, BUILD_ATTEMPTS + 1):
        for d in (tspec.run_dir, work / "v"):
            shutil.rmtree(d, ignore_errors=True)
        for f in (work / "memory", work / "state"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        tspec.run_dir.mkdir(mode=0o700)
        tspec.shared_dir.mkdir(mode=0o700)
        await vms.boot_and_save(tspec, work / "state", boot_timeout)
        why = await vms.resumes(tspec, work / "state")
        if not why:
            return
        log.warning("VM template in %s, boot %d: %s; booting it again", work, attempt, why)
    raise HypervisorError(f"no VM template could be made in {BUILD_ATTEMPTS} boots: {why}")


@dataclass(frozen=True)
class _TemplateVMs:
    """The VMs a template build starts: the template itself, and its test clone."""

    binary: str
    new_vm: Callable[[str, VMSpec, bool], VM]
    connect_agent: Callable[[str], Awaitable[AgentClient]]

    async def boot_and_save(self, tspec: VMSpec, state: Path, boot_timeout: float) -> None:
        vm = self.new_vm(self.binary, tspec, True)
        try:
            await vm.start()
            agent = await self.connect_agent(str(tspec.agent_socket))
            try:
                if not await agent.check(boot_timeout):
                    raise HypervisorError("the template VM's agent is not serving")
                # saved while connected: the agent waits in a read, not in its reopen loop
                await vm.save_state(state)
            finally:
                await agent.close()
        except BaseException as e:
            vm.kill()
            with contextlib.suppress(Exception):
                await vm.stop(1)
            if isinstance(e, Exception) and not isinstance(e, HypervisorError):
                raise HypervisorError(
                    f"building a VM template failed: {e}; console tail:\n{vm.console_tail(10)}"
                ) from e
            raise

    async def resumes(self, tspec: VMSpec, state: Path) -> str:
        """Why a clone of the saved template does not answer ("" when it does). The
        test clone maps the template's RAM private, whatever the pods will do: it
        changes nothing of the template."""
        run_dir = state.parent / "v"
        run_dir.mkdir(mode=0o700)
        vspec = dataclasses.replace(
            tspec, name="template-test", run_dir=run_dir, memory_file_shared=False, incoming=state
        )
        vm = self.new_vm(self.binary, vspec, True)
        try:
            await vm.start()
            await vm.wait_restored()
            agent = await self.connect_agent(str(vspec.agent_socket))
            try:
                await agent.check(VERIFY_TIMEOUT)
            finally:
                await agent.close()
            return ""
        except CarapaceError as e:
            return f"a clone restored from it does not answer ({e})"
        finally:
            vm.kill()
            with contextlib.suppress(Exception):
                await vm.stop(1)
