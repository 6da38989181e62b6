"""Driving crun, the OCI runtime inside the guest."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence

from carapace.guest.reaper import Reaper
from carapace.protocols.contract import GUEST_STATE_DIR

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/crun"
CRUN_LOGS = f"{GUEST_STATE_DIR}/crun-logs"


class CrunError(Exception):
    pass


def _log_message(log_path: str) -> str:
    """The error lines of crun's JSON log, newest last."""
    msgs = []
    try:
        with open(log_path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    msgs.append(str(entry.get("msg", line.strip())))
                except ValueError:
                    msgs.append(line.strip())
    except OSError:
        pass
    return "; ".join(msgs[-3:])


class Crun:
    """Runs crun commands as children reaped by the agent's Reaper."""

    def __init__(self, reaper: Reaper, log_dir: str = CRUN_LOGS) -> None:
        self.reaper = reaper
        self.log_dir = log_dir
        self._version: str | None = None
        os.makedirs(log_dir, exist_ok=True)

    async def run(
        self,
        args: Sequence[str],
        container_id: str,
        stdio: tuple[int, int, int] | None = None,
    ) -> None:
        """Run ``crun <args>``; raise CrunError with crun's own message on failure."""
        log = os.path.join(self.log_dir, f"{container_id}.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)
        argv = [
            CRUN,
            "--root",
            CRUN_ROOT,
            "--cgroup-manager",
            "cgroupfs",
            "--log",
            f"file:{log}",
            "--log-format",
            "json",
            *args,
        ]
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        try:
            fds = stdio or (null, null, null)
            actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)]
            pid = os.posix_spawn(CRUN, argv, os.environ, file_actions=actions)
        finally:
            os.close(null)
        status = await self.reaper.wait(pid)
        if status != 0:
            msg = _log_message(log) or f"exit status {status}"
            raise CrunError(f"crun {args[0]} {container_id}: {msg}")

    async def create(
        self,
        container_id: str,
        bundle: str,
        pid_file: str,
        stdio: tuple[int, int, int] | None,
        console_socket: str | None,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run([*args, container_id], container_id, stdio)

    async def start(self, container_id: str) -> None:
        await self.run(["start", container_id], container_id)

    async def exec(
        self,
        container_id: str,
        process_file: str,
        pid_file: str,
        stdio: tuple[int, int, int] | None,
        console_socket: str | None,
    ) -> None:
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run([*args, container_id], container_id, stdio)

    async def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(signal)]
        await self.run(args, container_id)

    async def delete(self, container_id: str) -> None:
        await self.run(["delete", "--force", container_id], container_id)

    async def pause(self, container_id: str) -> None:
        await self.run(["pause", container_id], container_id)

    async def resume(self, container_id: str) -> None:
        await self.run(["resume", container_id], container_id)

    async def update(self, container_id: str, resources_file: str) -> None:
        """Apply the OCI LinuxResources JSON in ``resources_file`` to the container."""
        await self.run(["update", f"--resources={resources_file}", container_id], container_id)

    async def version(self) -> str:
        """crun's version line; asked once, since the binary cannot change in the guest."""
        if self._version is None:
            self._version = await self._ask_version()
        return self._version

    async def _ask_version(self) -> str:
        r, w = os.pipe()
        try:
            pid = os.posix_spawn(
                CRUN, [CRUN, "--version"], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)]
            )
        finally:
            os.close(w)
        await self.reaper.wait(pid)
        with os.fdopen(r, "rb") as f:
            first = f.read().decode(errors="replace").splitlines()
        return first[0] if first else ""
