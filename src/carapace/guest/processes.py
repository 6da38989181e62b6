"""The process verbs: ExecProcess, RemoveProcess, SignalProcess, WaitProcess and
ListProcesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

from carapace.guest import cgroup
from carapace.guest.crun import process_command
from carapace.guest.pod import Pod, Process
from carapace.guest.stdio import close_process_streams, spawn
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError


class ProcessService:
    def __init__(self, pod: Pod) -> None:
        self.pod = pod

    async def exec_process(self, req: pb.ExecProcessRequest) -> pb.ExecProcessResponse:
        c = self.pod.container(req.container_id)
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
        await spawn(
            proc,
            c.bundle,
            lambda stdio, sock: self.pod.crun.exec(
                c.id,
                pfile,
                os.path.join(c.bundle, f"{req.exec_id}.pid"),
                stdio,
                sock,
                process_command(process),
            ),
            self.pod.reaper,
        )
        c.execs[req.exec_id] = proc
        return pb.ExecProcessResponse(pid=proc.pid)

    async def remove_process(self, req: pb.RemoveProcessRequest) -> pb.Empty:
        c = self.pod.container(req.container_id)
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
        close_process_streams(p)
        for name in (f"exec-{req.exec_id}.json", f"{req.exec_id}.pid"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(c.bundle, name))
        del c.execs[req.exec_id]
        return pb.Empty()

    async def signal_process(self, req: pb.SignalProcessRequest) -> pb.Empty:
        p = self.pod.process(req.container_id, req.exec_id)
        if req.all:
            await self.pod.crun.kill(req.container_id, req.signal, all_processes=True)
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
        p = self.pod.process(req.container_id, req.exec_id)
        if p.exit is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, "process was never started")
        return pb.WaitProcessResponse(status=await asyncio.shield(p.exit))

    async def list_processes(self, req: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
        c = self.pod.container(req.container_id)
        return pb.ListProcessesResponse(pids=cgroup.list_pids(cgroup.container_cgroup(c.id)))
