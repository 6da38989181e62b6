"""Docker 20.10 driving carapace as an OCI runtime (``docker run --runtime carapace``).

Every test runs twice: with runc, the baseline that proves the test itself right, and
with carapace, where the container runs in a VM of its own. Containers have no network
(``--network none``: the daemon runs with ``--bridge=none``, so there is no default
bridge) except in the network test, which makes a user-defined bridge network.
The ``docker`` fixture fails a test that leaves a container, network or network
namespace behind; the integration conftest checks for VMs and other traces.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .docker_rig import DockerRig

pytestmark = pytest.mark.vm

HOST_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: docker run's own exit codes when the command cannot be run
NOT_FOUND, NOT_EXECUTABLE = 127, 126
NETWORK_SUBNET = "10.229.0.0/24"
WAIT = 120.0  # generous bound for something that must happen (a VM boots under TCG)


def run_flags(runtime: str) -> list[str]:
    return ["--runtime", runtime, "--network", "none"]


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``check()`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        time.sleep(0.2)


def state(docker: DockerRig, cid: str) -> dict[str, object]:
    out = docker.docker("inspect", "--format", "{{json .State}}", cid).stdout
    result: dict[str, object] = json.loads(out)
    return result


@pytest.fixture
def detached(docker: DockerRig, docker_runtime: str) -> Iterator[list[str]]:
    """Containers started by the test (removed with ``rm -f`` after it, before the
    fixture checks that nothing was left)."""
    ids: list[str] = []
    yield ids
    if ids:
        docker.docker("rm", "-f", *ids, check=False)


def start(docker: DockerRig, runtime: str, ids: list[str], *args: str) -> str:
    """``docker run -d`` ARGS (flags before the image may be given as leading args)."""
    cid = docker.docker("run", "-d", *run_flags(runtime), *args).stdout.strip()
    ids.append(cid)
    return cid


# -- docker run --rm ----------------------------------------------------------------------


def test_run_rm_output(docker: DockerRig, docker_runtime: str) -> None:
    r = docker.docker(
        "run", "--rm", *run_flags(docker_runtime), docker.image,
        "sh", "-c", "echo out; echo err >&2; echo $HOME; id -u",
    )  # fmt: skip
    assert r.stdout == "out\n/root\n0\n"
    assert r.stderr == "err\n"
    # --rm: the container is gone once docker run returns
    assert docker.docker("ps", "-aq").stdout == ""


def test_run_stdin(docker: DockerRig, docker_runtime: str) -> None:
    r = docker.docker(
        "run", "--rm", "-i", *run_flags(docker_runtime), docker.image, "sh", "-c", "cat; echo end",
        input="line one\nline two\n",
    )  # fmt: skip
    assert r.stdout == "line one\nline two\nend\n"


@pytest.mark.parametrize(
    ("argv", "code", "in_stderr"),
    [
        (["true"], 0, None),
        (["sh", "-c", "exit 3"], 3, None),
        (["no-such-command"], NOT_FOUND, "no-such-command"),
        (["/etc/passwd"], NOT_EXECUTABLE, "/etc/passwd"),
    ],
    ids=["0", "3", "127-not-found", "126-not-executable"],
)
def test_run_exit_code(
    docker: DockerRig, docker_runtime: str, argv: list[str], code: int, in_stderr: str | None
) -> None:
    r = docker.docker("run", "--rm", *run_flags(docker_runtime), docker.image, *argv, check=False)
    assert r.returncode == code, r
    if in_stderr is not None:
        assert in_stderr in r.stderr, r.stderr
    assert docker.docker("ps", "-aq").stdout == ""


def test_runs_in_a_vm(docker: DockerRig, docker_runtime: str) -> None:
    """runc shares the host's kernel (same boot id); carapace boots a kernel of its own."""
    r = docker.docker(
        "run", "--rm", *run_flags(docker_runtime), docker.image,
        "sh", "-c", "cat /proc/sys/kernel/random/boot_id; uname -r",
    )  # fmt: skip
    boot_id, release = r.stdout.split()
    host = HOST_BOOT_ID.read_text().strip()
    if docker_runtime == "runc":
        assert boot_id == host
    else:
        assert boot_id != host, f"the container shares the host's kernel ({release})"


