"""The pod's sandbox service, as the OCI runtime CLI starts, calls and stops it.

The service is the containerd shim's daemon (``carapace.shim``: the same task API
over ttrpc, the same code) on a socket under ``--root``, publishing no events. The
first container of a pod starts it; every CLI verb is a short client of it; it exits
when its last container is deleted (``Shutdown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from carapace.config import load_config
from carapace.errors import CarapaceError, HostError, NotFound
from carapace.ocirt.layout import PodState, Root, pid_alive
from carapace.protocols.containerd import shim_pb2 as api
from carapace.sandbox.state import STATE_FILE, SandboxRecord, release
from carapace.sandbox.state import pid_alive as sandbox_pid_alive
from carapace.shim import command
from carapace.shim.command import LISTEN_FD_ENV
from carapace.shim.params import TASK_SERVICE
from carapace.ttrpc import Code, TtrpcError
from carapace.ttrpc.client import Client

#: The ttrpc namespace the service runs under (events go nowhere).
NAMESPACE = "carapace-oci"
#: How long ``stop`` waits for a service to exit once it has no containers.
EXIT_WAIT = 30.0

M = TypeVar("M", bound=Message)


class ServiceError(CarapaceError):
    """The service answered with an error (its code kept)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _call(sock: str, method: str, req: Message, resp: type[M], timeout: float | None) -> M:
    try:
        client = await Client.connect_unix(sock)
    except OSError as e:
        raise NotFound(f"the pod's service at {sock} does not answer: {e.strerror}") from e
    try:
        return await client.call(TASK_SERVICE, method, req, resp, timeout=timeout)
    except TtrpcError as e:
        raise ServiceError(e.code, e.message) from e
    finally:
        await client.close()


def call(sock: Path, method: str, req: Message, resp: type[M], timeout: float | None = 300) -> M:
    """One call of the task API, from synchronous code."""
    return asyncio.run(_call(str(sock), method, req, resp, timeout))


def connectable(sock: Path) -> bool:
    return command.connectable(str(sock))


def start(root: Root, pod: str, config_path: str | None, debug: bool) -> PodState:
    """Start the pod's service; it answers on ``root.socket(pod)`` when this returns
    (the socket listens before the process exists)."""
    pod_dir = root.pod_dir(pod)
    pod_dir.mkdir(mode=0o700)
    sock = root.socket(pod)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()  # stale: the caller found nobody answering on it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock))
        os.chmod(sock, 0o600)
        listener.listen(128)
        env = dict(os.environ)
        env[LISTEN_FD_ENV] = str(listener.fileno())
        env.pop("TTRPC_ADDRESS", None)
        if config_path:
            env["CARAPACE_CONFIG"] = config_path
        argv = [sys.executable, "-m", "carapace.shim", "-namespace", NAMESPACE, "-id", pod]
        argv += ["-address", "", "-socket", str(sock)]
        if debug:
            argv.append("-debug")
        with open(pod_dir / "service.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=pod_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
    except OSError as e:
        with contextlib.suppress(OSError):
            sock.unlink()
        raise HostError(f"pod {pod}: cannot start its sandbox service: {e}") from e
    finally:
        listener.close()
    state = PodState(id=pod, pid=proc.pid, config=config_path or "")
    root.save_pod(state)
    return state


def log_tail(root: Root, pod: str, lines: int = 5) -> str:
    """The last lines the service logged (for an error message)."""
    with contextlib.suppress(OSError):
        text = (root.pod_dir(pod) / "service.log").read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])
    return ""


def run_root_of(root: Root, pod: str, config_path: str | None) -> str:
    """The run dir of the pod's sandbox: from the configuration its service was started
    with (Podman runs ``delete`` without the environment ``create`` had)."""
    state = root.load_pod(pod)
    path = (state.config if state is not None else "") or config_path
    try:
        return load_config(path or None).runtime.run_dir
    except CarapaceError:
        return load_config(None).runtime.run_dir


def stop(root: Root, pod: str, run_root: str) -> None:
    """Stop the pod's service (its VM with it), wait for it to exit, and remove the
    pod's directory. A service that does not exit in ``EXIT_WAIT`` is killed and what
    its sandbox left is released from its record, as the shim's ``delete`` does."""
    state = root.load_pod(pod)
    sock = root.socket(pod)
    with contextlib.suppress(CarapaceError):
        call(sock, "Shutdown", api.ShutdownRequest(id=pod, now=True), Empty, timeout=EXIT_WAIT)
    pid = state.pid if state is not None else 0
    deadline = time.monotonic() + EXIT_WAIT
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
    release_sandbox(pod, run_root)
    remove_pod_dir(root, pod)


def release_sandbox(pod: str, run_root: str) -> None:
    """Release what a dead service's sandbox left (VM, mounts, run dir), if anything."""
    run_dir = Path(run_root) / pod
    if not (run_dir / STATE_FILE).exists():
        return
    with contextlib.suppress(OSError, ValueError, TypeError):
        rec = SandboxRecord.load(run_dir)
        if not sandbox_pid_alive(rec.owner_pid):
            release(rec, run_root)


def remove_pod_dir(root: Root, pod: str) -> None:
    pod_dir = root.pod_dir(pod)
    with contextlib.suppress(FileNotFoundError):
        root.socket(pod).unlink()
    for name in ("pod.json", "service.log"):
        with contextlib.suppress(FileNotFoundError):
            (pod_dir / name).unlink()
    with contextlib.suppress(OSError):
        for p in pod_dir.iterdir():
            if p.is_file() or p.is_symlink():
                p.unlink()
        pod_dir.rmdir()
    root.forget_pod_lock(pod)
