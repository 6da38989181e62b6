"""Volumes (issue 13) through the Python API and ``carapace run -v``: host directories
and single files bound into containers, read-write and read-only, over virtio-fs (the
default) and virtio-9p; what is refused; and a virtiofsd killed under a running pod.

One sandbox with four volumes (module fixture ``vols``) serves the tests that only use
volumes; the CLI, 9p and fault tests boot their own. The leak check of conftest.py
runs after each test (no QEMU, virtiofsd, run dir or mount of carapace's left); the
shared sandbox's own end is checked by its fixture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import carapace
from carapace.config import Config, HypervisorConfig, load_config
from carapace.errors import CarapaceError, InvalidArgument

from .conftest import CARAPACE, RUN_ROOT, qemu_pids, virtiofsd_pids
from .procs import processes

BIG = 8 << 20  # the 8 MiB files that cross a volume both ways
EROFS = b"Read-only file system"
#: How long a change the host makes may take to show in the guest (virtio-fs's cache
#: timeout is about 1 s; the issue allows 5 s for configmaps).
LIVE_WITHIN = 5.0


# -- helpers ----------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def virtiofsd_of(run_dir: Path) -> set[int]:
    """The virtiofsd processes serving ``<run_dir>/shared`` (the daemon and its child)."""
    pattern = re.compile(rb"(^|[,\s])source=" + re.escape(str(run_dir).encode()) + rb"/shared(,|$)")
    return {
        pid
        for pid, argv in processes()
        if argv[0].endswith(b"virtiofsd") and any(pattern.search(a) for a in argv)
    }


def mounts_of(sandbox_id: str) -> list[str]:
    """Host mount points under the sandbox's run dir."""
    prefix = f"{RUN_ROOT / sandbox_id}/"
    with open("/proc/self/mounts") as f:
        return [
            line.split()[1]
            for line in f
            if line.split()[1].startswith(prefix) or line.split()[1] == prefix[:-1]
        ]


def state_of(run_dir: Path) -> dict[str, Any]:
    data = json.loads((run_dir / "state.json").read_text())
    assert isinstance(data, dict)
    return data


def fstype_in_guest(sb: carapace.Sandbox, destination: str) -> str:
    """The filesystem type of the mount at ``destination`` in a container."""
    r = sb.run(["cat", "/proc/mounts"])
    assert r.exit_code == 0, r.stderr
    types = [f.split()[2] for f in r.text.splitlines() if f.split()[1] == destination]
    assert types, f"nothing mounted at {destination} in the container:\n{r.text}"
    return types[-1]  # the topmost


def assert_erofs(r: carapace.RunResult, what: str) -> None:
    assert r.exit_code != 0, f"{what}: succeeded on a read-only volume"
    assert EROFS in r.stderr, f"{what}: exit {r.exit_code}, stderr {r.stderr!r}"


def wait_for(what: str, cond: Any, timeout: float) -> float:
    """Poll ``cond()`` until true; the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


class Background:
    """``sb.run(argv)`` in a thread (``run`` blocks until the container exits)."""

    def __init__(self, sb: carapace.Sandbox, argv: list[str]) -> None:
        self.result: carapace.RunResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(sb, argv), daemon=True)
        self.thread.start()

    def _run(self, sb: carapace.Sandbox, argv: list[str]) -> None:
        try:
            self.result = sb.run(argv)
        except BaseException as e:  # reported by join()
            self.error = e

    def join(self, timeout: float = 120.0) -> carapace.RunResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the container still runs after {timeout}s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New content in the same inode (what a bind mount of a file follows)."""
    with path.open("r+b") as f:
        f.truncate(0)
        f.write(data)


def assert_sandbox_gone(sb: carapace.Sandbox, run_dir: Path, qemu_pid: int) -> None:
    wait_for("QEMU to end", lambda: qemu_pid not in qemu_pids(), 30)
    wait_for("virtiofsd to end", lambda: not virtiofsd_of(run_dir), 30)
    assert not run_dir.exists(), f"run dir {run_dir} left"
    assert not mounts_of(sb.id), mounts_of(sb.id)


def config_with(shared_fs: str) -> Config:
    cfg = load_config()
    cfg.hypervisor = dataclasses.replace(cfg.hypervisor, shared_fs=shared_fs)
    return cfg


# -- the shared sandbox -----------------------------------------------------------------------


@dataclass
class Vols:
    sb: carapace.Sandbox
    rw: Path  # -> /data
    ro: Path  # -> /ro (ro); holds top.txt and sub/inside.txt
    file_ro: Path  # -> /etc/x (ro)
    file_rw: Path  # -> /etc/y


RO_TOP = b"top of the read-only volume\n"
RO_INSIDE = b"inside a subdirectory\n"
X_V1 = b"x, version one\n"


