"""carapace's runc command line, driven the way containerd's runc shim and conmon drive
runc (issue 15): real VMs, a subreaper standing in for the engine's shim.

The engines' contract: the pid file exists when ``create`` returns, and that pid is a
host process that stays the caller's descendant, holds the container's network
namespace and stdio, and exits with the container's status; ``start`` returns at
once; errors go to ``--log`` as JSON; nothing is left under ``--root`` after
``delete``.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carapace.config import load_config
from carapace.image.builder import ImageBuilder
from carapace.ocirt.layout import Root
from carapace.protocols.containerd import shim_pb2 as api
from carapace.protocols.containerd import task_types_pb2 as tt
from carapace.shim.params import TASK_SERVICE
from carapace.ttrpc.client import Client

from .conftest import REPO

RUNTIME = str(REPO / ".venv" / "bin" / "carapace-runtime")
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    """This process reaps its orphaned descendants, as conmon and containerd's shim do:
    the stand-in processes stay our descendants and we read their exit status."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


@pytest.fixture(scope="module")
def rootfs() -> Path:
    guest = ImageBuilder(load_config().image_dir).current()
    assert guest is not None
    return Path(guest.rootfs)


class Runtime:
    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.stderr_file = log.with_name("stderr.txt")

    def argv(self, *args: str) -> list[str]:
        return [RUNTIME, "--root", str(self.root), "--log", str(self.log), "--log-format", "json"]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 180, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        if args[0] == "create" or "--detach" in args:
            kw.setdefault("stdout", self.stderr_file.open("a"))
        if "stdout" in kw:
            # the caller's stdio is the container's (the engines' contract): stderr goes
            # to a file, as a pipe read to its end would wait for the container's end
            kw.setdefault("stderr", self.stderr_file.open("a"))
        else:
            kw.setdefault("capture_output", True)
        r = subprocess.run([*self.argv(), *args], text=True, timeout=timeout, check=False, **kw)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def state(self, cid: str) -> dict[str, Any]:
        return json.loads(self("state", cid).stdout)

    def last_error(self) -> str:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return json.loads(lines[-1])["msg"] if lines else ""


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    root = tmp_path / "root"
    r = Runtime(root, tmp_path / "log.json")
    yield r
    for cid in r("list", "-q", check=False).stdout.split():
        r("delete", "--force", cid, check=False)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    assert left in ([], [".lock", "pods"]), f"left under --root: {left}"


def bundle(tmp_path: Path, rootfs: Path, args: list[str], name: str = "b", **extra: Any) -> Path:
    """An engine's bundle: config.json naming the rootfs by an absolute path."""
    b = tmp_path / name
    b.mkdir()
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "oci",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["ro", "nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    for key, value in extra.items():
        spec[key] = value
    (b / "config.json").write_text(json.dumps(spec))
    return b


def reap(pid: int, timeout: float = 60) -> int:
    """The exit status of our descendant ``pid`` (reparented to us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not exit in {timeout}s")


def read_until(fd: int, end: bytes, timeout: float = 60) -> bytes:
    """What ``fd`` gives until ``end`` is seen (b"" is its end of file)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 65536)
            data += chunk
            if not chunk or (end and end in data):
                return data
    raise AssertionError(f"no {end!r} in {timeout}s; got {data!r}")


def reap_all() -> None:
    """Reap stragglers (pod services) so none stays a zombie of ours."""
    while True:
        try:
            got, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if got == 0:
            return


