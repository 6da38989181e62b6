"""containerd.task.v2.Task for one pod: the first container of the pod boots the VM,
the others join it, and the VM is shut down when the last one is deleted.

The service uses a sandbox only through ``SandboxLike`` (what ``Sandbox`` offers), made
by its ``sandbox_factory``: unit tests give it a fake."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from carapace import __version__, resources
from carapace.config import Config, load_config
from carapace.errors import (
    AlreadyExists,
    CarapaceError,
    InvalidArgument,
    NotFound,
    StateError,
)
from carapace.oci import Bundle, Spec
from carapace.protocols.containerd import events_pb2 as ev
from carapace.protocols.containerd import shim_pb2 as api
from carapace.protocols.containerd import task_types_pb2 as tt
from carapace.sandbox import Sandbox, SandboxOptions
from carapace.shim.events import oneline
from carapace.shim.interfaces import EventPublisher, SandboxFactory, SandboxLike
from carapace.shim.metrics import host_v1_metrics, to_v1_metrics
from carapace.shim.params import (
    METRICS_URL,
    TASK_SERVICE,
    config_path_of,
    join_pod_namespaces,
)
from carapace.shim.podwatch import PodWatch
from carapace.shim.stdio import ProcessStdio
from carapace.shim.tasks import Container, Proc, now
from carapace.ttrpc import Code, Server, TtrpcError
from carapace.ttrpc.errors import to_ttrpc_error

log = logging.getLogger("carapace.shim")

SERVICE = TASK_SERVICE


class TaskService:
    def __init__(
        self,
        pod_id: str,
        namespace: str,
        publisher: EventPublisher,
        config_path: str | None = None,
        sandbox_factory: SandboxFactory = Sandbox,
    ) -> None:
        self.pod_id = pod_id
        self.namespace = namespace
        self.events = publisher
        self.config_path = config_path
        self.sandbox_factory = sandbox_factory
        self.sandbox: SandboxLike | None = None
        self.containers: dict[str, Container] = {}
        self.shutdown_requested = asyncio.Event()
        self._create_lock = asyncio.Lock()
        #: The VM's exit, OOM events, kill deadlines, the agent connection (podwatch.py).
        self.watch = PodWatch(
            pod_id, self.containers, self._exited, publisher.publish, lambda: self.sandbox
        )

    # -- registration ---------------------------------------------------------

    def register(self, server: Server) -> None:
        methods: dict[str, tuple[type[Message], Callable[[Any], Coroutine[Any, Any, Message]]]] = {
            "State": (api.StateRequest, self.state),
            "Create": (api.CreateTaskRequest, self.create),
            "Start": (api.StartRequest, self.start),
            "Delete": (api.DeleteRequest, self.delete),
            "Pids": (api.PidsRequest, self.pids),
            "Pause": (api.PauseRequest, self.pause),
            "Resume": (api.ResumeRequest, self.resume),
            "Checkpoint": (api.CheckpointTaskRequest, self.checkpoint),
            "Kill": (api.KillRequest, self.kill),
            "Exec": (api.ExecProcessRequest, self.exec),
            "ResizePty": (api.ResizePtyRequest, self.resize_pty),
            "CloseIO": (api.CloseIORequest, self.close_io),
            "Update": (api.UpdateTaskRequest, self.update),
            "Wait": (api.WaitRequest, self.wait),
            "Stats": (api.StatsRequest, self.stats),
            "Connect": (api.ConnectRequest, self.connect),
            "Shutdown": (api.ShutdownRequest, self.shutdown),
        }
        for name, (req_type, handler) in methods.items():
            server.register_typed(SERVICE, name, req_type, self._guard(name, handler))

    def _guard(
        self, name: str, handler: Callable[[Any], Coroutine[Any, Any, Message]]
    ) -> Callable[[Any], Coroutine[Any, Any, Message]]:
        @functools.wraps(handler)
        async def run(req: Any) -> Message:
            if log.isEnabledFor(logging.DEBUG):  # formatting every request costs
                log.debug("%s %s", name, oneline(req))
            try:
                return await handler(req)
            except CarapaceError as e:
                log.warning("%s failed: %s", name, e)
                raise to_ttrpc_error(e) from e

        return run

    # -- helpers ----------------------------------------------------------------

    def _container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid} not found in pod {self.pod_id}")
        return c

    def _proc(self, cid: str, exec_id: str) -> Proc:
        c = self._container(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise NotFound(f"process {exec_id} not found in container {cid}")
        return p

    def _sandbox(self) -> SandboxLike:
        if self.sandbox is None:
            raise StateError(f"pod {self.pod_id} has no VM")
        return self.sandbox

    def _sandbox_guest_pid(self) -> int:
        """The guest pid of the pod's sandbox container's init (0 if none runs)."""
        for c in self.containers.values():
            if c.spec.is_pod_sandbox(c.id) and c.init.status in (tt.RUNNING, tt.PAUSED):
                return c.init.pid
        return 0

    @property
    def task_pid(self) -> int:
        """The pid containerd sees for every task of the pod: the VM's (as Kata does)."""
        return self.sandbox.vm_pid if self.sandbox is not None else 0

    def _load_config(self, options: AnyPb | None) -> Config:
        path = config_path_of(options) if options is not None else None
        return load_config(path or self.config_path)

    # -- the pod VM ---------------------------------------------------------------

    async def _start_sandbox(self, spec: Spec, options: AnyPb | None) -> SandboxLike:
        config = self._load_config(options)
        # the sandbox container's spec sizes the VM (annotations, files limit) and is
        # checked (host namespaces, its own resources) before anything is made
        sb = self.sandbox_factory(
            config,
            SandboxOptions(
                sandbox_id=self.pod_id,
                hostname=spec.hostname or "carapace",
                sandbox_spec=spec,
                join_owner=True,  # the shim daemon lives in the sandbox cgroup too
            ),
        )
        await sb.start()
        log.info("pod %s: VM up, QEMU pid %d", self.pod_id, sb.vm_pid)
        self.watch.start(sb, config.runtime.kill_timeout)
        return sb

    async def _stop_sandbox(self) -> None:
        sb, self.sandbox = self.sandbox, None
        if sb is not None:
            log.info("pod %s: shutting the VM down", self.pod_id)
            await sb.destroy()

    # -- processes --------------------------------------------------------------

    def _exited(self, p: Proc, status: int) -> None:
        if p.finish(status):
            log.info("%s/%s exited with %d", p.container_id, p.exec_id or "init", status)
            self.events.publish(
                ev.TaskExit(
                    container_id=p.container_id,
                    id=p.id,
                    pid=self.task_pid,
                    exit_status=status,
                    exited_at=p.exited_at,
                )
            )

    async def _launch(self, p: Proc, start: Awaitable[int]) -> int:
        return await p.launch(self._sandbox(), start, self._exited)

    # -- the task API -----------------------------------------------------------

    async def create(self, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "carapace cannot restore from a checkpoint")
        if req.id in self.containers:
            raise AlreadyExists(f"container {req.id} exists already in pod {self.pod_id}")
        bundle = Bundle.load(req.bundle, check_rootfs=False)  # the rootfs is mounted below
        spec = bundle.spec
        pod = spec.pod_id(req.id)
        if pod != self.pod_id:
            raise InvalidArgument(
                f"container {req.id} belongs to pod {pod}, but this shim serves pod {self.pod_id}"
            )
        if spec.is_pause:  # a CRI pod: refused in the pod's words before anything is made
            resources.check_pod_namespaces(spec.namespaces, self.pod_id)
        stdio = ProcessStdio(req.stdin, req.stdout, req.stderr, req.terminal)
        c = Container(req.id, req.bundle, spec, bundle.rootfs, Proc(req.id, "", stdio))
        booted_here = False
        try:
            rootfs = c.mount_rootfs(req.rootfs)
            stdio.open()
            async with self._create_lock:
                if self.sandbox is None:
                    if not spec.is_pod_sandbox(req.id):
                        raise StateError(
                            f"container {req.id}: pod {self.pod_id} has no sandbox container yet"
                        )
                    options = req.options if req.HasField("options") else None
                    self.sandbox = await self._start_sandbox(spec, options)
                    booted_here = True
            if not spec.is_pod_sandbox(req.id):
                spec = join_pod_namespaces(spec, self._sandbox_guest_pid())
            spec = spec.with_terminal(req.terminal)
            self.containers[req.id] = c
            await self._sandbox().create_container(req.id, spec, rootfs, overlay=False)
        except BaseException:
            self.containers.pop(req.id, None)
            stdio.close()
            c.unmount_rootfs()
            if booted_here:
                await self._stop_sandbox()
            raise
        self.events.publish(
            ev.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=list(req.rootfs),
                io=ev.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                pid=self.task_pid,
            )
        )
        return api.CreateTaskResponse(pid=self.task_pid)

    async def start(self, req: api.StartRequest) -> api.StartResponse:
        p = self._proc(req.id, req.exec_id)
        if p.status != tt.CREATED or p.exited.is_set():
            raise StateError(f"process {p.id} was started already")
        sb = self._sandbox()
        if req.exec_id:
            assert p.spec is not None
            await self._launch(p, sb.start_exec(req.id, req.exec_id, p.spec))
            self.events.publish(
                ev.TaskExecStarted(container_id=req.id, exec_id=req.exec_id, pid=self.task_pid)
            )
        else:
            await self._launch(p, sb.start_container(req.id))
            self.events.publish(ev.TaskStart(container_id=req.id, pid=self.task_pid))
        return api.StartResponse(pid=self.task_pid)

    async def exec(self, req: api.ExecProcessRequest) -> Empty:
        c = self._container(req.id)
        if c.init.status not in (tt.RUNNING, tt.PAUSED):
            raise StateError(f"container {req.id} is not running")
        if req.exec_id in c.execs:
            raise AlreadyExists(f"process {req.exec_id} exists already in container {req.id}")
        try:
            process = json.loads(req.spec.value)
        except ValueError as e:
            raise InvalidArgument(f"exec {req.exec_id}: the process spec is not JSON: {e}") from e
        process["terminal"] = req.terminal
        stdio = ProcessStdio(req.stdin, req.stdout, req.stderr, req.terminal)
        stdio.open()
        c.execs[req.exec_id] = Proc(req.id, req.exec_id, stdio, spec=process)
        self.events.publish(ev.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return Empty()

    async def wait(self, req: api.WaitRequest) -> api.WaitResponse:
        p = self._proc(req.id, req.exec_id)
        await p.exited.wait()
        return api.WaitResponse(exit_status=p.exit_status, exited_at=p.exited_at)

    async def kill(self, req: api.KillRequest) -> Empty:
        p = self._proc(req.id, req.exec_id)
        if p.exited.is_set():
            raise NotFound(f"process {p.id} already finished")
        sb = self._sandbox()
        if p.status == tt.CREATED and req.exec_id:
            self._exited(p, 128 + req.signal)  # never started: nothing runs in the guest
            return Empty()
        # the sandbox container's init ends the pod: all of it must be gone by the deadline
        pod_end = not req.exec_id and self._container(req.id).spec.is_pod_sandbox(req.id)
        await self.watch.kill(sb, p, req.signal, req.all, pod_end)
        if p.status == tt.CREATED and req.signal in (signal.SIGKILL, signal.SIGTERM):
            # a created init has no relay waiting for it; crun kill ended it
            self._exited(p, 128 + req.signal)
        return Empty()

    async def delete(self, req: api.DeleteRequest) -> api.DeleteResponse:
        c = self._container(req.id)
        if req.exec_id:
            p = self._proc(req.id, req.exec_id)
            if p.status in (tt.RUNNING, tt.PAUSED) and not p.exited.is_set():
                raise StateError(f"process {p.id} is running; kill it first")
            if p.status != tt.CREATED and self.sandbox is not None and not self.watch.gone:
                await self.sandbox.remove_exec(req.id, req.exec_id)
            p.stdio.close()
            del c.execs[req.exec_id]
            return api.DeleteResponse(
                pid=self.task_pid, exit_status=p.exit_status, exited_at=p.exited_at or now()
            )
        p = c.init
        if p.status in (tt.RUNNING, tt.PAUSED) and not p.exited.is_set():
            raise StateError(f"container {req.id} is running; kill it first")
        if not p.exited.is_set():
            p.finish(0)
        pid = self.task_pid
        # the last container goes with the VM (_stop_sandbox ends its processes)
        if self.sandbox is not None and self.containers.keys() != {req.id}:
            try:
                await self.sandbox.remove_container(req.id)
            except CarapaceError as e:
                if not await self.watch.vm_gone(self.sandbox):
                    raise
                log.info("container %s: removed with its lost VM (%s)", req.id, e)
        for x in c.execs.values():
            x.stdio.close()
        p.stdio.close()
        c.unmount_rootfs()
        del self.containers[req.id]
        if not self.containers:
            await self._stop_sandbox()
        self.events.publish(
            ev.TaskDelete(
                container_id=req.id, pid=pid, exit_status=p.exit_status, exited_at=p.exited_at
            )
        )
        return api.DeleteResponse(pid=pid, exit_status=p.exit_status, exited_at=p.exited_at)

    async def state(self, req: api.StateRequest) -> api.StateResponse:
        c = self._container(req.id)
        p = self._proc(req.id, req.exec_id)
        stdin, stdout, stderr = p.stdio.paths
        return api.StateResponse(
            id=p.id,
            bundle=c.bundle,
            pid=self.task_pid,
            status=p.status,  # type: ignore[arg-type]
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            terminal=p.stdio.terminal,
            exit_status=p.exit_status,
            exited_at=p.exited_at,
            exec_id=req.exec_id,
        )

    async def pids(self, req: api.PidsRequest) -> api.PidsResponse:
        self._container(req.id)
        pids = await self._sandbox().processes(req.id)
        return api.PidsResponse(processes=[tt.ProcessInfo(pid=pid) for pid in pids])

    async def pause(self, req: api.PauseRequest) -> Empty:
        c = self._container(req.id)
        if c.init.status != tt.RUNNING:
            raise StateError(f"container {req.id} is not running")
        await self._sandbox().pause(req.id)
        c.init.status = tt.PAUSED
        self.events.publish(ev.TaskPaused(container_id=req.id))
        return Empty()

    async def resume(self, req: api.ResumeRequest) -> Empty:
        c = self._container(req.id)
        if c.init.status != tt.PAUSED:
            raise StateError(f"container {req.id} is not paused")
        await self._sandbox().resume(req.id)
        c.init.status = tt.RUNNING
        self.events.publish(ev.TaskResumed(container_id=req.id))
        return Empty()

    async def checkpoint(self, req: api.CheckpointTaskRequest) -> Empty:
        raise TtrpcError(
            Code.UNIMPLEMENTED,
            f"checkpoint of {req.id}: carapace does not checkpoint containers (their memory "
            "lives in the pod's VM)",
        )

    async def resize_pty(self, req: api.ResizePtyRequest) -> Empty:
        p = self._proc(req.id, req.exec_id)
        if p.resize is None:
            raise StateError(f"process {p.id} has no terminal or has not started")
        await p.resize(req.height, req.width)
        return Empty()

    async def close_io(self, req: api.CloseIORequest) -> Empty:
        p = self._proc(req.id, req.exec_id)
        if req.stdin and p.stdio.stdin is not None:
            p.stdio.stdin.close_input()
        return Empty()

    async def update(self, req: api.UpdateTaskRequest) -> Empty:
        self._container(req.id)
        try:
            resources = json.loads(req.resources.value)
        except ValueError as e:
            raise InvalidArgument(f"update {req.id}: resources are not JSON: {e}") from e
        if not isinstance(resources, dict):
            raise InvalidArgument(f"update {req.id}: resources must be a JSON object")
        await self._sandbox().update(req.id, resources)
        return Empty()

    async def stats(self, req: api.StatsRequest) -> api.StatsResponse:
        c = self._container(req.id)
        sb = self._sandbox()
        if c.spec.is_pause:
            # a pause container stands for the pod: its stats are the pod's host cost
            # (QEMU, its threads and the shim) from the sandbox's host cgroup
            host = sb.host_stats()
            network = await sb.network_stats()
            metrics = host_v1_metrics(host.cpu_usage_ns, host.memory_bytes, host.pids, network)
        else:
            metrics = to_v1_metrics(await sb.stats(req.id))
        return api.StatsResponse(
            stats=AnyPb(type_url=METRICS_URL, value=metrics.SerializeToString())
        )

    async def connect(self, req: api.ConnectRequest) -> api.ConnectResponse:
        return api.ConnectResponse(
            shim_pid=os.getpid(), task_pid=self.task_pid, version=__version__
        )

    async def shutdown(self, req: api.ShutdownRequest) -> Empty:
        if self.containers and not req.now:
            return Empty()
        self.shutdown_requested.set()
        return Empty()

    # -- the end ------------------------------------------------------------------

    async def close(self) -> None:
        """Release everything: containers' processes and mounts, the VM."""
        for c in list(self.containers.values()):
            for p in c.procs:
                p.stdio.close()
                if p.relay is not None:
                    p.relay.cancel()
            c.unmount_rootfs()
        with contextlib.suppress(CarapaceError):
            await self._stop_sandbox()
        await self.watch.close()