@pytest.fixture(scope="module")
def vols(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vols]:
    base = tmp_path_factory.mktemp("vols")
    rw, ro = base / "rw", base / "ro"
    rw.mkdir()
    (ro / "sub").mkdir(parents=True)
    (ro / "top.txt").write_bytes(RO_TOP)
    (ro / "sub" / "inside.txt").write_bytes(RO_INSIDE)
    file_ro, file_rw = base / "x.conf", base / "y.conf"
    file_ro.write_bytes(X_V1)
    file_rw.write_bytes(b"y from the host\n")
    volumes = {
        str(rw): "/data",
        str(ro): "/ro:ro",
        str(file_ro): "/etc/x:ro",
        str(file_rw): "/etc/y",
    }
    with carapace.Sandbox(cpus=1, memory="1G", volumes=volumes) as sb:
        run_dir, qemu_pid = sb.run_dir, sb.qemu_pid
        yield Vols(sb, rw, ro, file_ro, file_rw)
    assert_sandbox_gone(sb, run_dir, qemu_pid)


# -- read-write, read-only, file binds --------------------------------------------------------


def test_rw_volume_carries_8mib_both_ways(vols: Vols) -> None:
    sb = vols.sb
    # the container writes, the host reads the same bytes
    r = sb.run(["sh", "-c", f"head -c {BIG} /dev/urandom > /data/big && sha256sum /data/big"])
    assert r.exit_code == 0, r.stderr
    digest = r.text.split()[0]
    data = (vols.rw / "big").read_bytes()
    assert len(data) == BIG
    assert sha256(data) == digest
    # the host writes (after the VM booted), the container reads the same bytes
    payload = os.urandom(BIG)
    (vols.rw / "from-host").write_bytes(payload)
    r = sb.run(["sha256sum", "/data/from-host"])
    assert r.exit_code == 0, r.stderr
    assert r.text.split()[0] == sha256(payload)
    every_byte = bytes(range(256)) * 16
    (vols.rw / "small").write_bytes(every_byte)
    assert sb.run(["cat", "/data/small"]).stdout == every_byte
    # directories made in the container are the host's
    r = sb.run(["sh", "-c", "mkdir -p /data/d/e && echo deep > /data/d/e/f"])
    assert r.exit_code == 0, r.stderr
    assert (vols.rw / "d" / "e" / "f").read_bytes() == b"deep\n"
    # and a removal too
    assert sb.run(["rm", "/data/big"]).exit_code == 0
    assert not (vols.rw / "big").exists()


def test_rw_volume_is_live_while_a_container_runs(vols: Vols) -> None:
    """The host writes into the volume while a container runs: the running container
    sees it (a share, not a copy made when the container started)."""
    sb = vols.sb
    late = vols.rw / "late"
    late.unlink(missing_ok=True)
    script = (
        "echo up > /data/ready-late; i=0; "
        "while [ $i -lt 300 ]; do "
        "  if [ -f /data/late ]; then "
        "    cat /data/late > /data/t && mv /data/t /data/seen-late; exit 0; "
        "  fi; "
        "  i=$((i+1)); sleep 0.1; "
        "done; exit 1"
    )
    bg = Background(sb, ["sh", "-c", script])
    try:
        wait_for("the container to start", lambda: (vols.rw / "ready-late").exists(), 120)
        (vols.rw / "late.tmp").write_bytes(b"written while it ran\n")
        (vols.rw / "late.tmp").rename(late)
        took = wait_for("the container to see the host's file", (vols.rw / "seen-late").exists, 60)
    finally:
        result = bg.join()
    assert result.exit_code == 0, result
    assert (vols.rw / "seen-late").read_bytes() == b"written while it ran\n"
    assert took < LIVE_WITHIN, took


def test_ro_volume_refuses_writes_also_in_a_subdirectory(vols: Vols) -> None:
    sb = vols.sb
    assert sb.run(["cat", "/ro/top.txt"]).stdout == RO_TOP
    assert sb.run(["cat", "/ro/sub/inside.txt"]).stdout == RO_INSIDE
    for path in ("/ro/new", "/ro/top.txt", "/ro/sub/new", "/ro/sub/inside.txt"):
        assert_erofs(sb.run(["sh", "-c", f"echo x > {path}"]), f"write {path}")
    assert_erofs(sb.run(["mkdir", "/ro/sub/d"]), "mkdir /ro/sub/d")
    assert_erofs(sb.run(["rm", "/ro/sub/inside.txt"]), "rm /ro/sub/inside.txt")
    assert_erofs(sb.run(["touch", "/ro/sub/inside.txt"]), "touch /ro/sub/inside.txt")
    # the host's files are untouched
    assert sorted(p.relative_to(vols.ro).as_posix() for p in vols.ro.rglob("*")) == [
        "sub",
        "sub/inside.txt",
        "top.txt",
    ]
    assert (vols.ro / "top.txt").read_bytes() == RO_TOP
    assert (vols.ro / "sub" / "inside.txt").read_bytes() == RO_INSIDE


