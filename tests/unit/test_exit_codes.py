"""A command that cannot be started: told apart in the guest (crun's failure), carried
to the host as a reason (google.rpc.ErrorInfo in the ttrpc status), raised there as
CommandNotFound / CommandNotExecutable, and `carapace run` exits 127 / 126 as docker."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from carapace.agent.client import AgentClient
from carapace.cli import main as cli
from carapace.errors import (
    AgentError,
    CommandFailed,
    CommandNotExecutable,
    CommandNotFound,
    InvalidArgument,
    agent_error,
)
from carapace.guest import crun as crun_mod
from carapace.guest.crun import (
    Crun,
    CrunError,
    command_failure,
    command_failure_text,
    process_command,
)
from carapace.guest.reaper import Reaper
from carapace.guest.server import guard
from carapace.protocols import agent_pb2 as pb
from carapace.protocols import status_pb2
from carapace.ttrpc import Code, TtrpcError
from carapace.ttrpc.errors import DOMAIN, to_ttrpc_error

NOT_FOUND = CommandNotFound.reason
NOT_EXECUTABLE = CommandNotExecutable.reason

# -- the guest: crun's words ----------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        # what crun 1.8.1 says in the guest (seen through `carapace run`)
        ("executable file `nosuchcmd` not found in $PATH: No such file or directory", NOT_FOUND),
        ("executable file `/bin/nosuch` not found in $PATH: No such file or directory", NOT_FOUND),
        ("open executable: Permission denied", NOT_EXECUTABLE),  # a file without x
        ("open executable: Operation not permitted", NOT_EXECUTABLE),  # a directory
        ("exec container process `/bin/x`: No such file or directory", NOT_FOUND),
        ("exec container process `/bin/x`: Permission denied", NOT_EXECUTABLE),
        # an earlier line of the log does not hide the command's failure
        ("some warning; open executable: Permission denied", NOT_EXECUTABLE),
        # not the command's fault: runc and docker give 125 for these too
        ("open executable: Not a directory", ""),
        ("exec container process `/bin/x`: Exec format error", ""),
        ("mount `/proc` to `proc`: No such file or directory", ""),
        ("open `/dev/null`: Permission denied", ""),
        ("chdir to `/nowhere`: No such file or directory", ""),
        ("", ""),
    ],
)
def test_command_failure_is_told_apart(message: str, reason: str) -> None:
    assert command_failure(message) == reason


@pytest.mark.parametrize(
    ("reason", "command", "text", "docker_phrase"),
    [
        (
            NOT_FOUND,
            "nosuchcmd",
            'exec: "nosuchcmd": executable file not found in $PATH',
            "executable file not found",
        ),
        (
            NOT_FOUND,
            "/bin/nosuch",
            'exec: "/bin/nosuch": stat /bin/nosuch: no such file or directory',
            "no such file or directory",
        ),
        (NOT_EXECUTABLE, "/etc", 'exec: "/etc": permission denied', "permission denied"),
    ],
)
def test_command_failure_text_is_runcs(
    reason: str, command: str, text: str, docker_phrase: str
) -> None:
    # docker maps its runtime's message to 127/126 by these lower-case phrases
    assert command_failure_text(reason, command) == text
    assert docker_phrase in text


def test_command_failure_text_quotes_a_hostile_command() -> None:
    text = command_failure_text(NOT_EXECUTABLE, 'a"b\n')
    assert text == 'exec: "a\\"b\\n": permission denied'


@pytest.mark.parametrize(
    ("process", "command"),
    [
        ({"args": ["sh", "-c", "true"]}, "sh"),
        ({"args": []}, ""),
        ({"args": "sh"}, ""),
        ({}, ""),
        (None, ""),
    ],
)
def test_process_command(process: object, command: str) -> None:
    assert process_command(process) == command


def _fake_crun(tmp_path: Path, message: str) -> str:
    """A crun that writes ``message`` to its JSON log and fails, as crun does."""
    script = tmp_path / "crun"
    entry = json.dumps({"msg": message, "level": "error"})
    script.write_text(
        "#!/bin/sh\n"
        'for a; do case "$a" in file:*) log="${a#file:}";; esac; done\n'
        f"printf '%s\\n' '{entry}' > \"$log\"\n"
        "exit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


async def _crun_create(logs: Path, command: str) -> CrunError:
    reaper = Reaper()
    reaper.install()
    crun = Crun(reaper, log_dir=str(logs))
    with pytest.raises(CrunError) as info:
        await crun.create("c1", "/bundle", "/bundle/init.pid", None, None, command)
    return info.value


@pytest.mark.parametrize(
    ("message", "command", "reason", "text"),
    [
        (
            "executable file `nosuchcmd` not found in $PATH: No such file or directory",
            "nosuchcmd",
            NOT_FOUND,
            'crun create c1: exec: "nosuchcmd": executable file not found in $PATH',
        ),
        (
            "open executable: Permission denied",
            "/etc/passwd",
            NOT_EXECUTABLE,
            'crun create c1: exec: "/etc/passwd": permission denied',
        ),
        (
            "mount `/proc` to `proc`: Operation not permitted",
            "sh",
            "",
            "crun create c1: mount `/proc` to `proc`: Operation not permitted",
        ),
    ],
)
def test_crun_create_failure_carries_the_reason(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    message: str,
    command: str,
    reason: str,
    text: str,
) -> None:
    monkeypatch.setattr(crun_mod, "CRUN", _fake_crun(tmp_path, message))
    err = asyncio.run(_crun_create(tmp_path / "logs", command))
    assert (err.reason, str(err)) == (reason, text)


# -- the wire: the reason in the ttrpc status -----------------------------------------


def _round_trip(e: TtrpcError) -> TtrpcError:
    wire = e.to_status().SerializeToString()
    return TtrpcError.from_status(status_pb2.Status.FromString(wire))


def test_reason_crosses_the_wire() -> None:
    back = _round_trip(TtrpcError(Code.INTERNAL, "crun create c1: ...", NOT_FOUND))
    assert (back.code, back.message, back.reason) == (
        Code.INTERNAL,
        "crun create c1: ...",
        NOT_FOUND,
    )


def test_no_reason_no_details() -> None:
    e = TtrpcError(Code.INTERNAL, "boom")
    assert list(e.to_status().details) == []
    assert _round_trip(e).reason == ""


def test_reason_of_another_domain_or_type_is_not_taken() -> None:
    status = status_pb2.Status(code=int(Code.INTERNAL), message="x")
    status.details.add().Pack(status_pb2.ErrorInfo(reason=NOT_FOUND, domain="example.com"))
    status.details.add().Pack(status_pb2.Status(code=5, message=NOT_FOUND))
    assert TtrpcError.from_status(status).reason == ""
    status.details.add().Pack(status_pb2.ErrorInfo(reason=NOT_EXECUTABLE, domain=DOMAIN))
    assert TtrpcError.from_status(status).reason == NOT_EXECUTABLE


def test_an_unknown_code_keeps_the_reason() -> None:
    status = status_pb2.Status(code=99, message="x")
    status.details.add().Pack(status_pb2.ErrorInfo(reason=NOT_FOUND, domain=DOMAIN))
    e = TtrpcError.from_status(status)
    assert (e.code, e.reason) == (Code.UNKNOWN, NOT_FOUND)


def test_agent_guard_answers_crun_failure_with_its_reason() -> None:
    async def handler(req: Any) -> pb.Empty:
        raise CrunError('crun create c1: exec: "x": permission denied', NOT_EXECUTABLE)

    with pytest.raises(TtrpcError) as info:
        asyncio.run(guard("CreateContainer", handler)(pb.CreateContainerRequest()))
    assert (info.value.code, info.value.reason) == (Code.INTERNAL, NOT_EXECUTABLE)


def test_shim_answer_keeps_the_reason() -> None:
    e = to_ttrpc_error(CommandNotFound("agent CreateContainer: ..."))
    assert (e.code, e.reason) == (Code.UNKNOWN, NOT_FOUND)
    assert to_ttrpc_error(InvalidArgument("bad")).reason == ""


# -- the host: error types and exit codes ----------------------------------------------


@pytest.mark.parametrize(
    ("reason", "cls", "exit_code"),
    [
        (NOT_FOUND, CommandNotFound, 127),
        (NOT_EXECUTABLE, CommandNotExecutable, 126),
        ("", AgentError, 125),
        ("SOMETHING_ELSE", AgentError, 125),
    ],
)
def test_agent_error_by_reason(reason: str, cls: type[AgentError], exit_code: int) -> None:
    e = agent_error("agent CreateContainer: ...", reason)
    assert type(e) is cls
    assert isinstance(e, AgentError)
    assert e.exit_code == exit_code
    assert isinstance(e, CommandFailed) == bool(cls is not AgentError)


class _FailingClient:
    def __init__(self, error: TtrpcError) -> None:
        self.error = error

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


def test_agent_client_raises_command_not_found() -> None:
    text = 'crun create main: exec: "nosuchcmd": executable file not found in $PATH'
    agent = AgentClient(_FailingClient(TtrpcError(Code.INTERNAL, text, NOT_FOUND)))  # type: ignore[arg-type]
    with pytest.raises(CommandNotFound) as info:
        asyncio.run(agent.start_container("main"))
    assert "executable file not found" in str(info.value)
    assert info.value.exit_code == 127


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (CommandNotFound('agent CreateContainer: exec: "x": executable file not found'), 127),
        (CommandNotExecutable('agent CreateContainer: exec: "/etc": permission denied'), 126),
        (AgentError("agent CreateContainer: crun create main: mount failed"), 125),
    ],
)
def test_carapace_run_exit_status(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    error: AgentError,
    status: int,
) -> None:
    async def failing_run(cfg: Any, args: Any) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_run", failing_run)
    config = tmp_path / "configuration.toml"
    config.write_text("")
    assert cli.main(["--config", str(config), "run", "--", "x"]) == status
    assert capsys.readouterr().err == f"carapace: {error}\n"