# -- run -d, exec, top --------------------------------------------------------------------


def test_detach_exec(docker: DockerRig, docker_runtime: str, detached: list[str]) -> None:
    cid = start(docker, docker_runtime, detached, docker.image, "sleep", "3600")
    assert state(docker, cid)["Status"] == "running"
    r = docker.docker("exec", cid, "sh", "-c", "echo from exec; echo to err >&2")
    assert (r.stdout, r.stderr) == ("from exec\n", "to err\n")
    assert docker.docker("exec", cid, "sh", "-c", "exit 5", check=False).returncode == 5
    # docker 20.10's exec answers 126 to any failure to start the process (runc's
    # message, on stdout)
    r = docker.docker("exec", cid, "no-such-command", check=False)
    assert r.returncode == NOT_EXECUTABLE and "no-such-command" in r.stdout + r.stderr, r
    # stdin through exec -i
    r = docker.docker("exec", "-i", cid, "sh", "-c", "read x; echo got $x", input="abc\n")
    assert r.stdout == "got abc\n"
    # exec sees the container's processes; docker top asks the runtime (ps)
    r = docker.docker("exec", cid, "ps", "-o", "pid,args")
    assert re.search(r"^\s*1\s+sleep 3600$", r.stdout, re.M), r.stdout
    # docker top: the runtime's `ps` lists host pids, docker shows host ps lines for them;
    # the container's pid (State.Pid, the host process that lives as long as it) is there.
    # With runc that is `sleep` itself; a VM's processes are not on the host.
    top = docker.docker("top", cid, "-o", "pid,args").stdout.splitlines()[1:]
    pids = {int(line.split()[0]) for line in top}
    assert state(docker, cid)["Pid"] in pids, top
    if docker_runtime == "runc":
        assert any(line.split(None, 1)[1] == "sleep 3600" for line in top), top
    assert state(docker, cid)["Status"] == "running"


def test_exec_terminal(docker: DockerRig, docker_runtime: str, detached: list[str]) -> None:
    """``exec -t``: the process gets a terminal (``tty`` says "not a tty" otherwise)."""
    cid = start(docker, docker_runtime, detached, docker.image, "sleep", "3600")
    r = docker.docker("exec", "-t", cid, "tty")
    assert re.fullmatch(r"/dev/pts/\d+\r?\n", r.stdout), r.stdout
    assert docker.docker("exec", "-t", cid, "sh", "-c", "exit 6", check=False).returncode == 6


# -- stop, kill, rm -f --------------------------------------------------------------------


def test_stop_sigterm_handled(docker: DockerRig, docker_runtime: str, detached: list[str]) -> None:
    script = 'trap "echo got TERM; exit 7" TERM; echo ready; while :; do sleep 0.1; done'
    cid = start(docker, docker_runtime, detached, docker.image, "sh", "-c", script)
    wait_for("the trap is set", lambda: "ready" in docker.docker("logs", cid).stdout)
    docker.docker("stop", "-t", "60", cid, timeout=120)
    st = state(docker, cid)
    assert (st["Status"], st["ExitCode"]) == ("exited", 7), st
    assert docker.docker("logs", cid).stdout == "ready\ngot TERM\n"


def test_stop_unhandled_sigterm_is_killed(
    docker: DockerRig, docker_runtime: str, detached: list[str]
) -> None:
    """PID 1 ignores a SIGTERM it has no handler for: docker stop kills it after -t."""
    cid = start(docker, docker_runtime, detached, docker.image, "sleep", "3600")
    docker.docker("stop", "-t", "1", cid, timeout=120)
    st = state(docker, cid)
    assert st["Status"] == "exited"
    assert st["ExitCode"] in (143, 137), st


