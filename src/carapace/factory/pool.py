"""A pool of pre-booted pod VMs (Kata's VMCache): VMs booted ahead, each taken by one pod.

``carapace factory pool`` runs ``VMPool``: it keeps ``size`` VMs of the configuration's
default pod shape booted to "agent ready" and serves them on a unix socket (the
configuration's ``[factory] vm_cache_endpoint``, mode 0600). A pod whose VM would have
the pool's key (``pool_key``: the same command line but for paths, the same QEMU,
kernel and initrd) asks for one (``take``); the pool hands it over and boots another.

A pool VM has the shape a VM template has (``pool_vm_spec``): no NIC and no virtio-fs
device (the pod hot-adds its own), free PCIe root ports for them, every on-demand
kernel module loaded. What a handover moves:

- the VM's agent and QMP socket files, renamed into the pod's run dir (the pool closes
  its QMP connection first; QEMU accepts the pod's);
- over the socket (SCM_RIGHTS): a pidfd of QEMU (the pod signals and waits through
  it, never by a pid that could be reused), the host end of the VM's serial console,
  and the pool's connection to the agent, made as QEMU started and never used: the
  agent's first and only host, as in a pod's own boot (a second host on the agent's
  port was seen to lose its first request). The pool knows the agent is up from its
  line on the console (``AGENT_SERVING``).

The pod then joins QEMU to its host cgroups, sets its file limit, hot-adds its share
and NICs, reseeds the guest's CRNG and sets its clock, as a pod restored from a
template does. QEMU stays the pool's child (the pool reaps it when the pod ends it);
it is started without "die with the owner", so a pod's VM outlives a restart of the
pool, and the pool kills the VMs it still holds when it stops.

The protocol: one JSON line each way (``{"op": "take" or "status", ...}``, then
``{"ok": ..., ...}``), the three fds with a taken VM's answer.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from carapace.daemons import listen_unix
from carapace.errors import CarapaceError, HypervisorError, InvalidArgument
from carapace.factory.template import command_line_key, file_identity, loading_all_modules
from carapace.hypervisor import VM, VMSpec
from carapace.protocols.contract import AGENT_SERVING, SHARED_FS_VIRTIOFS, pool_vm_name

log = logging.getLogger("carapace.factory")

#: The format of a pool's key; a change makes pods and an older pool disagree.
POOL_FORMAT = "pool-1"
#: The most VMs a pool may hold.
MAX_POOL_SIZE = 64
#: The longest request or answer line.
MAX_LINE = 4096
#: How long a pod waits for the pool's answer.
TAKE_TIMEOUT = 10.0
#: How often and how far back a pool looks at a booting VM's console for the agent.
SERVING_POLL = 0.05
SERVING_LINES = 40
#: Pause before booting again after a pool VM failed to boot.
RETRY_PAUSE = 5.0


def pool_vm_spec(spec: VMSpec, run_dir: Path, name: str) -> VMSpec:
    """The VM a pool keeps for pods like ``spec`` (already without boot NICs and with
    room for a pod's): named ``name``, its sockets in ``run_dir``, no virtio-fs device
    (the pod hot-adds its own), every on-demand kernel module loaded at boot."""
    return dataclasses.replace(
        spec,
        name=name,
        run_dir=run_dir,
        shared_dir=run_dir / "shared",
        nics=(),
        hotplug_share=True,
        kernel_params=loading_all_modules(spec.kernel_params),
        extra_args=(),
    )


def why_not_pooled(spec: VMSpec) -> str | None:
    """Why pods like ``spec`` cannot take a pool VM (None: they can)."""
    if spec.shared_fs != SHARED_FS_VIRTIOFS:
        return (
            f"the pod shares files by {spec.shared_fs}, whose export QEMU fixes at start; "
            f"a pool VM takes its share by hot-adding {SHARED_FS_VIRTIOFS}"
        )
    return None


def pool_key(
    binary: str,
    spec: VMSpec,
    command_line: Callable[[str, VMSpec], list[str]],
    identity: Callable[[str | Path], dict[str, object]] = file_identity,
) -> tuple[str, dict[str, object]]:
    """(key, the inputs it is the digest of) of the pool VMs for pods like ``spec``."""
    neutral = pool_vm_spec(spec, Path("/pool/vm"), "pool")
    return command_line_key(binary, neutral, command_line, POOL_FORMAT, identity)


# -- the protocol (pure where it can be) -------------------------------------------------


def encode_line(message: dict[str, object]) -> bytes:
    data = json.dumps(message, sort_keys=True).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise ValueError(f"a pool message of {len(data)} bytes; the most is {MAX_LINE}")
    return data


def decode_line(data: bytes) -> dict[str, object]:
    """One message; raises InvalidArgument saying what was wrong."""
    if len(data) > MAX_LINE or not data.endswith(b"\n"):
        raise InvalidArgument(f"a pool message must be one JSON line of at most {MAX_LINE} bytes")
    try:
        message = json.loads(data)
    except ValueError as e:
        raise InvalidArgument(f"a pool message is not JSON: {e}") from e
    if not isinstance(message, dict):
        raise InvalidArgument(f"a pool message must be a JSON object, got {type(message).__name__}")
    return message


def socket_target(value: object, run_root: Path, what: str) -> Path:
    """Where a pod asks for one of its VM's sockets: a path in a directory of
    ``run_root`` that exists, where nothing is yet."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidArgument(f"{what}: {value!r}; accepted: an absolute path")
    path = Path(os.path.normpath(value))
    root = Path(os.path.realpath(run_root))
    parent = Path(os.path.realpath(path.parent))
    if parent.parent != root or path.name in ("", ".", ".."):
        raise InvalidArgument(f"{what}: {value!r}; accepted: a path in a pod's run dir in {root}")
    if not parent.is_dir():
        raise InvalidArgument(f"{what}: {value!r}: the pod's run dir does not exist")
    if os.path.lexists(parent / path.name):
        raise InvalidArgument(f"{what}: {value!r} exists already")
    return parent / path.name


def send_message(sock: socket.socket, message: dict[str, object], fds: list[int]) -> None:
    data = encode_line(message)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def receive_message(sock: socket.socket, max_fds: int = 3) -> tuple[dict[str, object], list[int]]:
    """One message and the fds that came with it (blocking; the caller set a timeout)."""
    data = b""
    fds: list[int] = []
    while not data.endswith(b"\n"):
        chunk, ancdata, _flags, _addr = sock.recvmsg(
            MAX_LINE, socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        )
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            break
    try:
        return decode_line(data), fds
    except InvalidArgument:
        for fd in fds:
            os.close(fd)
        raise


# -- the pod's side ----------------------------------------------------------------------


@dataclass
class Handover:
    """A pool VM handed to a pod: QEMU's pid and a pidfd of it, the host end of its
    serial console, the name QEMU runs under (its ``-name``), and the connection to
    its agent (made when QEMU started, never used by the pool)."""

    pid: int
    pidfd: int
    console: socket.socket
    vm_name: str
    agent: socket.socket

    def give(self) -> tuple[int, int, int]:
        """(pid, pidfd, console fd) for the VM object that takes them over
        (``VM.adopt``); this handover owns them no more."""
        pidfd, self.pidfd = self.pidfd, -1
        return self.pid, pidfd, self.console.detach()

    def abandon(self) -> None:
        """The pod will not use it after all: kill it and close what came with it."""
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        """Close the pod's copies (after the VM took them over, or on abandon)."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.console.close()
        self.agent.close()


def take(endpoint: Path, key: str, agent_socket: Path, qmp_socket: Path) -> Handover:
    """Ask the pool at ``endpoint`` for a VM with ``key``; raises CarapaceError saying
    why there is none (no pool, another key, none ready)."""
    request: dict[str, object] = {
        "op": "take",
        "key": key,
        "agent_socket": str(agent_socket),
        "qmp_socket": str(qmp_socket),
    }
    answer, fds = _ask(endpoint, request)
    try:
        if not answer.get("ok"):
            raise CarapaceError(f"the VM pool: {answer.get('error', 'no reason given')}")
        pid, name = answer.get("pid"), answer.get("vm_name")
        if len(fds) != 3 or not isinstance(pid, int) or not isinstance(name, str):
            raise CarapaceError(f"the VM pool answered {answer} with {len(fds)} fds; expected 3")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Handover(pid, fds[0], socket.socket(fileno=fds[1]), name, socket.socket(fileno=fds[2]))


def status(endpoint: Path) -> dict[str, object]:
    answer, fds = _ask(endpoint, {"op": "status"})
    for fd in fds:
        os.close(fd)
    return answer


def _ask(endpoint: Path, request: dict[str, object]) -> tuple[dict[str, object], list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(TAKE_TIMEOUT)
        try:
            sock.connect(str(endpoint))
            send_message(sock, request, [])
            return receive_message(sock)
        except FileNotFoundError:
            raise CarapaceError(f"no VM pool serves {endpoint}") from None
        except ConnectionRefusedError:
            raise CarapaceError(f"no VM pool serves {endpoint} (a stale socket)") from None
        except (OSError, InvalidArgument) as e:
            raise CarapaceError(f"the VM pool at {endpoint}: {e}") from e


# -- the pool ----------------------------------------------------------------------------


@dataclass
class PoolVM:
    vm: VM
    dir: Path
    #: The connection to the agent's port, made as QEMU starts (as a pod's own boot
    #: does) and handed to the pod unused: the agent's first and only host.
    agent: socket.socket | None = None


class VMPool:
    """The pool daemon: ``size`` VMs of ``base`` (see the module's doc)."""

    def __init__(
        self,
        binary: str,
        base: VMSpec,
        key: str,
        size: int,
        root: Path,
        run_root: Path,
        new_vm: Callable[[str, VMSpec, bool], VM],
        boot_timeout: float,
        pre_exec: list[Callable[[], None]] | None = None,
    ) -> None:
        if not 1 <= size <= MAX_POOL_SIZE:
            raise InvalidArgument(f"pool size {size}; accepted: 1 to {MAX_POOL_SIZE}")
        self.binary, self.base, self.key, self.size = binary, base, key, size
        self.root, self.run_root = root, run_root
        self.new_vm = new_vm
        self.boot_timeout = boot_timeout
        self.pre_exec = pre_exec or []
        self.ready: list[PoolVM] = []
        self.booting = 0
        self.taken = 0
        self.failed = 0
        #: VMs handed over: kept so that their exit is awaited (QEMU is our child)
        self._handed: set[asyncio.Future[None]] = set()
        self._serial = 0
        self._wake = asyncio.Event()

    async def run(self, endpoint: Path, stop: asyncio.Event) -> None:
        """Serve on ``endpoint`` and keep the pool full until ``stop`` is set; then
        kill the VMs still held and remove the pool's directory."""
        endpoint.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{endpoint}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise CarapaceError(f"a VM pool serves {endpoint} already") from None
        try:
            await self._run(endpoint, stop)
        finally:
            os.close(lock)  # the lock file stays: another pool may be waiting on it

    async def _run(self, endpoint: Path, stop: asyncio.Event) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # a stale socket of a pool that died is replaced (a live one holds the lock);
        # mode 0600 before it listens (listen_unix)
        server = await asyncio.start_unix_server(self._serve, sock=listen_unix(endpoint))
        filler = asyncio.ensure_future(self._fill(stop))
        log.info("VM pool of %d (key %s) serving on %s", self.size, self.key, endpoint)
        try:
            await stop.wait()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                endpoint.unlink()
            filler.cancel()
            await asyncio.gather(filler, return_exceptions=True)
            held, self.ready = self.ready, []
            for p in held:
                await self._discard(p)
            shutil.rmtree(self.root, ignore_errors=True)

    async def _fill(self, stop: asyncio.Event) -> None:
        """Boot VMs one at a time (they compete for the same cores) until ``size`` are
        ready; again whenever one is taken."""
        while not stop.is_set():
            if len(self.ready) >= self.size:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.booting = 1
            try:
                p = await self._boot()
            except (CarapaceError, OSError) as e:
                self.failed += 1
                log.error("a pool VM failed to boot: %s", e)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            finally:
                self.booting = 0
            self.ready.append(p)
            log.info("pool VM %s ready (%d of %d)", p.vm.spec.name, len(self.ready), self.size)

    async def _boot(self) -> PoolVM:
        self._serial += 1
        vm_dir = self.root / str(self._serial)
        shutil.rmtree(vm_dir, ignore_errors=True)
        vm_dir.mkdir(mode=0o700)
        spec = pool_vm_spec(self.base, vm_dir, pool_vm_name(os.getpid(), self._serial))
        vm = self.new_vm(self.binary, spec, False)
        vm.pre_exec.extend(self.pre_exec)
        p = PoolVM(vm, vm_dir)
        try:
            await vm.start()
            p.agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            p.agent.connect(str(spec.agent_socket))  # QEMU listens: at once
            await self._wait_serving(vm)
            await vm.close_qmp()  # the pod connects its own
        except BaseException:
            await self._discard(p)
            raise
        return p

    async def _wait_serving(self, vm: VM) -> None:
        """Until the agent says on the console that it serves its port. The pool never
        connects to the agent: the pod's connection is its first, as in a pod's own
        boot (and the pod's first request proves it answers)."""
        deadline = time.monotonic() + self.boot_timeout
        while AGENT_SERVING not in vm.console_tail(SERVING_LINES):
            if vm.exited():
                raise HypervisorError(
                    f"pool VM {vm.spec.name} exited while it booted: {vm.console_tail(10)}"
                )
            if time.monotonic() > deadline:
                raise HypervisorError(
                    f"pool VM {vm.spec.name}: the agent did not start within "
                    f"{self.boot_timeout:g}s: {vm.console_tail(10)}"
                )
            await asyncio.sleep(SERVING_POLL)

    async def _reap(self, p: PoolVM) -> None:
        """Wait for a handed-over VM to end (QEMU is our child), then remove its
        directory here: its boot's console and QEMU log stay there while it runs."""
        try:
            await p.vm.wait()
        finally:
            shutil.rmtree(p.dir, ignore_errors=True)

    async def _discard(self, p: PoolVM) -> None:
        if p.agent is not None:
            p.agent.close()
        p.vm.kill()
        with contextlib.suppress(Exception):
            await p.vm.stop(1)
        shutil.rmtree(p.dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            line = await asyncio.wait_for(reader.readline(), TAKE_TIMEOUT)
            try:
                request = decode_line(line)
                answer, fds = await self._answer(request)
            except (InvalidArgument, CarapaceError, OSError) as e:
                answer, fds = {"ok": False, "error": str(e)}, []
            try:
                _send_now(sock, answer, fds)
            except OSError:
                pid = answer.get("pid")
                if isinstance(pid, int):
                    # the pod went away before it had the VM: nobody else will end it
                    # (our child, not reaped while it runs: the pid is still its own)
                    log.warning("the pod taking pool VM pid %d went away; killing it", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise
            finally:
                for fd in fds:
                    os.close(fd)
        except (OSError, TimeoutError, ValueError) as e:
            log.warning("a pool client: %s", e)
        finally:
            writer.close()

    async def _answer(self, request: dict[str, object]) -> tuple[dict[str, object], list[int]]:
        op = request.get("op")
        if op == "status":
            return {
                "ok": True,
                "key": self.key,
                "size": self.size,
                "ready": len(self.ready),
                "booting": self.booting,
                "taken": self.taken,
                "failed_boots": self.failed,
            }, []
        if op != "take":
            raise InvalidArgument(f"pool request op {op!r}; accepted: take, status")
        if request.get("key") != self.key:
            raise CarapaceError(
                f"the pool holds VMs of key {self.key}, the pod's is {request.get('key')!r} "
                "(another VM shape, image or configuration)"
            )
        agent_to = socket_target(request.get("agent_socket"), self.run_root, "agent_socket")
        qmp_to = socket_target(request.get("qmp_socket"), self.run_root, "qmp_socket")
        if not self.ready:
            raise CarapaceError(f"no VM ready ({self.booting} booting)")
        p = self.ready.pop(0)
        self._wake.set()
        try:
            assert p.agent is not None
            agent = os.dup(p.agent.fileno())
            pid, pidfd, console = await p.vm.hand_over()
        except BaseException:
            await self._discard(p)
            raise
        p.agent.close()
        try:
            os.rename(p.vm.spec.agent_socket, agent_to)
            os.rename(p.vm.spec.qmp_socket, qmp_to)
        except OSError:
            for fd in (pidfd, console, agent):
                os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise
        self._handed.add(asyncio.ensure_future(self._reap(p)))
        self._handed = {f for f in self._handed if not f.done()}
        self.taken += 1
        log.info("pool VM %s (pid %d) handed over", p.vm.spec.name, pid)
        answer: dict[str, object] = {"ok": True, "pid": pid, "vm_name": p.vm.spec.vm_name}
        return answer, [pidfd, console, agent]


def _send_now(sock: socket.socket, answer: dict[str, object], fds: list[int]) -> None:
    """Send on a stream's socket through a copy of its fd (sendmsg carries the fds):
    a few hundred bytes, which its empty buffer takes at once, blocking or not."""
    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
        send_message(dup, answer, fds)
