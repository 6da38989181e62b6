"""The sealed in-memory copy of crun the agent runs (carapace.guest.crun.sealed_copy):
crun skips its own copy-and-re-execute defence when /proc/self/exe carries exactly
these seals, so the copy must have them, be unchangeable and run."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from carapace.guest import crun as crun_module
from carapace.guest.crun import CRUN_MEMFD_SEALS, Crun, sealed_copy
from carapace.guest.reaper import Reaper

TRUE = shutil.which("true") or "/bin/true"


def test_crun_s_own_seal_set() -> None:
    """crun's cloned_binary.c: F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE."""
    assert CRUN_MEMFD_SEALS == 0x1 | 0x2 | 0x4 | 0x8


def test_the_copy_is_sealed_as_crun_checks_it() -> None:
    fd = sealed_copy(TRUE, "true")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == CRUN_MEMFD_SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # never a child's
    finally:
        os.close(fd)


def test_the_copy_holds_the_file_and_cannot_change() -> None:
    fd = sealed_copy(TRUE, "true")
    try:
        assert os.pread(fd, os.path.getsize(TRUE) + 1, 0) == Path(TRUE).read_bytes()
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"\0", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"\0", os.path.getsize(TRUE))  # no growing either
    finally:
        os.close(fd)


def test_the_copy_runs_from_its_fd() -> None:
    fd = sealed_copy(TRUE, "true")
    try:
        pid = os.posix_spawn(f"/proc/self/fd/{fd}", [TRUE], os.environ)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_missing_binary_makes_no_copy(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sealed_copy(str(tmp_path / "nothing"), "nothing")


def test_crun_runs_its_sealed_copy_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(crun_module, "CRUN", TRUE)
    c = Crun(Reaper(), log_dir=str(tmp_path / "logs"))
    exe = c.executable()
    assert exe.startswith("/proc/self/fd/")
    assert c.executable() == exe
    fd = int(exe.rsplit("/", 1)[1])
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == CRUN_MEMFD_SEALS
    finally:
        os.close(fd)


def test_crun_runs_the_binary_itself_when_no_copy_can_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "crun")
    monkeypatch.setattr(crun_module, "CRUN", missing)
    c = Crun(Reaper(), log_dir=str(tmp_path / "logs"))
    assert c.executable() == missing
    assert f"running {missing} itself" in caplog.text


def test_a_script_runs_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its interpreter opens it by path: from a close-on-exec fd it could not."""
    script = tmp_path / "crun"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    monkeypatch.setattr(crun_module, "CRUN", str(script))
    c = Crun(Reaper(), log_dir=str(tmp_path / "logs"))
    assert c.executable() == str(script)
