"""carapace-agent: PID 1 of the pod VM.

It sets up the guest (mounts, modules, cgroup v2), then serves the agent API over
ttrpc on a virtio-serial port. Containers are created with crun; their stdio is
relayed through ReadStdout/ReadStderr/WriteStdin calls. Stdlib + protobuf only.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import platform
import shutil
import signal
import socket
import struct
import sys
import tempfile
import termios
import time
from dataclasses import dataclass, field
from typing import Any

from carapace import linux
from carapace.guest import cgroup, hotplug, sysinit
from carapace.guest.crun import Crun, CrunError
from carapace.guest.oom import OOMWatcher
from carapace.guest.reaper import Reaper
from carapace.guest.spec import guest_spec
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, Server, TtrpcError

AGENT_VERSION = "0.1.0"
SERVICE = "carapace.agent.v1.Agent"
PORT_NAME = "carapace.agent"
STATE_DIR = "/run/carapace"
SHARED_DIR = "/run/carapace/shared"
CONTAINERS_DIR = "/run/carapace/containers"
READ_CHUNK = 1 << 20  # most bytes one ReadStdout answer carries
ONLINE_TIMEOUT_MS = 10_000  # OnlineCPUMem's default wait for the expected CPUs
log = logging.getLogger("carapace.agent")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "component": "agent",
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


@dataclass
class Process:
    """A process the agent started: a container's init or an exec."""

    container_id: str
    exec_id: str
    terminal: bool
    pid: int = 0
    stdin: asyncio.StreamWriter | None = None
    stdout: asyncio.StreamReader | None = None
    stderr: asyncio.StreamReader | None = None
    master_fd: int = -1
    exit: asyncio.Future[int] | None = None
    fds_to_close: list[int] = field(default_factory=list)

    def close_child_ends(self) -> None:
        for fd in self.fds_to_close:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds_to_close.clear()


@dataclass
class Container:
    id: str
    bundle: str
    rootfs: str
    mounts: list[str]  # guest mount points to undo on removal, innermost last
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    started: bool = False