def test_file_binds_ro_and_rw(vols: Vols) -> None:
    sb = vols.sb
    vols.file_ro.write_bytes(X_V1)
    assert sb.run(["cat", "/etc/x"]).stdout == X_V1
    assert_erofs(sb.run(["sh", "-c", "echo y > /etc/x"]), "write /etc/x")
    assert vols.file_ro.read_bytes() == X_V1
    # the rw file: readable, and a write reaches the host file
    r = sb.run(["sh", "-c", "cat /etc/y && echo from-the-container > /etc/y"])
    assert (r.exit_code, r.stdout) == (0, b"y from the host\n"), r.stderr
    assert vols.file_rw.read_bytes() == b"from-the-container\n"
    # a single file, not its directory: the host directory's other files are not there
    r = sb.run(["ls", "/etc"])
    assert "y.conf" not in r.text.split() and "x.conf" not in r.text.split(), r.text


def test_file_bind_is_live_while_a_container_runs(vols: Vols) -> None:
    sb = vols.sb
    vols.file_ro.write_bytes(X_V1)
    for name in ("ready-x", "seen-x"):
        (vols.rw / name).unlink(missing_ok=True)
    script = (
        "cat /etc/x > /data/t && mv /data/t /data/ready-x; i=0; "
        "while [ $i -lt 300 ]; do "
        "  if grep -q 'version two' /etc/x; then "
        "    cat /etc/x > /data/t && mv /data/t /data/seen-x; exit 0; "
        "  fi; "
        "  i=$((i+1)); sleep 0.1; "
        "done; exit 1"
    )
    bg = Background(sb, ["sh", "-c", script])
    try:
        wait_for("the container to start", lambda: (vols.rw / "ready-x").exists(), 120)
        assert (vols.rw / "ready-x").read_bytes() == X_V1
        rewrite_in_place(vols.file_ro, b"x, version two, longer than one\n")
        took = wait_for("the container to see /etc/x change", (vols.rw / "seen-x").exists, 60)
    finally:
        rewrite_in_place(vols.file_ro, b"x, version two, longer than one\n")  # it ends
        result = bg.join()
    assert result.exit_code == 0, result
    assert (vols.rw / "seen-x").read_bytes() == b"x, version two, longer than one\n"
    assert took < LIVE_WITHIN, took
    vols.file_ro.write_bytes(X_V1)


# -- the shared filesystem: virtio-fs by default, one virtiofsd per pod -----------------------


def test_virtio_fs_is_the_default_with_one_daemon_per_pod(vols: Vols) -> None:
    assert HypervisorConfig().shared_fs == "virtio-fs"
    assert load_config().hypervisor.shared_fs == "virtio-fs"  # what the sandbox got
    sb = vols.sb
    pids = virtiofsd_of(sb.run_dir)
    assert pids, f"no virtiofsd with source={sb.run_dir}/shared: {virtiofsd_pids()}"
    # the daemon and at most its namespaced child
    assert len(pids) <= 2, pids
    record = state_of(sb.run_dir).get("virtiofsd")
    assert isinstance(record, dict), state_of(sb.run_dir)
    assert record["pid"] in pids, (record, pids)
    assert record["socket"] == str(sb.run_dir / "virtiofs.sock")
    assert stat.S_ISSOCK(os.stat(record["socket"]).st_mode)
    assert record["source"] == str(sb.run_dir / "shared")
    # the guest sees the volumes (and the rootfs) through virtio-fs
    assert fstype_in_guest(sb, "/data") == "virtiofs"
    assert fstype_in_guest(sb, "/ro") == "virtiofs"