def test_kill(docker: DockerRig, docker_runtime: str, detached: list[str]) -> None:
    script = 'trap "echo got USR1" USR1; echo ready; while :; do sleep 0.1; done'
    cid = start(docker, docker_runtime, detached, docker.image, "sh", "-c", script)
    wait_for("the trap is set", lambda: "ready" in docker.docker("logs", cid).stdout)
    docker.docker("kill", "-s", "USR1", cid)
    wait_for("SIGUSR1 reaches the trap", lambda: "got USR1" in docker.docker("logs", cid).stdout)
    assert state(docker, cid)["Status"] == "running"
    docker.docker("kill", cid)  # SIGKILL
    wait_for("the container exits", lambda: state(docker, cid)["Status"] == "exited")
    assert state(docker, cid)["ExitCode"] == 137
    r = docker.docker("kill", cid, check=False)
    assert r.returncode != 0 and "is not running" in r.stderr, r


def test_rm_force_running(docker: DockerRig, docker_runtime: str) -> None:
    cid = docker.docker(
        "run", "-d", *run_flags(docker_runtime), docker.image, "sleep", "3600"
    ).stdout.strip()
    assert state(docker, cid)["Status"] == "running"
    docker.docker("rm", "-f", cid, timeout=120)
    assert docker.docker("ps", "-aq").stdout == ""
    r = docker.docker("inspect", cid, check=False)
    assert r.returncode != 0 and "No such" in r.stderr, r


# -- pause / unpause ----------------------------------------------------------------------


def test_pause_unpause(
    docker: DockerRig, docker_runtime: str, detached: list[str], tmp_path: Path
) -> None:
    """A paused container makes no progress: a counter it writes to a bind-mounted host
    directory stays put while paused and moves again after unpause."""
    counter = tmp_path / "counter"
    script = (
        "i=0; while :; do i=$((i+1)); echo $i > /out/c.new; mv /out/c.new /out/counter; "
        "sleep 0.05; done"
    )
    cid = start(
        docker, docker_runtime, detached, "-v", f"{tmp_path}:/out", docker.image,
        "sh", "-c", script,
    )  # fmt: skip

    def count() -> int:
        try:
            return int(counter.read_text())
        except (OSError, ValueError):
            return 0

    wait_for("the counter moves", lambda: count() > 3)
    docker.docker("pause", cid)
    assert state(docker, cid)["Status"] == "paused"
    frozen = count()
    time.sleep(2)  # ~40 increments would happen in this time if it ran
    assert count() == frozen, "the counter moved while the container was paused"
    r = docker.docker("exec", cid, "true", check=False)
    assert r.returncode != 0 and "paused" in r.stderr, r
    docker.docker("unpause", cid)
    assert state(docker, cid)["Status"] == "running"
    wait_for("the counter moves again after unpause", lambda: count() > frozen + 3)


# -- update -------------------------------------------------------------------------------

#: the container's own memory limit and CPU quota, as its cgroup shows them (cgroup v1:
#: docker bind-mounts the container's cgroup on /sys/fs/cgroup/<controller>; cgroup v2:
#: the cgroup named in /proc/self/cgroup)
LIMITS = r"""
if [ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
  echo mem $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)
  echo cpu $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)
else
  g=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
  [ -f $g/memory.max ] || g=/sys/fs/cgroup
  echo mem $(cat $g/memory.max)
  echo cpu $(cat $g/cpu.max)
fi
"""