def test_create_start_kill_delete_as_an_engine_does(
    rt: Runtime, rootfs: Path, tmp_path: Path
) -> None:
    script = "echo started; trap 'echo got TERM; exit 7' TERM; while :; do sleep 0.1; done"
    b = bundle(tmp_path, rootfs, ["sh", "-c", script])
    out_r, out_w = os.pipe()
    pid_file = b / "init.pid"
    r = rt("create", "--bundle", str(b), "--pid-file", str(pid_file), "c1", stdout=out_w)
    os.close(out_w)
    pid = int(pid_file.read_text())
    assert Path(f"/proc/{pid}").exists()
    # a real host process in a network namespace of its own, our descendant
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert rt.state("c1")["status"] == "created"
    assert rt.state("c1")["pid"] == pid
    rt("start", "c1")
    assert read_until(out_r, b"started\n") == b"started\n"
    assert rt.state("c1")["status"] == "running"
    rt("kill", "c1", "TERM")
    assert reap(pid) == 7  # the stand-in exits with the container's status
    assert read_until(out_r, b"") == b"got TERM\n"
    os.close(out_r)
    assert rt.state("c1") | {"created": ""} == {
        "ociVersion": "1.0.2",
        "id": "c1",
        "pid": 0,
        "status": "stopped",
        "bundle": str(b),
        "rootfs": str(rootfs),
        "created": "",
        "annotations": {},
        "owner": "",
    }
    r = rt("kill", "c1", "9", check=False)
    assert r.returncode == 1 and rt.last_error() == "container not running"
    rt("delete", "c1")
    r = rt("state", "c1", check=False)
    assert r.returncode == 1 and "does not exist" in rt.last_error()
    assert rt("delete", "--force", "c1", check=False).returncode == 0
    reap_all()


def test_exec_detached_and_in_the_foreground(rt: Runtime, rootfs: Path, tmp_path: Path) -> None:
    b = bundle(tmp_path, rootfs, ["sleep", "600"])
    rt("create", "--bundle", str(b), "--pid-file", str(b / "init.pid"), "c2")
    rt("start", "c2")
    process = {
        "args": ["sh", "-c", "echo in exec; cat; exit 5"],
        "cwd": "/",
        "env": ["A=1", "PATH=/bin"],
    }
    process |= {"user": {"uid": 0, "gid": 0}}
    (b / "process.json").write_text(json.dumps(process))
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    rt(
        "exec", "--process", str(b / "process.json"), "--detach",
        "--pid-file", str(b / "exec.pid"), "c2", stdout=out_w, stdin=in_r,
    )  # fmt: skip
    os.close(out_w)
    os.close(in_r)
    exec_pid = int((b / "exec.pid").read_text())
    assert sorted(json.loads(rt("ps", "--format", "json", "c2").stdout)) == sorted(
        [int((b / "init.pid").read_text()), exec_pid]
    )
    os.write(in_w, b"from stdin\n")
    os.close(in_w)  # the exec's cat ends at our end of file
    assert reap(exec_pid) == 5
    assert read_until(out_r, b"") == b"in exec\nfrom stdin\n"
    os.close(out_r)
    r = rt("exec", "--env", "B=2", "c2", "sh", "-c", "echo $B $(hostname); exit 4", check=False)
    assert (r.returncode, r.stdout) == (4, "2 oci\n"), r.stderr
    r = rt("exec", "c2", "no-such-command", check=False)
    assert r.returncode != 0
    rt("delete", "--force", "c2")
    reap_all()


def test_a_terminal_goes_to_the_console_socket(rt: Runtime, rootfs: Path, tmp_path: Path) -> None:
    b = bundle(tmp_path, rootfs, ["sh"])
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["terminal"] = True
    (b / "config.json").write_text(json.dumps(spec))
    sock_path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    r = rt("create", "--bundle", str(b), "--pid-file", str(b / "pid"),
           "--console-socket", sock_path, "t1")  # fmt: skip
    conn, _ = listener.accept()
    fds = array.array("i")
    _, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    conn.close()
    listener.close()
    master = struct.unpack("i", anc[0][2][: fds.itemsize])[0]
    try:
        rt("start", "t1")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        time.sleep(1)
        os.write(master, b"tty; stty size; echo $((6*7)); exit 3\n")
        seen = b""
        deadline = time.monotonic() + 60
        while b"42\r\n" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        text = seen.decode(errors="replace")
        assert "/dev/pts/" in text and "33 111" in text and "42" in text, text
        assert reap(int((b / "pid").read_text())) == 3
    finally:
        os.close(master)
    rt("delete", "t1")
    reap_all()
    assert r.returncode == 0