async def _read_pipe(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK)
    await loop.connect_read_pipe(lambda: _EIOTolerantProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


async def _write_pipe(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    dummy = asyncio.StreamReader()  # StreamReaderProtocol gives drain() and wait_closed()
    transport, proto = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(dummy), os.fdopen(fd, "wb", 0)
    )
    return asyncio.StreamWriter(transport, proto, dummy, loop)


class _EIOTolerantProtocol(asyncio.StreamReaderProtocol):
    """A pty master reads EIO once the terminal's last user is gone: that is EOF."""

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            exc = None
        super().connection_lost(exc)


class Agent:
    def __init__(self) -> None:
        self.reaper = Reaper()
        self.crun: Crun | None = None
        self.containers: dict[str, Container] = {}
        self.sandbox_id = ""
        self.sandbox_mounts: list[str] = []
        self.oom = OOMWatcher()
        self.server = Server()
        for name, req, handler in (
            ("CreateSandbox", pb.CreateSandboxRequest, self.create_sandbox),
            ("DestroySandbox", pb.DestroySandboxRequest, self.destroy_sandbox),
            ("CreateContainer", pb.CreateContainerRequest, self.create_container),
            ("StartContainer", pb.StartContainerRequest, self.start_container),
            ("RemoveContainer", pb.RemoveContainerRequest, self.remove_container),
            ("ExecProcess", pb.ExecProcessRequest, self.exec_process),
            ("RemoveProcess", pb.RemoveProcessRequest, self.remove_process),
            ("SignalProcess", pb.SignalProcessRequest, self.signal_process),
            ("WaitProcess", pb.WaitProcessRequest, self.wait_process),
            ("WriteStdin", pb.WriteStreamRequest, self.write_stdin),
            ("ReadStdout", pb.ReadStreamRequest, self.read_stdout),
            ("ReadStderr", pb.ReadStreamRequest, self.read_stderr),
            ("CloseStdin", pb.CloseStdinRequest, self.close_stdin),
            ("TtyWinResize", pb.TtyWinResizeRequest, self.tty_win_resize),
            ("PauseContainer", pb.PauseContainerRequest, self.pause_container),
            ("ResumeContainer", pb.ResumeContainerRequest, self.resume_container),
            ("StatsContainer", pb.StatsContainerRequest, self.stats_container),
            ("ListProcesses", pb.ListProcessesRequest, self.list_processes),
            ("UpdateContainer", pb.UpdateContainerRequest, self.update_container),
            ("GetOOMEvent", pb.GetOOMEventRequest, self.get_oom_event),
            ("GetGuestDetails", pb.GuestDetailsRequest, self.get_guest_details),
            ("OnlineCPUMem", pb.OnlineCPUMemRequest, self.online_cpu_mem),
            ("Check", pb.CheckRequest, self.check),
            ("Version", pb.CheckRequest, self.version),
        ):
            self.server.register_typed(SERVICE, name, req, handler)  # type: ignore[arg-type]

    # -- lookups --------------------------------------------------------------

    def _container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {cid!r} not found in the sandbox")
        return c

    def _process(self, cid: str, exec_id: str) -> Process:
        c = self._container(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise TtrpcError(Code.NOT_FOUND, f"exec {exec_id!r} not found in container {cid!r}")
        return p

    @property
    def _crun(self) -> Crun:
        if self.crun is None:
            self.crun = Crun(self.reaper)
        return self.crun

    # -- sandbox --------------------------------------------------------------

    async def create_sandbox(self, req: pb.CreateSandboxRequest) -> pb.Empty:
        if self.sandbox_id:
            raise TtrpcError(Code.ALREADY_EXISTS, f"sandbox {self.sandbox_id} exists already")
        for st in req.storages:
            self._mount_storage(st)
            self.sandbox_mounts.append(st.mount_point)
        if req.hostname:
            with open("/proc/sys/kernel/hostname", "w") as f:
                f.write(req.hostname)
        self.sandbox_id = req.sandbox_id
        log.info("sandbox %s created", req.sandbox_id)
        return pb.Empty()

    def _mount_storage(self, st: pb.Storage) -> None:
        if not st.mount_point.startswith("/"):
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"storage mount point must be absolute, got {st.mount_point!r}",
            )
        fstype = st.fstype or st.driver
        flags = 0
        data = [o for o in st.options if o not in ("ro", "rw")]
        if "ro" in st.options:
            flags |= linux.MS_RDONLY
        try:
            linux.mount(st.source, st.mount_point, fstype, flags, ",".join(data))
        except OSError as e:
            raise TtrpcError(Code.INTERNAL, str(e)) from e

    async def destroy_sandbox(self, req: pb.DestroySandboxRequest) -> pb.Empty:
        for cid in list(self.containers):
            with contextlib.suppress(Exception):
                await self._remove(cid, 1)
        os.sync()
        log.info("sandbox %s destroyed; powering off", self.sandbox_id)
        if os.getpid() == 1:
            asyncio.get_running_loop().call_later(0.05, _power_off)
        return pb.Empty()

    # -- containers -----------------------------------------------------------

    async def create_container(self, req: pb.CreateContainerRequest) -> pb.Empty:
        cid = req.container_id
        if not cid or "/" in cid or cid.startswith("."):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid container id {cid!r}")
        if cid in self.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {cid!r} exists already")
        try:
            spec = json.loads(req.oci_spec)
        except ValueError as e:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"OCI spec is not JSON: {e}") from e
        if not os.path.isdir(req.rootfs):
            raise TtrpcError(
                Code.NOT_FOUND, f"container rootfs {req.rootfs!r} does not exist in the guest"
            )
        bundle = os.path.join(CONTAINERS_DIR, cid)
        os.makedirs(bundle)
        mounts: list[str] = []
        try:
            rootfs = req.rootfs
            if req.rootfs_overlay:
                for d in ("upper", "work", "rootfs"):
                    os.makedirs(os.path.join(bundle, d))
                merged = os.path.join(bundle, "rootfs")
                linux.mount(
                    "overlay",
                    merged,
                    "overlay",
                    0,
                    f"lowerdir={req.rootfs},upperdir={bundle}/upper,workdir={bundle}/work",
                )
                mounts.append(merged)
                rootfs = merged
            for st in req.storages:
                self._mount_storage(st)
                mounts.append(st.mount_point)
            config = guest_spec(spec, cid, rootfs)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
            terminal = bool(config.get("process", {}).get("terminal"))
            proc = Process(container_id=cid, exec_id="", terminal=terminal)
            container = Container(id=cid, bundle=bundle, rootfs=rootfs, mounts=mounts, init=proc)
            await self._spawn(
                proc,
                bundle,
                lambda stdio, sock: self._crun.create(
                    cid, bundle, os.path.join(bundle, "init.pid"), stdio, sock
                ),
            )
        except BaseException as e:
            for m in reversed(mounts):
                with contextlib.suppress(OSError):
                    linux.umount(m, lazy=True)
            shutil.rmtree(bundle, ignore_errors=True)
            if isinstance(e, CrunError):
                raise TtrpcError(Code.INTERNAL, str(e)) from e
            raise
        self.containers[cid] = container
        watch = self.oom.watch(cid, cgroup.container_cgroup(cid))
        if proc.exit is not None:
            # a kill just before init's exit is counted already: read it once more
            proc.exit.add_done_callback(lambda _: self.oom.forget(cid, watch))
        log.info("container %s created (pid %d)", cid, proc.pid)
        return pb.Empty()

    async def _spawn(self, proc: Process, workdir: str, launch: Any) -> None:
        """Create stdio for ``proc``, run ``launch(stdio, console_socket)`` (crun create
        or exec), then read the pid and start waiting for the process."""
        tag = proc.exec_id or "init"
        pid_file = os.path.join(workdir, f"{tag}.pid")
        console_task: asyncio.Task[int] | None = None
        stdio: tuple[int, int, int] | None = None
        sock_path: str | None = None
        listener: socket.socket | None = None
        try:
            if proc.terminal:
                sock_path = os.path.join(workdir, f"{tag}.console")
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(sock_path)
                listener.listen(1)
                listener.setblocking(False)
                console_task = asyncio.ensure_future(_receive_fd(listener))
            else:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                proc.fds_to_close = [in_r, out_w, err_w]
                stdio = (in_r, out_w, err_w)
                proc.stdin = await _write_pipe(in_w)
                proc.stdout = await _read_pipe(out_r)
                proc.stderr = await _read_pipe(err_r)
            await launch(stdio, sock_path)
            proc.close_child_ends()
            if console_task is not None:
                master = await asyncio.wait_for(console_task, 10)
                proc.master_fd = master
                proc.stdout = await _read_pipe(os.dup(master))
                proc.stdin = await _write_pipe(os.dup(master))
            with open(pid_file) as f:
                proc.pid = int(f.read().strip())
            proc.exit = self.reaper.wait(proc.pid)
        except BaseException:
            proc.close_child_ends()
            if console_task is not None:
                console_task.cancel()
            _close_process_streams(proc)
            raise
        finally:
            if listener is not None:
                listener.close()
            if sock_path:
                with contextlib.suppress(OSError):
                    os.unlink(sock_path)

    async def start_container(self, req: pb.StartContainerRequest) -> pb.StartContainerResponse:
        c = self._container(req.container_id)
        if c.started:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.id!r} is already started")
        try:
            await self._crun.start(c.id)
        except CrunError as e:
            raise TtrpcError(Code.INTERNAL, str(e)) from e
        c.started = True
        return pb.StartContainerResponse(pid=c.init.pid)

    async def remove_container(self, req: pb.RemoveContainerRequest) -> pb.Empty:
        self._container(req.container_id)
        await self._remove(req.container_id, req.timeout_seconds or 10)
        return pb.Empty()

    async def _remove(self, cid: str, timeout: float) -> None:
        c = self.containers[cid]
        procs = [c.init, *c.execs.values()]
        for p in procs:
            if p.exit is not None and not p.exit.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            if p.exit is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(p.exit), timeout)
        self.oom.forget(cid)
        try:
            await self._crun.delete(cid)
        except CrunError as e:
            log.warning("%s", e)
        for p in procs:
            _close_process_streams(p)
        for m in reversed(c.mounts):
            with contextlib.suppress(OSError):
                linux.umount(m, lazy=True)
        shutil.rmtree(c.bundle, ignore_errors=True)
        del self.containers[cid]
        log.info("container %s removed", cid)

    def _running(self, cid: str) -> Container:
        c = self._container(cid)
        if not c.started or c.init.exit is None or c.init.exit.done():
            state = "exited" if c.init.exit is not None and c.init.exit.done() else "not started"
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"container {cid!r} is not running ({state})"
            )
        return c

    async def pause_container(self, req: pb.PauseContainerRequest) -> pb.Empty:
        c = self._running(req.container_id)
        try:
            await self._crun.pause(c.id)
        except CrunError as e:
            raise TtrpcError(Code.INTERNAL, str(e)) from e
        log.info("container %s paused", c.id)
        return pb.Empty()

    async def resume_container(self, req: pb.ResumeContainerRequest) -> pb.Empty:
        c = self._running(req.container_id)
        try:
            await self._crun.resume(c.id)
        except CrunError as e:
            raise TtrpcError(Code.INTERNAL, str(e)) from e
        log.info("container %s resumed", c.id)
        return pb.Empty()

    async def stats_container(self, req: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        c = self._container(req.container_id)
        return cgroup.read_stats(cgroup.container_cgroup(c.id))

    async def list_processes(self, req: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
        c = self._container(req.container_id)
        return pb.ListProcessesResponse(pids=cgroup.list_pids(cgroup.container_cgroup(c.id)))

    async def update_container(self, req: pb.UpdateContainerRequest) -> pb.Empty:
        c = self._container(req.container_id)
        try:
            resources = json.loads(req.resources)
        except ValueError as e:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"resources of container {c.id!r} are not JSON: {e}"
            ) from e
        if not isinstance(resources, dict):
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"resources of container {c.id!r} must be an OCI LinuxResources object, "
                f"got {type(resources).__name__}",
            )
        fd, path = tempfile.mkstemp(prefix="resources-", suffix=".json", dir=c.bundle)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(resources, f)
            await self._crun.update(c.id, path)
        except CrunError as e:
            raise TtrpcError(Code.INTERNAL, str(e)) from e
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        log.info("container %s updated: %s", c.id, json.dumps(resources))
        return pb.Empty()

    async def get_oom_event(self, req: pb.GetOOMEventRequest) -> pb.OOMEvent:
        return pb.OOMEvent(container_id=await self.oom.next_event())

    # -- processes ------------------------------------------------------------

    async def exec_process(self, req: pb.ExecProcessRequest) -> pb.ExecProcessResponse:
        c = self._container(req.container_id)
        if not req.exec_id or "/" in req.exec_id:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid exec id {req.exec_id!r}")
        if req.exec_id in c.execs:
            raise TtrpcError(
                Code.ALREADY_EXISTS, f"exec {req.exec_id!r} exists already in container {c.id!r}"
            )
        if c.init.exit is None or c.init.exit.done():
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.id!r} is not running")
        try:
            process = json.loads(req.process)
        except ValueError as e:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"process is not JSON: {e}") from e
        proc = Process(
            container_id=c.id, exec_id=req.exec_id, terminal=bool(process.get("terminal"))
        )
        pfile = os.path.join(c.bundle, f"exec-{req.exec_id}.json")
        with open(pfile, "w") as f:
            json.dump(process, f)
        try:
            await self._spawn(
                proc,
                c.bundle,
                lambda stdio, sock: self._crun.exec(
                    c.id, pfile, os.path.join(c.bundle, f"{req.exec_id}.pid"), stdio, sock
                ),
            )
        except CrunError as e:
            raise TtrpcError(Code.INTERNAL, str(e)) from e
        c.execs[req.exec_id] = proc
        return pb.ExecProcessResponse(pid=proc.pid)

    async def remove_process(self, req: pb.RemoveProcessRequest) -> pb.Empty:
        c = self._container(req.container_id)
        p = c.execs.get(req.exec_id)
        if p is None:
            raise TtrpcError(
                Code.NOT_FOUND, f"exec {req.exec_id!r} not found in container {c.id!r}"
            )
        if p.exit is not None and not p.exit.done():
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"exec {req.exec_id!r} of container {c.id!r} is running; kill it first",
            )
        _close_process_streams(p)
        for name in (f"exec-{req.exec_id}.json", f"{req.exec_id}.pid"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(c.bundle, name))
        del c.execs[req.exec_id]
        return pb.Empty()

    async def signal_process(self, req: pb.SignalProcessRequest) -> pb.Empty:
        p = self._process(req.container_id, req.exec_id)
        if req.all:
            try:
                await self._crun.kill(req.container_id, req.signal, all_processes=True)
            except CrunError as e:
                raise TtrpcError(Code.INTERNAL, str(e)) from e
            return pb.Empty()
        if p.exit is None or p.exit.done():
            raise TtrpcError(
                Code.NOT_FOUND,
                f"process {req.exec_id or 'init'} of container {req.container_id!r} is not running",
            )
        try:
            os.kill(p.pid, req.signal)
        except ProcessLookupError:
            pass
        except (OSError, ValueError) as e:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"signal {req.signal}: {e}") from e
        return pb.Empty()

    async def wait_process(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        p = self._process(req.container_id, req.exec_id)
        if p.exit is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, "process was never started")
        return pb.WaitProcessResponse(status=await asyncio.shield(p.exit))

    async def write_stdin(self, req: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        p = self._process(req.container_id, req.exec_id)
        if p.stdin is None or p.stdin.is_closing():
            raise TtrpcError(Code.FAILED_PRECONDITION, "stdin is closed")
        p.stdin.write(req.data)
        try:
            await p.stdin.drain()
        except (ConnectionError, OSError) as e:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"stdin: {e}") from e
        return pb.WriteStreamResponse(len=len(req.data))

    async def _read(self, stream: asyncio.StreamReader | None, n: int) -> pb.ReadStreamResponse:
        if stream is None:
            return pb.ReadStreamResponse(eof=True)
        data = await stream.read(min(n or READ_CHUNK, READ_CHUNK))
        return pb.ReadStreamResponse(data=data, eof=not data)

    async def read_stdout(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await self._read(self._process(req.container_id, req.exec_id).stdout, req.len)

    async def read_stderr(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await self._read(self._process(req.container_id, req.exec_id).stderr, req.len)

    async def close_stdin(self, req: pb.CloseStdinRequest) -> pb.Empty:
        p = self._process(req.container_id, req.exec_id)
        if p.terminal and p.stdin is not None and not p.stdin.is_closing():
            p.stdin.write(b"\x04")  # a terminal has no EOF of its own: send ^D
            return pb.Empty()
        if p.stdin is not None:
            p.stdin.close()
        return pb.Empty()

    async def tty_win_resize(self, req: pb.TtyWinResizeRequest) -> pb.Empty:
        p = self._process(req.container_id, req.exec_id)
        if p.master_fd < 0:
            raise TtrpcError(Code.FAILED_PRECONDITION, "the process has no terminal")
        fcntl.ioctl(p.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", req.row, req.column, 0, 0))
        return pb.Empty()

    # -- hotplug --------------------------------------------------------------

    async def online_cpu_mem(self, req: pb.OnlineCPUMemRequest) -> pb.OnlineCPUMemResponse:
        """Online hot-added CPUs and memory blocks, retrying until ``expected_cpus``
        CPUs are online (ACPI adds and ejects them asynchronously) or the time is up."""
        timeout = (req.timeout_ms or ONLINE_TIMEOUT_MS) / 1000
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        while True:
            r = hotplug.online_all(max_cpus=req.max_online_cpus)
            if r.cpus or r.memory_blocks or r.offlined:
                log.info(
                    "onlined CPUs %s, memory blocks %s; offlined CPUs %s",
                    r.cpus,
                    r.memory_blocks,
                    r.offlined,
                )
            errors = r.errors
            cpus = hotplug.online_cpus()
            if not req.expected_cpus or len(cpus) == req.expected_cpus:
                break
            if time.monotonic() >= deadline:
                raise TtrpcError(
                    Code.DEADLINE_EXCEEDED,
                    f"expected {req.expected_cpus} online CPUs, saw {len(cpus)} "
                    f"({','.join(map(str, cpus))}) after {timeout:g}s"
                    + (f"; failed writes: {'; '.join(errors)}" if errors else ""),
                )
            await asyncio.sleep(0.05)
        if errors:
            log.warning("onlining: %s", "; ".join(errors))
        return pb.OnlineCPUMemResponse(online_cpus=len(cpus), mem_total_kb=hotplug.mem_total_kb())

    # -- information ----------------------------------------------------------

    async def get_guest_details(self, req: pb.GuestDetailsRequest) -> pb.GuestDetailsResponse:
        mem = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return pb.GuestDetailsResponse(
            kernel_release=platform.release(),
            online_cpus=len(os.sched_getaffinity(0)),
            mem_total_bytes=mem,
            boot_id=boot_id,
            agent_version=AGENT_VERSION,
            crun_version=await self._crun.version(),
        )

    async def check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def version(self, req: pb.CheckRequest) -> pb.VersionCheckResponse:
        return pb.VersionCheckResponse(grpc_version="ttrpc-1", agent_version=AGENT_VERSION)

    # -- serving --------------------------------------------------------------

    async def serve(self) -> None:
        self.reaper.install()
        os.makedirs(CONTAINERS_DIR, exist_ok=True)
        log.info("agent %s serving on virtio port %s", AGENT_VERSION, PORT_NAME)
        while True:
            path = sysinit.find_virtio_port(PORT_NAME)
            if path is None:
                await asyncio.sleep(0.01)
                continue
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                reader = await _read_pipe(fd)
                writer = await _write_pipe(os.dup(fd))
            except OSError:
                await asyncio.sleep(0.01)
                continue
            try:
                await self.server.serve_connection(reader, writer)
            except Exception:
                log.exception("agent connection failed")
            finally:
                writer.close()
            # the host closed its end (or was not connected yet): reopen shortly
            await asyncio.sleep(0.01)


def _close_process_streams(p: Process) -> None:
    if p.stdin is not None:
        p.stdin.close()
    for reader in (p.stdout, p.stderr):
        # a reader's pipe closes itself at end of file; one never read to the end is
        # closed here (StreamReader keeps its transport private)
        transport = getattr(reader, "_transport", None)
        if transport is not None and not transport.is_closing():
            transport.close()
    p.close_child_ends()
    if p.master_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(p.master_fd)
        p.master_fd = -1


async def _receive_fd(listener: socket.socket) -> int:
    """Accept crun's connection on the console socket and take the pty master fd."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    with conn:
        conn.setblocking(False)
        fds = array.array("i")
        while True:
            try:
                _msg, anc, _flags, _addr = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
                break
            except BlockingIOError:
                await _readable(loop, conn.fileno())
        for level, ctype, data in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise OSError("crun sent no terminal fd on the console socket")
        return fds[0]


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _power_off() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if os.getpid() == 1:
        started = time.monotonic()
        sysinit.early_init()
        log.info(
            "guest up: agent started at %.2fs after boot, early init took %.2fs",
            started,
            time.monotonic() - started,
        )
        with open("/proc/cmdline") as f:
            if "carapace.probe=1" in f.read().split():
                print("CARAPACE-PROBE-OK", flush=True)  # the host's accelerator probe
                _power_off()
    try:
        asyncio.run(Agent().serve())
    except BaseException:
        log.exception("agent exited")
        if os.getpid() == 1:
            _power_off()
        raise


if __name__ == "__main__":
    main()
