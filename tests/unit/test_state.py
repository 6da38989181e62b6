"""A sandbox's persisted state and releasing what it holds (carapace.sandbox.state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carapace.sandbox.state import (
    STATE_FILE,
    Runstate,
    SandboxRecord,
    pid_alive,
    release,
    stale_sandboxes,
)


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def record(tmp_path: Path, sid: str = "sb1", **kw: object) -> SandboxRecord:
    run_dir = tmp_path / sid
    run_dir.mkdir(parents=True, exist_ok=True)
    return SandboxRecord(id=sid, run_dir=str(run_dir), **kw)  # type: ignore[arg-type]


def wait_exec(proc: subprocess.Popen[bytes], marker: bytes) -> None:
    """Wait until ``proc`` has exec'd, so /proc/<pid>/cmdline shows its own argv."""
    deadline = time.monotonic() + 5
    while marker not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the child did not exec"
        time.sleep(0.01)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed and reaped afterwards whatever happens."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def test_defaults() -> None:
    before = time.time()
    rec = SandboxRecord(id="x", run_dir="/run/carapace/x")
    assert rec.state is Runstate.CREATED
    assert rec.owner_pid == os.getpid()
    assert before <= rec.created_at <= time.time()
    assert rec.path == Path("/run/carapace/x") / STATE_FILE
    assert rec.mounts == [] and rec.containers == []
    assert SandboxRecord(id="y", run_dir="/r").mounts is not rec.mounts


def test_save_load_round_trip(tmp_path: Path) -> None:
    rec = record(
        tmp_path,
        state="running",
        qemu_pid=12345,
        vcpus=2,
        memory_mib=768,
        accel="tcg",
        mounts=["/run/carapace/sb1/shared"],
        containers=["c1", "c2"],
    )
    rec.save()
    assert (tmp_path / "sb1" / "state.json").exists()
    assert sorted(p.name for p in (tmp_path / "sb1").iterdir()) == ["state.json"]
    loaded = SandboxRecord.load(tmp_path / "sb1")
    assert loaded == rec
    # saving again replaces the file
    rec.state = "stopped"
    rec.save()
    assert SandboxRecord.load(tmp_path / "sb1").state == "stopped"


def test_load_ignores_unknown_keys(tmp_path: Path) -> None:
    rec = record(tmp_path)
    rec.save()
    data = json.loads(rec.path.read_text())
    data["added_by_a_newer_version"] = 1
    rec.path.write_text(json.dumps(data))
    assert SandboxRecord.load(tmp_path / "sb1") == rec


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SandboxRecord.load(tmp_path)


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(1)
    assert not pid_alive(0)
    assert not pid_alive(-1)
    assert not pid_alive(dead_pid())


def test_pid_alive_false_for_a_zombie() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not pid_alive(pid)
    finally:
        os.waitpid(pid, 0)


def test_stale_sandboxes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    record(root, "a-dead", owner_pid=dead_pid()).save()
    record(root, "b-live", owner_pid=os.getpid()).save()
    record(root, "c-dead", owner_pid=dead_pid()).save()
    (root / "d-garbage").mkdir()
    (root / "d-garbage" / STATE_FILE).write_text("{not json")
    (root / "e-empty").mkdir()
    (root / "f-wrong-fields").mkdir()
    (root / "f-wrong-fields" / STATE_FILE).write_text('{"nope": 1}')
    assert [r.id for r in stale_sandboxes(root)] == ["a-dead", "c-dead"]


def test_stale_sandboxes_without_run_root(tmp_path: Path) -> None:
    assert stale_sandboxes(tmp_path / "absent") == []


def test_release_removes_run_dir(tmp_path: Path) -> None:
    rec = record(tmp_path, mounts=[str(tmp_path / "sb1" / "not-a-mountpoint")])
    rec.save()
    (tmp_path / "sb1" / "shared").mkdir()
    (tmp_path / "sb1" / "shared" / "f").write_text("x")
    assert release(rec, tmp_path) == []
    assert not (tmp_path / "sb1").exists()


def test_release_spares_a_process_that_is_not_our_qemu(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    procs.append(sleeper)
    wait_exec(sleeper, b"sleep\0")
    rec = record(tmp_path, qemu_pid=sleeper.pid)
    rec.save()
    assert release(rec, tmp_path, kill_wait=1) == []
    assert not (tmp_path / "sb1").exists()
    assert sleeper.poll() is None
    assert pid_alive(sleeper.pid)
    sleeper.kill()
    assert sleeper.wait(5) == -signal.SIGKILL


def test_release_spares_another_sandboxes_qemu(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # the process looks like sandbox sb10's QEMU, not sb1's
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "-name", "carapace-sb10,x=y"]
    )
    procs.append(other)
    wait_exec(other, b"carapace-sb10,")
    rec = record(tmp_path, qemu_pid=other.pid)
    assert release(rec, tmp_path, kill_wait=1) == []
    assert other.poll() is None


def test_release_kills_our_qemu(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    fake_qemu = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(30)",
            "-name",
            "carapace-sb1,debug-threads=on",
        ]
    )
    procs.append(fake_qemu)
    wait_exec(fake_qemu, b"carapace-sb1,")
    rec = record(tmp_path, qemu_pid=fake_qemu.pid)
    rec.save()
    assert release(rec, tmp_path, kill_wait=5) == []
    assert fake_qemu.wait(5) == -signal.SIGKILL
    assert not (tmp_path / "sb1").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a real bind mount")
def test_concurrent_releases_take_turns_and_both_succeed(tmp_path: Path) -> None:
    """containerd runs `shim delete` for every task of a dead shim at once: each
    releases the same pod. The later one must find it released, not fail on a mount
    the other just took away."""
    import threading

    from carapace import linux

    run = tmp_path / "run" / "pod"
    source = tmp_path / "rootfs"
    source.mkdir()
    targets = [run / "shared" / f"c{i}" / "rootfs" for i in range(20)]
    for t in targets:
        t.mkdir(parents=True)
        linux.bind_mount(str(source), str(t))
    rec = SandboxRecord("pod", str(run), mounts=[str(t) for t in targets])
    rec.save()
    results: list[list[str]] = []
    start = threading.Barrier(2)

    def one() -> None:
        start.wait()
        results.append(release(SandboxRecord.load(run), run.parent))

    threads = [threading.Thread(target=one) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for m in linux.mounts_under(str(tmp_path)):
            linux.umount(m, lazy=True)
    assert results == [[], []]
    assert not run.exists()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"run_dir": "RUN/../victim"}, "is not"),
        ({"run_dir": "/etc"}, "is not"),
        ({"run_dir": "RUN/sb2"}, "is not"),  # another sandbox's dir
        ({"id": "../victim"}, "not a sandbox id"),
        ({"id": "sb1\n"}, "not a sandbox id"),
        ({"mounts": ["/etc"]}, "is outside"),
        ({"mounts": ["RUN/sb1/../../etc"]}, "is outside"),
    ],
)
def test_a_planted_record_is_left_alone(tmp_path: Path, change: dict[str, Any], why: str) -> None:
    """A state.json anyone could have written: release acts only inside run_root/<id>."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    rec = record(tmp_path / "run")
    rec.save()
    for k, v in change.items():
        v = [m.replace("RUN", str(tmp_path / "run")) for m in v] if isinstance(v, list) else v
        setattr(rec, k, v.replace("RUN", str(tmp_path / "run")) if isinstance(v, str) else v)
    (problem,) = release(rec, tmp_path / "run")
    assert why in problem and "left alone" in problem
    assert (victim / "precious").exists() and (tmp_path / "run" / "sb1").exists()