def test_update_cpus_memory(docker: DockerRig, docker_runtime: str, detached: list[str]) -> None:
    cid = start(
        docker, docker_runtime, detached, "--memory", "256m", "--cpus", "1",
        docker.image, "sleep", "3600",
    )  # fmt: skip
    before = docker.docker("exec", cid, "sh", "-c", LIMITS).stdout.split("\n")
    assert before[:2] == [f"mem {256 << 20}", "cpu 100000 100000"], before
    docker.docker("update", "--cpus", "0.5", "--memory", "128m", "--memory-swap", "128m", cid)
    host_config = json.loads(
        docker.docker("inspect", "--format", "{{json .HostConfig}}", cid).stdout
    )
    assert (host_config["NanoCpus"], host_config["Memory"]) == (500_000_000, 128 << 20)
    after = docker.docker("exec", cid, "sh", "-c", LIMITS).stdout.split("\n")
    assert after[:2] == [f"mem {128 << 20}", "cpu 50000 100000"], after
    # the new memory limit holds: a process that keeps allocating is OOM-killed
    r = docker.docker("exec", cid, "tail", "/dev/zero", check=False, timeout=300)
    assert r.returncode == 137, r
    assert state(docker, cid)["Status"] == "running"


# -- run -it under a terminal -------------------------------------------------------------


def test_run_interactive_terminal(docker: DockerRig, docker_runtime: str) -> None:
    """``docker run -it`` inside ``script``: the container's stdin/stdout are a terminal;
    what is typed is echoed and read; the exit status comes through."""
    run = docker.argv("run", "-it", "--rm", *run_flags(docker_runtime), docker.image)
    cmd = " ".join([*run, "sh", "-c", "'tty; read x; echo got:$x; exit 4'"])
    proc = subprocess.Popen(
        ["script", "-qec", cmd, "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"typed-line\n")
        proc.stdin.flush()
        try:
            code = proc.wait(timeout=300)  # stdin stays open until the container exits
        except subprocess.TimeoutExpired:
            ps = docker.docker("ps", "-a", check=False).stdout
            pytest.fail(
                f"docker run -it did not exit in 300s\n{ps}\n{docker.runtime_logs()}\n"
                f"dockerd: {docker.log_tail(15)}"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
    out = proc.stdout.read().decode(errors="replace")
    assert code == 4, out
    assert re.search(r"/dev/pts/\d+\r\n", out), out
    assert "got:typed-line\r\n" in out, out
    # the terminal's echo of the typed line, before the container's answer
    assert out.index("typed-line") < out.index("got:typed-line"), out
    assert docker.docker("ps", "-aq").stdout == ""


# -- a user-defined bridge network --------------------------------------------------------


def test_bridge_network_reachable_from_host(
    docker: DockerRig, docker_runtime: str, detached: list[str]
) -> None:
    """dockerd with --iptables=false still makes a user-defined bridge (br-<id> with the
    gateway address on the host): the host reaches the container at its address."""
    net = f"carapace-t-{secrets.token_hex(3)}"
    docker.docker("network", "create", "--subnet", NETWORK_SUBNET, net)
    try:
        token = secrets.token_hex(8)
        script = f"mkdir /w; echo {token} > /w/index.html; exec httpd -f -p 8080 -h /w"
        cid = docker.docker(
            "run", "-d", "--runtime", docker_runtime, "--network", net, docker.image,
            "sh", "-c", script,
        ).stdout.strip()  # fmt: skip
        detached.append(cid)
        ip = docker.docker(
            "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid
        ).stdout.strip()
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(NETWORK_SUBNET), ip
        # the container has that address on its interface
        addrs = docker.docker("exec", cid, "ip", "-o", "-4", "addr").stdout
        assert f"inet {ip}/24" in addrs, addrs

        body: list[str] = []

        def fetch() -> bool:
            try:
                with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as resp:
                    body.append(resp.read().decode())
                return True
            except OSError:
                return False

        wait_for(f"the host reaches http://{ip}:8080/", fetch)
        assert body[-1] == f"{token}\n"
        # and the container reaches the host's end of the bridge (the gateway)
        gateway = str(next(ipaddress.ip_network(NETWORK_SUBNET).hosts()))
        r = docker.docker("exec", cid, "ping", "-c", "1", "-W", "10", gateway, check=False)
        assert r.returncode == 0, r
    finally:
        docker.docker("rm", "-f", *detached, check=False)
        detached.clear()
        docker.docker("network", "rm", net, check=False)
