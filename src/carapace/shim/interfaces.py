"""What the shim's Task service needs from the rest of carapace, as Protocols: the pod's
sandbox (``carapace.sandbox.Sandbox``) and an event publisher
(``carapace.shim.events.Publisher``). Unit tests give the service fakes of both."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.message import Message

from carapace.config import Config
from carapace.hostcgroup import CgroupStats
from carapace.network.stats import InterfaceStats
from carapace.oci import Spec
from carapace.protocols import agent_pb2 as pb
from carapace.sandbox import ProcessIO, Runstate, SandboxOptions


class SandboxLike(Protocol):
    """What the service needs of the pod's sandbox (``carapace.sandbox.Sandbox``)."""

    @property
    def vm_pid(self) -> int: ...

    @property
    def state(self) -> Runstate: ...

    async def start(self) -> None: ...

    async def destroy(self) -> None: ...

    async def wait_vm(self) -> int: ...

    async def oom_event(self) -> str: ...

    def kill_vm(self) -> None: ...

    async def agent_closed(self) -> str: ...

    async def create_container(
        self, container_id: str, spec: Spec, rootfs: Path, /, overlay: bool = True
    ) -> None: ...

    async def start_container(self, container_id: str, /) -> int: ...

    async def remove_container(self, container_id: str, /) -> None: ...

    async def start_exec(
        self, container_id: str, exec_id: str, process: dict[str, Any], /
    ) -> int: ...

    async def remove_exec(self, container_id: str, exec_id: str, /) -> None: ...

    async def kill(
        self, container_id: str, sig: int, exec_id: str, all_processes: bool, /
    ) -> None: ...

    async def relay(
        self, container_id: str, exec_id: str, io: ProcessIO, started: Awaitable[Any], /
    ) -> int: ...

    async def processes(self, container_id: str, /) -> list[int]: ...

    async def pause(self, container_id: str, /) -> None: ...

    async def resume(self, container_id: str, /) -> None: ...

    async def stats(self, container_id: str, /) -> pb.StatsContainerResponse: ...

    def host_stats(self) -> CgroupStats: ...

    async def network_stats(self) -> tuple[InterfaceStats, ...]: ...

    async def update(self, container_id: str, resources: dict[str, Any], /) -> None: ...


#: Makes the pod's sandbox (not started) from the configuration and the options.
SandboxFactory = Callable[[Config, SandboxOptions], SandboxLike]


class EventPublisher(Protocol):
    """Where task events go (``carapace.shim.events.Publisher``)."""

    def publish(self, event: Message) -> None: ...
