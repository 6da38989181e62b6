"""The Python API: a pod VM as a context manager.

    with carapace.Sandbox(cpus=1, memory="1G") as sb:
        r = sb.run(["echo", "hi"])
        assert r.exit_code == 0 and r.stdout == b"hi\\n"

The sandbox's event loop runs in a background thread, so ``run`` may be called from
several threads at once to run containers concurrently in the same VM.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from carapace.config import Config, load_config
from carapace.sandbox import ProcessIO, SandboxOptions
from carapace.sandbox import Sandbox as AsyncSandbox
from carapace.sandbox.netplan import port_forwards
from carapace.storage.volumes import volume_mounts

T = TypeVar("T")


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class Sandbox:
    """A pod VM; containers run in it one after another or concurrently."""

    def __init__(
        self,
        cpus: float | str | None = None,
        memory: str | int | None = None,
        sandbox_id: str | None = None,
        config: Config | None = None,
        annotations: dict[str, str] | None = None,
        net: str | None = None,
        ports: dict[int, int] | None = None,
        volumes: dict[str, str] | None = None,
    ) -> None:
        """``cpus``/``memory`` size the VM (0.5 to the host's CPUs, 1G to 256G; default:
        configuration.toml); ``annotations`` are the pod's, as a runtime would get them
        (e.g. com.github.containers.virtcontainers.sandbox_cpu); ``net`` is "none"
        (loopback only, the default), "user" (user-mode NAT, ``ports`` forwards host
        ports on 127.0.0.1 to guest ports: ``{8080: 80}``) or "netns:PATH".
        ``volumes`` binds host directories or files into every container ``run``
        starts: ``{"/srv/data": "/data", "/etc/app.conf": "/etc/app.conf:ro"}``."""
        self._config = config or load_config()
        # validates the arguments before anything is started
        self._sandbox = AsyncSandbox(
            self._config,
            SandboxOptions(
                cpus=cpus,
                memory=memory,
                sandbox_id=sandbox_id,
                annotations=annotations or {},
                net=net,
                ports=port_forwards(ports or {}),
                volumes=volume_mounts(volumes or {}),
            ),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self._sandbox.id

    @property
    def boot_id(self) -> str:
        return self._sandbox.boot_id

    @property
    def template(self) -> str:
        """The key of the VM template the pod was restored from ("": it booted)."""
        return self._sandbox.template

    @property
    def pooled(self) -> bool:
        """Whether the pod's VM was taken from the pool of pre-booted VMs."""
        return self._sandbox.pooled

    @property
    def qemu_pid(self) -> int:
        return self._sandbox.vm_pid

    @property
    def run_dir(self) -> Path:
        return self._sandbox.run_dir

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the sandbox is not started; use `with Sandbox(...) as sb:`")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> Sandbox:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, daemon=True, name=f"carapace-{self.id}"
        )
        self._thread.start()
        self._loop = loop
        try:
            self._call(self._sandbox.start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._sandbox.destroy())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            loop.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(
        self,
        args: list[str],
        *,
        stdin: bytes | None = None,
        env: list[str] | None = None,
        cwd: str = "/",
        rootfs: str | Path | None = None,
    ) -> RunResult:
        """Run ``args`` in a new container of this sandbox and wait for it."""
        out: list[bytes] = []
        err: list[bytes] = []

        async def source() -> Any:
            if stdin:
                for i in range(0, len(stdin), 1 << 20):
                    yield stdin[i : i + (1 << 20)]

        io = ProcessIO(
            stdin=source() if stdin is not None else None, stdout=out.append, stderr=err.append
        )
        code = self._call(
            self._sandbox.run(
                args, env=env, cwd=cwd, io=io, rootfs=Path(rootfs) if rootfs else None
            )
        )
        return RunResult(code, b"".join(out), b"".join(err))

    def guest_details(self) -> Any:
        return self._call(self._sandbox.guest_details())

    def call_async(self, fn: Callable[[AsyncSandbox], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn(sandbox)`` on this sandbox's event loop and return its result:
        the way to the asyncio Sandbox (and its agent client) from synchronous code,
        e.g. ``sb.call_async(lambda s: s.start_container("c1"))``."""
        return self._call(fn(self._sandbox))