def console_listener(path: str) -> socket.socket:
    """An engine's console socket: ``create`` and ``exec --tty`` send the pty master
    to it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    return listener


def receive_master(listener: socket.socket) -> int:
    conn, _ = listener.accept()
    with conn:
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    assert len(fds) == 1, fds
    return fds[0]


async def states_of(sock: str, cid: str, clients: int) -> list[int]:
    """``clients`` connections to the pod's service open at once, each asking the
    container's status: they take the service's lowest free fd numbers."""
    conns = [await Client.connect_unix(sock) for _ in range(clients)]
    try:
        replies = await asyncio.gather(
            *(
                c.call(TASK_SERVICE, "State", api.StateRequest(id=cid), api.StateResponse, 60)
                for c in conns
            )
        )
    finally:
        for c in conns:
            await c.close()
    return [r.status for r in replies]


def test_terminals_in_flight_and_gone_leave_the_container_served(
    rt: Runtime, rootfs: Path, tmp_path: Path
) -> None:
    """The container starts while its pty master is still in flight to the engine
    (the console socket not read yet): its shell sees no end of input. Then execs with
    a terminal come and go: the pod's service closes each one's stdio, and its event
    loop must stop watching those fds first: a later connection given such an fd's
    number was never answered (and the engine was told the container had stopped)."""
    b = bundle(tmp_path, rootfs, ["sh"])
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["terminal"] = True
    (b / "config.json").write_text(json.dumps(spec))
    sock_path = str(tmp_path / "console.sock")
    service_sock = str(Root(rt.root).socket("t2"))
    listener = console_listener(sock_path)
    rt("create", "--bundle", str(b), "--pid-file", str(b / "pid"),
       "--console-socket", sock_path, "t2")  # fmt: skip
    rt("start", "t2")  # the master waits in the console socket, unread
    time.sleep(1)  # the engine takes its time
    master = receive_master(listener)
    try:
        os.write(master, b"echo alive $((6*7))\n")
        assert b"alive 42" in read_until(master, b"alive 42")
        for i in range(2):
            exec_pid_file = b / f"exec{i}.pid"
            rt("exec", "--tty", "--console-socket", sock_path, "--detach",
               "--pid-file", str(exec_pid_file), "t2", "tty")  # fmt: skip
            exec_master = receive_master(listener)
            try:
                assert b"/dev/pts/" in read_until(exec_master, b"/dev/pts/")
                assert reap(int(exec_pid_file.read_text())) == 0
            finally:
                os.close(exec_master)
            assert asyncio.run(states_of(service_sock, "t2", 8)) == [tt.RUNNING] * 8
            assert rt.state("t2")["status"] == "running"
            r = rt("exec", "t2", "echo", f"exec {i}", check=False)
            assert (r.returncode, r.stdout) == (0, f"exec {i}\n"), r.stderr
        os.write(master, b"exit 3\n")
        assert reap(int((b / "pid").read_text())) == 3
    finally:
        os.close(master)
        listener.close()
    rt("delete", "t2")
    reap_all()


def test_hooks_run_on_the_host_and_the_network_they_make_is_the_pods(
    rt: Runtime, rootfs: Path, tmp_path: Path
) -> None:
    """Docker's way: a prestart hook configures the network namespace of the pid it
    reads from the state on stdin; the interface it made is the VM's."""
    hook = tmp_path / "hook.sh"
    hook.write_text(
        '#!/bin/sh\nset -e\nstate=$(cat)\necho "$state" > "$1"\n'
        'pid=$(echo "$state" | sed \'s/.*"pid": *\\([0-9]*\\).*/\\1/\')\n'
        "ip link add ocihook0 type veth peer name ocihook1\n"
        "ip link set ocihook1 netns /proc/$pid/ns/net\n"
        "nsenter --net=/proc/$pid/ns/net ip addr add 10.77.0.2/24 dev ocihook1\n"
        "nsenter --net=/proc/$pid/ns/net ip link set ocihook1 up\n"
    )
    hook.chmod(0o755)
    seen = tmp_path / "prestart.json"
    poststop = tmp_path / "poststop.json"
    hooks = {
        "prestart": [{"path": str(hook), "args": ["hook.sh", str(seen)]}],
        "poststop": [{"path": "/bin/sh", "args": ["sh", "-c", f"cat > {poststop}"]}],
    }
    b = bundle(tmp_path, rootfs, ["sh", "-c", "ip -o -4 addr show"], hooks=hooks)
    out_r, out_w = os.pipe()
    rt("create", "--bundle", str(b), "--pid-file", str(b / "pid"), "h1", stdout=out_w)
    os.close(out_w)
    pid = int((b / "pid").read_text())
    state = json.loads(seen.read_text())
    assert (state["id"], state["pid"], state["bundle"]) == ("h1", pid, str(b))
    rt("start", "h1")
    assert reap(pid) == 0
    assert b"10.77.0.2/24" in read_until(out_r, b"")
    os.close(out_r)
    rt("delete", "h1")
    assert json.loads(poststop.read_text())["status"] == "stopped"
    reap_all()


