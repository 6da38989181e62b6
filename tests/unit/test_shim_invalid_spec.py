"""A hostile bundle reaching the shim's Create (issue 14, item 10): every refusal is
INVALID_ARGUMENT naming what was wrong. Before, an OverflowError, a RecursionError or a
MemoryError escaped the shim's guard, which the ttrpc server answers as UNKNOWN."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from carapace.config import Config
from carapace.protocols import contract
from carapace.protocols.containerd import shim_pb2 as api
from carapace.sandbox import HostFacts, SandboxOptions
from carapace.sandbox.plan import plan_sandbox
from carapace.shim.service import TaskService
from carapace.ttrpc import Code, TtrpcError

POD = "pod1"
HOST = HostFacts(usable_cpus=4, memory_total=8 << 30, file_max=1 << 20, nofile_cap=20000)


class Server:
    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[Any], Awaitable[Message]]] = {}

    def register_typed(self, service: str, method: str, req: Any, handler: Any) -> None:
        self.handlers[method] = handler


class Publisher:
    def __init__(self) -> None:
        self.events: list[Message] = []

    def publish(self, event: Message) -> None:
        self.events.append(event)


def planning_factory(config: Config, options: SandboxOptions) -> Any:
    """What the real Sandbox does first (plan, which refuses bad input); a spec that
    gets past it here is a test failure, not a VM."""
    plan_sandbox(config, options, HOST)
    raise AssertionError("the hostile spec was accepted")


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"x": value}
    return value


SANDBOX = {contract.CRI_CONTAINER_TYPE: "sandbox", contract.CRI_SANDBOX_ID: POD}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"annotations": {contract.SANDBOX_MEM: "9" * 400 + "G"}}, contract.SANDBOX_MEM),
        ({"annotations": {contract.CRI_CPU_QUOTA: "1" + "0" * 400}}, contract.CRI_CPU_QUOTA),
        ({"linux": {"resources": {"cpu": {"quota": 10**400}}}}, "cpu.quota"),
        ({"linux": {"resources": {"cpu": {"cpus": "0-4294967295"}}}}, "cpu.cpus"),
        ({"linux": {"resources": {"memory": []}}}, "memory"),
        ({"linux": []}, "linux"),
        ({"annotations": {"k": 7}}, "annotations"),
        ({"x": nested(500)}, "nested"),
        ({"annotations": {contract.SANDBOX_MEM: "256G"}}, "at most 8G"),
        ({"annotations": {contract.KATA_VCPUS: "2"}}, "enable_annotations"),
    ],
)
def test_a_hostile_spec_is_invalid_argument_not_unknown(
    tmp_path: Path, extra: dict[str, Any], needle: str
) -> None:
    config = tmp_path / "carapace.toml"
    config.write_text("")
    bundle = tmp_path / POD
    (bundle / "rootfs").mkdir(parents=True)
    doc: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"]},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts")]},
    }
    for key, value in extra.items():
        if key == "linux" and isinstance(value, dict):
            value = {**doc["linux"], **value}
        doc[key] = value
    doc["annotations"] = {**SANDBOX, **doc.get("annotations", {})}
    (bundle / "config.json").write_text(json.dumps(doc))

    async def go() -> None:
        service = TaskService(POD, "k8s.io", Publisher(), str(config), planning_factory)
        server = Server()
        service.register(server)  # type: ignore[arg-type]
        with pytest.raises(TtrpcError) as e:
            await server.handlers["Create"](api.CreateTaskRequest(id=POD, bundle=str(bundle)))
        assert e.value.code == Code.INVALID_ARGUMENT, e.value
        assert needle in e.value.message and len(e.value.message) < 600
        assert service.containers == {}

    asyncio.run(asyncio.wait_for(go(), 10))
