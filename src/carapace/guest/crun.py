"""Driving crun, the OCI runtime inside the guest."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Sequence

from carapace.errors import CommandNotExecutable, CommandNotFound
from carapace.guest import CRUN_VERSION_FILE
from carapace.guest.reaper import Reaper
from carapace.protocols.contract import GUEST_STATE_DIR

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/crun"
CRUN_LOGS = f"{GUEST_STATE_DIR}/crun-logs"
#: The seals crun looks for on its own /proc/self/exe (crun's cloned_binary.c,
#: CRUN_MEMFD_SEALS): with them it runs as it is, else every crun command first
#: bind-mounts its binary read-only and executes itself again (its CVE-2019-5736
#: defence), which doubles the cost of each command.
CRUN_MEMFD_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

ELF_MAGIC = b"\x7fELF"

log = logging.getLogger("carapace.agent")


def sealed_copy(path: str, name: str) -> int:
    """A close-on-exec memfd holding a copy of the file ``path``, sealed so that
    nothing can change it any more (crun's own defence, made once: no container
    can write to the binary that runs in it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(src).st_size
            offset = 0
            while offset < size:
                n = os.sendfile(fd, src, offset, size - offset)
                if n == 0:
                    raise OSError(f"{path} ended at {offset} of {size} bytes while copied")
                offset += n
        finally:
            os.close(src)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, CRUN_MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def recorded_version(path: str = CRUN_VERSION_FILE) -> str:
    """The version line the image recorded for its crun, "" if there is none."""
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


class CrunError(Exception):
    """crun failed; ``reason`` is CommandNotFound's or CommandNotExecutable's reason
    when it failed because of the container's command, else ""."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


#: crun's words for a command it cannot run (crun 1.8: ``executable file `X` not
#: found in $PATH: No such file or directory``, ``open executable: Permission
#: denied``, for a directory ``open executable: Operation not permitted``; when the
#: exec itself fails: ``exec container process `X`: <strerror>``).
_COMMAND_CONTEXTS = ("executable file ", "open executable: ", "exec container process ")
_NOT_FOUND_ERRNOS = ("No such file or directory",)
_NOT_EXECUTABLE_ERRNOS = ("Permission denied", "Operation not permitted")


def command_failure(message: str) -> str:
    """The reason of a crun create/exec failure that is about the container's command
    (``CommandNotFound.reason``, ``CommandNotExecutable.reason``), or "" for any other
    failure. The one place crun's text is read for it."""
    for line in reversed(message.split("; ")):
        if not line.startswith(_COMMAND_CONTEXTS):
            continue
        if line.startswith("executable file ") and " not found" in line:
            return CommandNotFound.reason
        if line.endswith(_NOT_FOUND_ERRNOS):
            return CommandNotFound.reason
        if line.endswith(_NOT_EXECUTABLE_ERRNOS):
            return CommandNotExecutable.reason
    return ""


def process_command(process: object) -> str:
    """args[0] of an OCI process object, or "" (crun says what is wrong with it)."""
    args = process.get("args") if isinstance(process, dict) else None
    return str(args[0]) if isinstance(args, list) and args else ""


def command_failure_text(reason: str, command: str) -> str:
    """What runc says for the same failure, which docker and podman read (their exit
    statuses 127 and 126 come from "executable file not found", "no such file or
    directory" and "permission denied")."""
    if reason == CommandNotFound.reason:
        if "/" in command:
            return f"exec: {json.dumps(command)}: stat {command}: no such file or directory"
        return f"exec: {json.dumps(command)}: executable file not found in $PATH"
    return f"exec: {json.dumps(command)}: permission denied"


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
        self._exe: str | None = None
        os.makedirs(log_dir, exist_ok=True)

    def executable(self) -> str:
        """What runs crun: a sealed in-memory copy of it (made at the first command),
        or the binary itself when no copy can be made (crun then copies itself, each
        time)."""
        if self._exe is None:
            try:
                with open(CRUN, "rb") as f:
                    elf = f.read(4) == ELF_MAGIC
                # a script's interpreter opens the script by its path, which a
                # close-on-exec fd no longer has: a script runs as it is
                self._exe = f"/proc/self/fd/{sealed_copy(CRUN, 'crun')}" if elf else CRUN
            except OSError as e:
                log.warning("running %s itself (no sealed copy of it: %s)", CRUN, e)
                self._exe = CRUN
        return self._exe

    async def run(
        self,
        args: Sequence[str],
        container_id: str,
        stdio: tuple[int, int, int] | None = None,
        command: str | None = None,
    ) -> None:
        """Run ``crun <args>``; raise CrunError with crun's own message on failure.
        ``command`` (create, exec): the container's command, whose failure to start is
        told apart (``CrunError.reason``) and said in runc's words."""
        log_path = os.path.join(self.log_dir, f"{container_id}.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_path)
        argv = [
            CRUN,
            "--root",
            CRUN_ROOT,
            "--cgroup-manager",
            "cgroupfs",
            "--log",
            f"file:{log_path}",
            "--log-format",
            "json",
            *args,
        ]
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        try:
            fds = stdio or (null, null, null)
            actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)]
            pid = os.posix_spawn(self.executable(), argv, os.environ, file_actions=actions)
        finally:
            os.close(null)
        status = await self.reaper.wait(pid)
        if status != 0:
            msg = _log_message(log_path) or f"exit status {status}"
            reason = command_failure(msg) if command is not None else ""
            if reason:
                assert command is not None
                msg = command_failure_text(reason, command)
            raise CrunError(f"crun {args[0]} {container_id}: {msg}", reason)

    async def create(
        self,
        container_id: str,
        bundle: str,
        pid_file: str,
        stdio: tuple[int, int, int] | None,
        console_socket: str | None,
        command: str = "",
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run([*args, container_id], container_id, stdio, command)

    async def start(self, container_id: str) -> None:
        await self.run(["start", container_id], container_id)

    async def exec(
        self,
        container_id: str,
        process_file: str,
        pid_file: str,
        stdio: tuple[int, int, int] | None,
        console_socket: str | None,
        command: str = "",
    ) -> None:
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run([*args, container_id], container_id, stdio, command)

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
        """crun's version line: as the image recorded it when it was built, else asked
        (once: the binary cannot change in the guest)."""
        if self._version is None:
            self._version = recorded_version() or await self._ask_version()
        return self._version

    async def _ask_version(self) -> str:
        r, w = os.pipe()
        try:
            pid = os.posix_spawn(
                self.executable(),
                [CRUN, "--version"],
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)],
            )
        finally:
            os.close(w)
        await self.reaper.wait(pid)
        with os.fdopen(r, "rb") as f:
            first = f.read().decode(errors="replace").splitlines()
        return first[0] if first else ""