def test_virtio_9p_round_trip_without_virtiofsd(tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    (ro / "sub").mkdir(parents=True)
    rw.mkdir()
    (ro / "sub" / "f").write_bytes(b"9p ro\n")
    before = virtiofsd_pids()
    cfg = config_with("virtio-9p")
    with carapace.Sandbox(
        cpus=1, memory="1G", config=cfg, volumes={str(rw): "/data", str(ro): "/ro:ro"}
    ) as sb:
        assert not virtiofsd_of(sb.run_dir)
        assert virtiofsd_pids() - before == set()
        assert not state_of(sb.run_dir).get("virtiofsd"), state_of(sb.run_dir)
        assert fstype_in_guest(sb, "/data") == "9p"
        r = sb.run(["sh", "-c", f"head -c {BIG} /dev/urandom > /data/big && sha256sum /data/big"])
        assert r.exit_code == 0, r.stderr
        assert sha256((rw / "big").read_bytes()) == r.text.split()[0]
        payload = os.urandom(BIG)
        (rw / "from-host").write_bytes(payload)
        r = sb.run(["sha256sum", "/data/from-host"])
        assert r.text.split()[0] == sha256(payload), r.stderr
        assert sb.run(["cat", "/ro/sub/f"]).stdout == b"9p ro\n"
        assert_erofs(sb.run(["sh", "-c", "echo x > /ro/sub/g"]), "9p: write /ro/sub/g")
        run_dir, qemu_pid = sb.run_dir, sb.qemu_pid
    assert_sandbox_gone(sb, run_dir, qemu_pid)
    assert not (ro / "sub" / "g").exists()


# -- refusals through the Python API ----------------------------------------------------------


def test_python_api_refuses_proc(tmp_path: Path) -> None:
    runs_before = set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()
    with (
        pytest.raises(InvalidArgument) as e,
        carapace.Sandbox(cpus=1, memory="1G", volumes={"/proc": "/p"}) as sb,
    ):
        sb.run(["true"])
    assert "mount at /p (source /proc)" in str(e.value), str(e.value)
    assert "accepted" in str(e.value)
    assert (set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()) == runs_before


# -- carapace run -v --------------------------------------------------------------------------


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CARAPACE, *args], capture_output=True, timeout=timeout)


def test_cli_run_v_rw(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "in.txt").write_bytes(b"from the host\n")
    script = (
        "cat /data/in.txt; head -c 1048576 /dev/urandom > /data/out && sha256sum /data/out; "
        "echo more > /more/m"
    )
    r = cli(
        "run",
        "--memory",
        "1G",
        "-v",
        f"{a}:/data",
        "--volume",
        f"{b}:/more:rw",
        "--",
        "sh",
        "-c",
        script,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "from the host"
    assert lines[1].split()[0] == sha256((a / "out").read_bytes())
    assert (a / "out").stat().st_size == 1 << 20
    assert (b / "m").read_bytes() == b"more\n"


def test_cli_run_v_ro(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "in.txt").write_bytes(b"read me\n")
    r = cli(
        "run",
        "--memory",
        "1G",
        "-v",
        f"{tmp_path}:/data:ro",
        "--",
        "sh",
        "-c",
        "cat /data/in.txt; echo x > /data/sub/f",
    )
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert r.stdout == b"read me\n", r.stderr
    assert EROFS in r.stderr, r.stderr
    assert not (tmp_path / "sub" / "f").exists()


def test_cli_refuses_host_paths_naming_the_mount(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        ("/", "/host"),
        ("/proc", "/p"),
        ("/sys/kernel", "/k"),
        ("/dev/null", "/x"),
        (str(tmp_path / "missing"), "/x"),
        (str(RUN_ROOT), "/x"),
        (load_config().runtime.state_dir, "/s"),
        (str(fifo), "/f"),
    ]
    for source, destination in cases:
        runs_before = set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()
        r = cli("run", "--memory", "1G", "-v", f"{source}:{destination}", "--", "true")
        err = r.stderr.decode()
        assert r.returncode == 125, (source, r.returncode, err)
        assert f"mount at {destination} (source {source})" in err, (source, err)
        assert "accepted" in err, (source, err)
        assert (set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()) == runs_before, source


# -- faults -----------------------------------------------------------------------------------


def test_virtiofsd_killed_then_close_releases_everything(tmp_path: Path) -> None:
    sb = carapace.Sandbox(cpus=1, memory="1G", volumes={str(tmp_path): "/data"})
    sb.start()
    try:
        run_dir, qemu_pid = sb.run_dir, sb.qemu_pid
        assert sb.run(["sh", "-c", "echo before > /data/f"]).exit_code == 0
        assert (tmp_path / "f").read_bytes() == b"before\n"
        record = state_of(run_dir)["virtiofsd"]
        pids = virtiofsd_of(run_dir)
        assert record["pid"] in pids, (record, pids)
        os.kill(record["pid"], signal.SIGKILL)
        wait_for("virtiofsd to die", lambda: record["pid"] not in virtiofsd_pids(), 30)
    except BaseException:
        sb.close()
        raise
    # close() may report the lost filesystem, but it must end and release everything
    done: list[BaseException | None] = []

    def close() -> None:
        try:
            sb.close()
            done.append(None)
        except BaseException as e:
            done.append(e)

    t = threading.Thread(target=close, daemon=True)
    t.start()
    t.join(180)
    assert not t.is_alive(), "close() hangs after virtiofsd was killed"
    assert done and (done[0] is None or isinstance(done[0], CarapaceError)), done
    assert_sandbox_gone(sb, run_dir, qemu_pid)
    assert (tmp_path / "f").read_bytes() == b"before\n"  # the host's data is untouched
