"""The host's typed client of the guest agent API (ttrpc over virtio-serial)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from google.protobuf.message import Message

from carapace.errors import AgentError
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Client, TtrpcError

SERVICE = "carapace.agent.v1.Agent"
M = TypeVar("M", bound=Message)
DEFAULT_TIMEOUT = 60.0


class AgentClient:
    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def connect(cls, socket_path: str, attempts: int = 100) -> AgentClient:
        last: Exception | None = None
        for _ in range(attempts):
            try:
                return cls(await Client.connect_unix(socket_path))
            except (ConnectionRefusedError, FileNotFoundError) as e:
                last = e
                await asyncio.sleep(0.02)
        raise AgentError(f"cannot connect to the agent socket {socket_path}: {last}")

    async def _call(
        self, method: str, req: Message, resp: type[M], timeout: float | None = DEFAULT_TIMEOUT
    ) -> M:
        try:
            return await self.client.call(SERVICE, method, req, resp, timeout=timeout)
        except TtrpcError as e:
            raise AgentError(f"agent {method}: {e.message} ({e.code.name})") from e

    async def close(self) -> None:
        await self.client.close()

    async def check(self, timeout: float | None) -> bool:
        r = await self._call("Check", pb.CheckRequest(), pb.HealthCheckResponse, timeout)
        return r.status == pb.HealthCheckResponse.SERVING

    async def guest_details(self) -> pb.GuestDetailsResponse:
        return await self._call(
            "GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse
        )

    async def version(self) -> pb.VersionCheckResponse:
        return await self._call("Version", pb.CheckRequest(), pb.VersionCheckResponse)

    async def create_sandbox(
        self, sandbox_id: str, hostname: str, storages: list[pb.Storage]
    ) -> None:
        await self._call(
            "CreateSandbox",
            pb.CreateSandboxRequest(sandbox_id=sandbox_id, hostname=hostname, storages=storages),
            pb.Empty,
        )

    async def destroy_sandbox(self, timeout: float) -> None:
        await self._call("DestroySandbox", pb.DestroySandboxRequest(), pb.Empty, timeout)

    async def create_container(
        self, container_id: str, spec: dict[str, Any], rootfs: str, overlay: bool
    ) -> None:
        await self._call(
            "CreateContainer",
            pb.CreateContainerRequest(
                container_id=container_id,
                oci_spec=json.dumps(spec).encode(),
                rootfs=rootfs,
                rootfs_overlay=overlay,
            ),
            pb.Empty,
        )

    async def start_container(self, container_id: str) -> int:
        r = await self._call(
            "StartContainer",
            pb.StartContainerRequest(container_id=container_id),
            pb.StartContainerResponse,
        )
        return r.pid

    async def remove_container(self, container_id: str, timeout: int = 10) -> None:
        await self._call(
            "RemoveContainer",
            pb.RemoveContainerRequest(container_id=container_id, timeout_seconds=timeout),
            pb.Empty,
            timeout + 30,
        )

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> int:
        r = await self._call(
            "ExecProcess",
            pb.ExecProcessRequest(
                container_id=container_id, exec_id=exec_id, process=json.dumps(process).encode()
            ),
            pb.ExecProcessResponse,
        )
        return r.pid

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all_processes: bool = False
    ) -> None:
        await self._call(
            "SignalProcess",
            pb.SignalProcessRequest(
                container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes
            ),
            pb.Empty,
        )

    async def wait_process(self, container_id: str, exec_id: str = "") -> int:
        r = await self._call(
            "WaitProcess",
            pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id),
            pb.WaitProcessResponse,
            None,
        )
        return r.status

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        r = await self._call(
            "WriteStdin",
            pb.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data),
            pb.WriteStreamResponse,
            None,
        )
        return r.len

    async def read_stream(
        self, stream: str, container_id: str, exec_id: str, length: int = 0
    ) -> tuple[bytes, bool]:
        """(data, eof) from the process's "stdout" or "stderr"."""
        method = "ReadStdout" if stream == "stdout" else "ReadStderr"
        r = await self._call(
            method,
            pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=length),
            pb.ReadStreamResponse,
            None,
        )
        return r.data, r.eof

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._call(
            "CloseStdin", pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id), pb.Empty
        )

    async def tty_win_resize(
        self, container_id: str, exec_id: str, rows: int, columns: int
    ) -> None:
        await self._call(
            "TtyWinResize",
            pb.TtyWinResizeRequest(
                container_id=container_id, exec_id=exec_id, row=rows, column=columns
            ),
            pb.Empty,
        )