def test_a_killed_stand_in_stops_the_container(rt: Runtime, rootfs: Path, tmp_path: Path) -> None:
    """dockerd SIGKILLs the pid when a kill did not end the container in time."""
    b = bundle(tmp_path, rootfs, ["sleep", "600"])
    rt("create", "--bundle", str(b), "--pid-file", str(b / "pid"), "k1")
    rt("start", "k1")
    pid = int((b / "pid").read_text())
    os.kill(pid, 9)
    assert reap(pid) == -9
    assert rt.state("k1")["status"] == "stopped"
    rt("delete", "k1")
    reap_all()


def test_podman_pod_members_join_the_infra_containers_vm(
    rt: Runtime, rootfs: Path, tmp_path: Path
) -> None:
    infra = bundle(tmp_path, rootfs, ["sleep", "600"], name="infra")
    rt("create", "--bundle", str(infra), "--pid-file", str(infra / "pid"), "infra1")
    rt("start", "infra1")
    ipid = int((infra / "pid").read_text())
    boot_id = "cat /proc/sys/kernel/random/boot_id"
    member = bundle(
        tmp_path, rootfs, ["sh", "-c", boot_id], name="member",
        annotations={
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.cri-o.SandboxID": "infra1",
        },
        linux={"namespaces": [{"type": "pid"}, {"type": "mount"}] + [
            {"type": t, "path": f"/proc/{ipid}/ns/{n}"}
            for t, n in (("network", "net"), ("ipc", "ipc"), ("uts", "uts"))
        ]},
    )  # fmt: skip
    out_r, out_w = os.pipe()
    rt("create", "--bundle", str(member), "--pid-file", str(member / "pid"), "m1", stdout=out_w)
    os.close(out_w)
    rt("start", "m1")
    assert reap(int((member / "pid").read_text())) == 0
    member_boot = read_until(out_r, b"").decode().strip()
    os.close(out_r)
    r = rt("exec", "infra1", "sh", "-c", boot_id)
    assert r.stdout.strip() == member_boot
    assert member_boot != Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    rt("delete", "m1")
    assert rt.state("infra1")["status"] == "running"  # the pod lives on
    rt("delete", "--force", "infra1")
    reap_all()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}, "host's"),
        ({"hooks": {"createContainer": [{"path": "/bin/true"}]}}, "hooks.createContainer"),
    ],
    ids=["host namespaces", "guest hook"],
)
def test_what_cannot_be_honoured_is_refused_before_anything_exists(
    rt: Runtime, rootfs: Path, tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    b = bundle(tmp_path, rootfs, ["true"], **change)
    r = rt("create", "--bundle", str(b), "--pid-file", str(b / "pid"), "x1", check=False)
    assert r.returncode == 1
    assert expected in rt.last_error() and expected in rt.stderr_file.read_text()
    assert not (b / "pid").exists()
    assert rt("list", "-q").stdout == ""


def test_update_events_pause_and_resume(rt: Runtime, rootfs: Path, tmp_path: Path) -> None:
    b = bundle(tmp_path, rootfs, ["sleep", "600"])
    rt("create", "--bundle", str(b), "--pid-file", str(b / "pid"), "u1")
    rt("start", "u1")
    limit = 200 << 20
    rt("update", "--resources", "-", "u1", input=json.dumps({"memory": {"limit": limit}}))
    r = rt("exec", "u1", "cat", "/sys/fs/cgroup/memory.max")
    assert r.stdout.strip() == str(limit)
    rt("update", "--memory", "300m", "u1")
    assert rt("exec", "u1", "cat", "/sys/fs/cgroup/memory.max").stdout.strip() == str(300 << 20)
    event = json.loads(rt("events", "--stats", "u1").stdout)
    assert (event["type"], event["id"]) == ("stats", "u1")
    assert int(event["data"]["memory"]["usage"]["usage"]) > 0, event
    rt("pause", "u1")
    assert rt.state("u1")["status"] == "paused"
    rt("resume", "u1")
    assert rt.state("u1")["status"] == "running"
    rt("delete", "--force", "u1")
    reap_all()
