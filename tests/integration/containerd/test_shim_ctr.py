"""The carapace shim (``containerd-shim-carapace-v2``) through ``ctr`` against the test
containerd: real VMs, one per container.

A VM boot costs seconds under TCG, so the tests that can share a container use one
long-running container (module fixture ``shared``); the last of them kills it and checks
the events of its whole life. The ``ctr run --rm`` tests boot their own VM each.

ctr 1.6 sends the terminal size (ResizePty) only after it started an exec'd process
(runc behaves the same), so a process that reads its size at once may still see 0x0;
the tty test waits for the size to arrive.

The leak checks (tests/integration/conftest.py) are machine-wide: with other test
sessions or benchmarks running VMs on the host, run this file alone (and pick a rig of
its own with CARAPACE_TEST_RIG).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from carapace.shim.command import SOCKET_DIR, socket_path

from ..conftest import RUN_ROOT, host_kernel, qemu_pids
from .conftest import CtrFn
from .rig import BUSYBOX_IMAGE, CARAPACE, ContainerdRig, netns_names

NAMESPACE = "default"
#: What the guest runs: Debian 12's kernel (6.1), never the host's.
GUEST_KERNEL = re.compile(r"6\.1\.\d+-\d+-(amd64|cloud-amd64)")
#: The shared container: two processes (a shell and a sleep) and a tick per ~0.2 s,
#: the guest's uptime appended to /tmp/ticks (shell builtins only, no fork but sleep).
SHARED_SCRIPT = (
    "sleep 1000 & "
    "while true; do read up idle < /proc/uptime; echo $up >> /tmp/ticks; sleep 0.2; done"
)

#: Every container id this module used (for the final no-socket check).
USED_IDS: list[str] = []
#: Containers that outlive a test on purpose (the shared one while it runs).
ALIVE: set[str] = set()


def new_id(kind: str) -> str:
    cid = f"shim-{kind}-{uuid.uuid4().hex[:8]}"
    USED_IDS.append(cid)
    return cid


def run_argv(cid: str, *cmd: str, options: tuple[str, ...] = ()) -> list[str]:
    return ["run", "--rm", "--runtime", CARAPACE, *options, BUSYBOX_IMAGE, cid, *cmd]


# -- ctr events ---------------------------------------------------------------------------

EVENT_LINE = re.compile(r"^\S+ \S+ \S+ \S+ (?P<ns>\S+) (?P<topic>/\S+) ?(?P<body>.*)$")


@dataclass
class Event:
    namespace: str
    topic: str
    body: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.topic} {json.dumps(self.body)}"


@dataclass
class EventLog:
    """``ctr events`` running in the background, its lines kept in a file."""

    rig: ContainerdRig
    path: Path
    proc: subprocess.Popen[bytes] | None = None
    _seq: int = field(default=0)

    def start(self) -> EventLog:
        with self.path.open("wb") as out:
            self.proc = subprocess.Popen(
                ["ctr", "-a", str(self.rig.socket), "events"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.rig.environment(),
            )
        self.sync()
        return self

    def sync(self, timeout: float = 20.0) -> None:
        """Wait until ``ctr events`` is subscribed: label the namespace (an event of its
        own, /namespaces/update) and wait for that event to come through."""
        self._seq += 1
        token = f"{uuid.uuid4().hex[:8]}-{self._seq}"
        deadline = time.monotonic() + timeout
        while True:
            self.rig.ctr("namespaces", "label", NAMESPACE, f"carapace-test-sync={token}")
            if self.wait_for(lambda e: token in json.dumps(e.body), timeout=1.0, check=False):
                break
            assert time.monotonic() < deadline, f"ctr events saw nothing:\n{self.text()}"
        self.rig.ctr("namespaces", "label", NAMESPACE, "carapace-test-sync=")

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def events(self) -> list[Event]:
        found = []
        for line in self.text().splitlines():
            m = EVENT_LINE.match(line)
            if not m:
                continue
            try:
                body = json.loads(m["body"]) if m["body"] else {}
            except ValueError:
                body = {"unparsed": m["body"]}
            found.append(Event(m["ns"], m["topic"], body))
        return found

    def tasks(self, cid: str) -> list[Event]:
        """The /tasks/* events of one container, in the order containerd sent them."""
        return [
            e
            for e in self.events()
            if e.topic.startswith("/tasks/") and e.body.get("container_id") == cid
        ]

    def wait_for(
        self, pred: Callable[[Event], bool], timeout: float = 30.0, check: bool = True
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(e) for e in self.events()):
                return True
            time.sleep(0.1)
        assert not check, f"no such event in {timeout}s; ctr events printed:\n{self.text()}"
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def event_log(containerd: ContainerdRig, tmp_path: Path) -> Iterator[EventLog]:
    log = EventLog(containerd, tmp_path / "events.txt").start()
    yield log
    log.stop()


def assert_in_order(
    events: list[Event], expected: list[tuple[str, Callable[[dict[str, Any]], bool]]]
) -> None:
    """Each expected (topic, predicate on the body) matches an event after the previous
    match."""
    at = 0
    for topic, pred in expected:
        while at < len(events) and not (events[at].topic == topic and pred(events[at].body)):
            at += 1
        assert at < len(events), (
            f"{topic} (matching the expectation) not found in order; the events:\n"
            + "\n".join(map(str, events))
        )
        at += 1


# -- per-test leak check (the conftest's, allowing the shared container) ------------------


@pytest.fixture(autouse=True)
def containerd_left_clean(
    containerd: ContainerdRig, request: pytest.FixtureRequest
) -> Iterator[None]:
    """As tests/integration/containerd/conftest.py's, but the shared container (its task,
    container and snapshot, all named by its id) may outlive a test while it runs."""
    netns_before = netns_names()
    yield
    left = {k: [x for x in v if x not in ALIVE] for k, v in containerd.inventory().items()}
    left = {k: v for k, v in left.items() if v}
    if set(left) - {f"{NAMESPACE} tasks", f"{NAMESPACE} containers"}:
        containerd.remove_all()  # CRI pods, other namespaces, snapshots: all must go
    else:  # only what this module's ctr commands left: keep the shared container
        for cid in left.get(f"{NAMESPACE} tasks", []):
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            containerd._wait_task_gone(NAMESPACE, cid)
        for cid in left.get(f"{NAMESPACE} containers", []):
            containerd.ctr("containers", "delete", cid, check=False)
    new_netns = sorted(netns_names() - netns_before)
    assert not left and not new_netns, (
        f"{request.node.name} left behind in containerd: {left}; network namespaces: {new_netns}"
    )


# -- the shared container -----------------------------------------------------------------


@dataclass
class Shared:
    id: str
    events: EventLog
    qemu_pid: int


def task_status(ctr: CtrFn, cid: str) -> str:
    """The STATUS column of ``ctr task ls`` for one task ("" if it is not listed)."""
    for line in ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return ""


def wait_status(ctr: CtrFn, cid: str, status: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := task_status(ctr, cid)) != status:
        assert time.monotonic() < deadline, f"task {cid} is {seen!r}, not {status!r}"
        time.sleep(0.1)


def remove_container(ctr: CtrFn, cid: str) -> subprocess.CompletedProcess[str]:
    """SIGKILL the task, wait until it stopped, delete task and container; the
    ``ctr task rm`` result."""
    if task_status(ctr, cid) not in ("", "STOPPED"):
        ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        wait_status(ctr, cid, "STOPPED")
    rm = ctr("task", "rm", cid, check=False)
    ctr("containers", "rm", cid, check=False)
    return rm


def assert_pod_gone(containerd: ContainerdRig, cid: str, qemu_pid: int = 0) -> None:
    sock = socket_path(str(containerd.socket), NAMESPACE, cid)
    deadline = time.monotonic() + 20
    while Path(sock).exists() or containerd.shim_pids():
        assert time.monotonic() < deadline, (
            f"{cid}: shim socket {sock} exists: {Path(sock).exists()}; "
            f"shims of the test containerd: {containerd.shim_pids()}"
        )
        time.sleep(0.1)
    assert not (RUN_ROOT / cid).exists()
    if qemu_pid:
        assert qemu_pid not in qemu_pids()


@pytest.fixture(scope="module")
def shared(containerd: ContainerdRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    ctr = containerd.ctr
    cid = new_id("shared")
    log = EventLog(containerd, tmp_path_factory.mktemp("shared") / "events.txt").start()
    ALIVE.add(cid)
    try:
        ctr("run", "-d", "--runtime", CARAPACE, BUSYBOX_IMAGE, cid, "sh", "-c", SHARED_SCRIPT)
        wait_status(ctr, cid, "RUNNING")
        # the task pid containerd sees is the VM's (as Kata's)
        pid = int(ctr("task", "ls").stdout.split(cid, 1)[1].split()[0])
        assert pid in qemu_pids()
        yield Shared(cid, log, pid)
    finally:
        ALIVE.discard(cid)
        if cid in ctr("containers", "ls", "-q").stdout.split():
            remove_container(ctr, cid)
        log.stop()
    assert_pod_gone(containerd, cid)


def exec_(ctr: CtrFn, cid: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exec_id = f"x-{uuid.uuid4().hex[:8]}"
    return ctr("task", "exec", "--exec-id", exec_id, cid, *cmd, input="", check=check)


# -- tests on the shared container --------------------------------------------------------


def test_exec_output_and_exit_codes(ctr: CtrFn, shared: Shared) -> None:
    r = exec_(ctr, shared.id, "sh", "-c", "echo out; echo err >&2; test -s /tmp/ticks")
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n")
    r = exec_(ctr, shared.id, "sh", "-c", "echo before; exit 7", check=False)
    assert (r.returncode, r.stdout) == (7, "before\n")
    # the exec'd process runs on the guest kernel too
    r = exec_(ctr, shared.id, "uname", "-r")
    assert GUEST_KERNEL.fullmatch(r.stdout.strip()), r.stdout
    assert r.stdout.strip() != host_kernel()


def exec_tty(
    containerd: ContainerdRig,
    cid: str,
    *cmd: str,
    namespace: str = NAMESPACE,
    exec_id: str = "",
) -> str:
    """``ctr task exec -t`` under ``script`` (a terminal of 33 rows and 101 columns);
    what it printed, without carriage returns. ``exec_id``: a short one of its own
    unless given."""
    exec_id = exec_id or f"t-{uuid.uuid4().hex[:8]}"
    ctr_argv = ["ctr", "-a", str(containerd.socket), "-n", namespace]
    inner = shlex.join([*ctr_argv, "task", "exec", "-t", "--exec-id", exec_id, cid, *cmd])
    # script's stdin: a pipe that stays open and empty (at end of file, script would
    # type an end-of-file character into the terminal)
    quiet, keep_open = os.pipe()
    try:
        r = subprocess.run(
            ["script", "-qec", f"stty rows 33 cols 101; {inner}", "/dev/null"],
            stdin=quiet,
            capture_output=True,  # bytes: text mode would turn each \r into \n
            timeout=60,
            env=containerd.environment(),
        )
    finally:
        os.close(quiet)
        os.close(keep_open)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    # both terminals (script's and the container's) turn \n into \r\n
    return r.stdout.decode().replace("\r", "")


def test_exec_tty(containerd: ContainerdRig, shared: Shared) -> None:
    out = exec_tty(containerd, shared.id, "tty")
    assert re.fullmatch(r"/dev/pts/\d+\n", out), repr(out)
    # wait (at most 5 s) for ctr's ResizePty, which comes after the process started
    size_loop = (
        # busybox's stty exits 0 even when the size is still 0x0: test what it printed
        'i=0; until s=$(stty size 2>/dev/null); [ -n "$s" ] || [ $i -ge 50 ]; '
        "do i=$((i+1)); sleep 0.1; "
        'done; echo "size=$s"; [ -t 0 ] && [ -t 1 ] && echo both-tty'
    )
    out = exec_tty(containerd, shared.id, "sh", "-c", size_loop)
    assert out == "size=33 101\nboth-tty\n", repr(out)


def test_exec_id_can_be_used_again_after_delete(ctr: CtrFn, shared: Shared) -> None:
    """containerd allows an exec id again once the process was deleted (runc does)."""
    exec_id = f"again-{uuid.uuid4().hex[:8]}"
    for word in ("one", "two"):
        r = ctr(
            "task", "exec", "--exec-id", exec_id, shared.id, "echo", word, input="", check=False
        )
        assert (r.returncode, r.stdout) == (0, f"{word}\n"), r.stderr


def test_tty_exec_releases_its_pty(containerd: ContainerdRig, ctr: CtrFn, shared: Shared) -> None:
    def ptys() -> list[str]:
        return [p for p in exec_(ctr, shared.id, "ls", "/dev/pts").stdout.split() if p != "ptmx"]

    before = ptys()
    for _ in range(2):
        assert exec_tty(containerd, shared.id, "true") == ""
    assert ptys() == before


def test_ps_lists_the_container_processes(ctr: CtrFn, shared: Shared) -> None:
    lines = ctr("task", "ps", shared.id).stdout.splitlines()
    assert lines[0].split() == ["PID", "INFO"], lines
    pids = [int(line.split()[0]) for line in lines[1:]]
    # sh (the init), sleep 1000 and the loop's sleep 0.2 (now and then)
    assert len(pids) >= 2 and all(p > 0 for p in pids), lines
    # guest pids, seen from the container's own pid namespace: its init is 1
    r = exec_(ctr, shared.id, "sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '")
    assert r.stdout.startswith("sh -c sleep 1000 &"), r.stdout


def test_metrics(ctr: CtrFn, shared: Shared) -> None:
    out = ctr("task", "metrics", shared.id).stdout
    table = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and not fields[0].isupper():
            table[fields[0]] = fields[1]
    assert int(table["memory.usage_in_bytes"]) > 0, out
    assert int(table["pids.current"]) >= 2, out
    assert int(table["cpuacct.usage"]) > 0, out


def read_ticks(ctr: CtrFn, cid: str) -> list[float]:
    return [float(x) for x in exec_(ctr, cid, "cat", "/tmp/ticks").stdout.split()]


def test_pause_freezes_and_resume_thaws(ctr: CtrFn, shared: Shared) -> None:
    ticks_before = len(read_ticks(ctr, shared.id))
    ctr("task", "pause", shared.id)
    paused_at = time.monotonic()
    assert task_status(ctr, shared.id) == "PAUSED"
    time.sleep(3)
    assert task_status(ctr, shared.id) == "PAUSED"
    resumed_at = time.monotonic()  # the container thaws after this
    ctr("task", "resume", shared.id)
    assert task_status(ctr, shared.id) == "RUNNING"
    time.sleep(1.5)  # a few more ticks
    # read only now: an exec'd process would have joined the frozen cgroup
    ticks = read_ticks(ctr, shared.id)
    assert len(ticks) > ticks_before
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    frozen = resumed_at - paused_at
    longest = max(gaps)
    # while running, the container ticks about every 0.2 s (sleep 0.2 and a write)...
    assert statistics.median(gaps) < 1.0, gaps
    # ...but it wrote nothing while it was frozen (in guest time, at least as long)
    assert longest >= frozen - 0.3, (frozen, longest, gaps)
    # and it ticks again since it was thawed
    after = ticks[gaps.index(longest) + 1 :]
    assert len(after) >= 3, (after, gaps)


def test_kill_and_the_events_of_a_whole_life(
    containerd: ContainerdRig, ctr: CtrFn, shared: Shared
) -> None:
    """SIGKILL of the shared container: STOPPED, 137; then its events in order, from
    /tasks/create to /tasks/delete. Removes the shared container: keep it the last test
    using ``shared``."""
    cid = shared.id
    exec_id = f"life-{uuid.uuid4().hex[:8]}"
    r = ctr("task", "exec", "--exec-id", exec_id, cid, "sh", "-c", "exit 5", input="", check=False)
    assert r.returncode == 5
    ctr("task", "pause", cid)
    ctr("task", "resume", cid)

    ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(ctr, cid, "STOPPED")
    assert shared.events.wait_for(lambda e: e.topic == "/tasks/exit" and e.body.get("id") == cid)
    rm = ctr("task", "rm", cid, check=False)
    # ctr 1.6 warns about a non-zero exit status when it deletes a task
    assert "exit code 137" in rm.stderr, (rm.returncode, rm.stderr)
    assert task_status(ctr, cid) == ""
    ctr("containers", "rm", cid)
    ALIVE.discard(cid)
    shared.events.wait_for(lambda e: e.topic == "/tasks/delete" and e.body["container_id"] == cid)

    events = shared.events.tasks(cid)

    def of(**want: Any) -> Callable[[dict[str, Any]], bool]:
        return lambda body: all(body.get(k) == v for k, v in {"container_id": cid, **want}.items())

    assert_in_order(
        events,
        [
            ("/tasks/create", of()),
            ("/tasks/start", of(pid=shared.qemu_pid)),
            ("/tasks/exec-added", of(exec_id=exec_id)),
            ("/tasks/exec-started", of(exec_id=exec_id)),
            ("/tasks/exit", of(id=exec_id, exit_status=5)),
            ("/tasks/paused", of()),
            ("/tasks/resumed", of()),
            ("/tasks/exit", of(id=cid, exit_status=137)),
            ("/tasks/delete", of(exit_status=137)),
        ],
    )
    topics = [e.topic for e in events]
    for once in ("/tasks/create", "/tasks/start", "/tasks/delete"):
        assert topics.count(once) == 1, topics
    assert [e.body.get("id") for e in events if e.topic == "/tasks/exit"].count(cid) == 1
    assert topics[0] == "/tasks/create" and topics[-1] == "/tasks/delete", topics
    # the exec of this test: added, started, exited, nothing else
    assert [e.topic for e in events if exec_id in (e.body.get("exec_id"), e.body.get("id"))] == [
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
    ]
    assert_pod_gone(containerd, cid, shared.qemu_pid)


# -- ctr run --rm: one VM each ------------------------------------------------------------


def test_run_prints_the_guest_kernel(ctr: CtrFn) -> None:
    r = ctr(*run_argv(new_id("uname"), "uname", "-r"), input="")
    assert GUEST_KERNEL.fullmatch(r.stdout.removesuffix("\n")), r.stdout
    assert r.stdout != host_kernel() + "\n"
    assert r.stderr == ""


def test_run_exit_code_propagates(ctr: CtrFn) -> None:
    r = ctr(*run_argv(new_id("exit"), "sh", "-c", "echo bye; exit 3"), input="", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "bye\n", "")


def test_run_stdin_reaches_the_container(ctr: CtrFn) -> None:
    r = ctr(*run_argv(new_id("stdin"), "cat"), input="hello\n")
    assert (r.returncode, r.stdout) == (0, "hello\n")


def test_oom_kill_event(ctr: CtrFn, event_log: EventLog) -> None:
    """dd's 64 MiB buffer does not fit a 32 MiB limit: the guest kernel OOM-kills it."""
    cid = new_id("oom")
    r = ctr(
        *run_argv(
            cid,
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
            options=("--memory-limit", str(32 * 1024 * 1024)),
        ),
        input="",
        check=False,
    )
    assert r.returncode == 137, (r.returncode, r.stdout, r.stderr)
    event_log.wait_for(lambda e: e.topic == "/tasks/delete" and e.body["container_id"] == cid)
    events = event_log.tasks(cid)
    assert_in_order(
        events,
        [
            ("/tasks/create", lambda b: True),
            ("/tasks/start", lambda b: True),
            ("/tasks/oom", lambda b: True),
            ("/tasks/exit", lambda b: b.get("id") == cid and b.get("exit_status") == 137),
            ("/tasks/delete", lambda b: b.get("exit_status") == 137),
        ],
    )


# -- and nothing is left ------------------------------------------------------------------


def test_no_shim_socket_left(containerd: ContainerdRig) -> None:
    """After the module's containers are gone: no socket of theirs in /run/carapace-shim
    (a directory other containerds on this host share, so only ours are looked at), no
    shim of the test containerd, no run dir, no QEMU with the shared container's pid."""
    gone = [cid for cid in USED_IDS if cid not in ALIVE]
    if not ALIVE:
        assert containerd.shim_pids() == []
    ours = {socket_path(str(containerd.socket), NAMESPACE, cid) for cid in gone}
    shim_dir = Path(SOCKET_DIR)
    present = {str(p) for p in shim_dir.glob("*.sock")} if shim_dir.is_dir() else set()
    assert not ours & present, sorted(ours & present)
    for cid in gone:
        assert not (RUN_ROOT / cid).exists(), cid
