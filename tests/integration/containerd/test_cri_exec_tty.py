"""``kubectl exec -it`` and ``kubectl attach -it`` on a carapace pod, with the ids the
engines really use (64 hex characters), through ctr and through containerd's CRI; and
host namespaces (hostNetwork, hostPID, hostIPC) refused for a carapace pod.

CRI's container ids are 64 hex characters, and so are the exec ids containerd's CRI
makes for itself; ctr is given 64-character exec ids on the same containers. CRI's Exec
and Attach answer a URL on containerd's streaming server, spoken to here over
WebSocket as kubectl does (tests/tooling/kube_stream.py): stdin, stdout, the error
channel (the exit status, a v4 Status) and resizes.

One pod serves every exec and attach test (module fixture ``tty_pod``: a VM boot costs
seconds under TCG). The host namespace tests fail before any VM boots.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cri_api as api
import grpc
import pytest

from carapace.shim.command import SOCKET_DIR

from ...tooling.kube_stream import ERROR, STDERR, STDOUT, V1, V4, KubeStream, exit_code
from ..conftest import RUN_ROOT
from .rig import BUSYBOX_IMAGE, ContainerdRig, CriClient, netns_names, pod_config
from .test_cri_network import (  # the module's leak check: relative to a shared pod
    Pod,
    assert_pod_gone,
    containerd_left_clean,  # noqa: F401
    wait_for,
)
from .test_shim_ctr import EventLog, exec_tty

CRI_NAMESPACE = "k8s.io"
HEX64 = re.compile(r"[0-9a-f]{64}")
#: Wait (at most 5 s) until the terminal has the size sent, then print it: the size
#: reaches the process once it started (ctr and containerd's CRI both resize after
#: Start). busybox's stty prints nothing while the size is still 0x0.
SIZE_WAIT = (
    'i=0; until s=$(stty size 2>/dev/null); [ -n "$s" ] && [ "$s" != "0 0" ] || '
    "[ $i -ge 50 ]; do i=$((i+1)); sleep 0.1; done"
)


def hex64() -> str:
    return secrets.token_hex(32)


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class TtyPod:
    pod: Pod
    work: str  # sleep 3600: for exec
    console: str  # an interactive sh on a terminal (tty, stdin): for attach


def start_container(pod: Pod, name: str, command: list[str], tty: bool = False) -> str:
    config = api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name),
        image=api.ImageSpec(image=BUSYBOX_IMAGE),
        command=command,
        log_path=f"{pod.name}-{name}.log",
        stdin=tty,
        tty=tty,
    )
    return pod.start(config)


def container_state(cri: CriClient, cid: str) -> api.ContainerStatus:
    return cri.runtime.ContainerStatus(
        api.ContainerStatusRequest(container_id=cid), timeout=30
    ).status


@pytest.fixture(scope="module")
def tty_pod(
    containerd: ContainerdRig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TtyPod]:
    cri = containerd.cri()
    pod: Pod | None = None
    try:
        pod = Pod(cri, "tty-pod", "carapace", tmp_path_factory.mktemp("cri-tty"))
        work = start_container(pod, "work", ["sleep", "3600"])
        console = start_container(pod, "console", ["sh"], tty=True)
        yield TtyPod(pod, work, console)
    finally:
        if pod is not None:
            pod.remove()
        cri.close()
    assert pod is not None
    assert_pod_gone(containerd, pod.id)


@pytest.fixture
def events(containerd: ContainerdRig, tmp_path: Path) -> Iterator[EventLog]:
    log = EventLog(containerd, tmp_path / "events.txt").start()
    yield log
    log.stop()


# -- host namespaces: refused before any VM boots -----------------------------------------

HOST_NAMESPACES = {
    # CRI's option: (what the sandbox's spec then lacks, the kubelet's name)
    "network": (("network", "uts"), "hostNetwork"),
    "pid": (("pid",), "hostPID"),
    "ipc": (("ipc",), "hostIPC"),
}


def host_namespace_pod(name: str, option: str, log_dir: Path) -> api.PodSandboxConfig:
    config = pod_config(name, str(log_dir))
    setattr(config.linux.security_context.namespace_options, option, api.NamespaceMode.NODE)
    if option == "network":
        config.hostname = ""  # as the kubelet: the pod has the host's uts namespace
    return config


def shim_sockets() -> set[str]:
    d = Path(SOCKET_DIR)
    return {p.name for p in d.glob("*.sock")} if d.is_dir() else set()


def run_dirs() -> set[str]:
    return {p.name for p in RUN_ROOT.iterdir()} if RUN_ROOT.is_dir() else set()


@pytest.mark.parametrize("option", sorted(HOST_NAMESPACES))
def test_host_namespace_is_refused(
    containerd: ContainerdRig, cri: CriClient, tmp_path: Path, option: str
) -> None:
    missing, kubelet_name = HOST_NAMESPACES[option]
    name = f"host-{option}"
    sockets, dirs, netns = shim_sockets(), run_dirs(), netns_names()
    shims = set(containerd.shim_pids())
    with pytest.raises(grpc.RpcError) as caught:
        cri.runtime.RunPodSandbox(
            api.RunPodSandboxRequest(
                config=host_namespace_pod(name, option, tmp_path), runtime_handler="carapace"
            ),
            timeout=300,
        )
    message = caught.value.details()
    # the pod asks for the host's namespace (as the kubelet says), a VM pod cannot share it
    wanted = " and ".join(missing)
    assert re.search(f"pod [0-9a-f]{{64}} asks for the host's {wanted} namespaces? ", message), (
        message
    )
    assert f"({kubelet_name}: true)" in message, message
    assert "a VM pod has its own kernel and cannot share a namespace with the host" in message
    # nothing is left: no pod, no shim (process or socket), no run dir, no netns
    pods = cri.runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30).items
    assert [p.id for p in pods if p.metadata.name == name] == []
    wait_for("the shim to end", lambda: set(containerd.shim_pids()) <= shims, 30)
    assert shim_sockets() <= sockets
    assert run_dirs() <= dirs
    assert netns_names() <= netns


@pytest.mark.parametrize("option", sorted(HOST_NAMESPACES))
def test_runc_accepts_the_host_namespace(cri: CriClient, tmp_path: Path, option: str) -> None:
    """For comparison: runc's pod shares the host's namespace."""
    config = host_namespace_pod(f"runc-host-{option}", option, tmp_path)
    pod_id = cri.runtime.RunPodSandbox(
        api.RunPodSandboxRequest(config=config, runtime_handler="runc"), timeout=120
    ).pod_sandbox_id
    try:
        status = cri.runtime.PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30
        ).status
        assert status.state == api.PodSandboxState.SANDBOX_READY
        assert getattr(status.linux.namespaces.options, option) == api.NamespaceMode.NODE
    finally:
        cri.runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        cri.runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)


# -- ctr on a CRI container: 64-character container and exec ids ------------------------


def ctr_k8s(
    containerd: ContainerdRig, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return containerd.ctr(*args, namespace=CRI_NAMESPACE, check=check, input="")


def test_ctr_exec_tty_with_64_char_ids(
    containerd: ContainerdRig, tty_pod: TtyPod, events: EventLog
) -> None:
    cid, exec_id = tty_pod.work, hex64()
    assert HEX64.fullmatch(cid), cid
    out = exec_tty(
        containerd,
        cid,
        "sh",
        "-c",
        f'{SIZE_WAIT}; tty; echo "size=$s"; [ -t 0 ] && [ -t 1 ] && echo both-tty',
        namespace=CRI_NAMESPACE,
        exec_id=exec_id,
    )
    # a terminal of its own, of the size ctr sent (ResizePty), on stdin and stdout
    assert re.fullmatch(r"/dev/pts/\d+\nsize=33 101\nboth-tty\n", out), repr(out)
    events.wait_for(lambda e: e.topic == "/tasks/exit" and e.body.get("id") == exec_id, timeout=30)


def test_ctr_exec_pids_and_kill_with_64_char_ids(
    containerd: ContainerdRig, tty_pod: TtyPod, events: EventLog
) -> None:
    cid = tty_pod.work
    # exec without a terminal: output, error output and exit status
    r = ctr_k8s(
        containerd,
        "task", "exec", "--exec-id", hex64(), cid, "sh", "-c", "echo out; echo err >&2; exit 7",
        check=False,
    )  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")

    # an exec'd sleep: listed by pids, ended by kill with its 64-character exec id
    exec_id = hex64()
    argv = ["ctr", "-a", str(containerd.socket), "-n", CRI_NAMESPACE, "task", "exec"]
    sleeper = subprocess.Popen(
        [*argv, "--exec-id", exec_id, cid, "sleep", "1001"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=containerd.environment(),
    )
    try:
        events.wait_for(
            lambda e: e.topic == "/tasks/exec-started" and e.body.get("exec_id") == exec_id
        )
        lines = ctr_k8s(containerd, "task", "ps", cid).stdout.splitlines()
        assert lines[0].split() == ["PID", "INFO"], lines
        assert len(lines[1:]) == 2, lines  # sleep 3600 (the init) and sleep 1001
        ctr_k8s(containerd, "task", "kill", "--exec-id", exec_id, "-s", "SIGKILL", cid)
        _, err = sleeper.communicate(timeout=60)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert sleeper.returncode == 137, err
    events.wait_for(
        lambda e: (
            e.topic == "/tasks/exit"
            and e.body.get("id") == exec_id
            and e.body.get("exit_status") == 137
        )
    )
    lines = ctr_k8s(containerd, "task", "ps", cid).stdout.splitlines()
    assert len(lines[1:]) == 1, lines  # the init alone
    assert container_state(tty_pod.pod.cri, cid).state == api.ContainerState.CONTAINER_RUNNING


def test_ctr_kill_a_container_with_a_64_char_id(containerd: ContainerdRig, tty_pod: TtyPod) -> None:
    cri = tty_pod.pod.cri
    victim = start_container(tty_pod.pod, "victim", ["sleep", "3600"])
    try:
        assert HEX64.fullmatch(victim), victim
        ctr_k8s(containerd, "task", "kill", "-s", "SIGKILL", victim)
        wait_for(
            "the container to exit",
            lambda: container_state(cri, victim).state == api.ContainerState.CONTAINER_EXITED,
            60,
        )
        assert container_state(cri, victim).exit_code == 137
    finally:
        cri.runtime.StopContainer(api.StopContainerRequest(container_id=victim), timeout=120)
        cri.runtime.RemoveContainer(api.RemoveContainerRequest(container_id=victim), timeout=120)


# -- CRI Exec and Attach with a terminal, over the streaming server -----------------------


def exec_url(cri: CriClient, cid: str, cmd: list[str], tty: bool = True) -> str:
    return str(
        cri.runtime.Exec(
            api.ExecRequest(
                container_id=cid, cmd=cmd, tty=tty, stdin=True, stdout=True, stderr=not tty
            ),
            timeout=30,
        ).url
    )


def lines_of(out: bytes) -> list[str]:
    return out.decode(errors="replace").replace("\r", "").split("\n")


def test_cri_exec_tty(tty_pod: TtyPod, events: EventLog) -> None:
    cri = tty_pod.pod.cri
    url = exec_url(cri, tty_pod.work, ["sh"])
    assert url.startswith("http://127.0.0.1:"), url  # enable_tls_streaming = false
    with KubeStream(url) as s:
        assert s.protocol == V4
        s.resize(91, 27)
        s.read_until(STDOUT, b"# ")  # the shell's prompt
        s.write(f'{SIZE_WAIT}; tty; echo "size=$s"; echo $((6*7))\n')
        out = s.read_until(STDOUT, b"\n42\r\n")
        # a new size on the resize channel reaches the terminal too
        s.resize(120, 40)
        s.write('until [ "$(stty size)" = "40 120" ]; do sleep 0.1; done; echo resized\n')
        s.read_until(STDOUT, b"\nresized\r\n")
        s.write("exit\n")
        s.read_to_end()
        assert exit_code(s.status()) == 0, s.status()
    lines = lines_of(out)
    at = lines.index("42")
    assert re.fullmatch(r"/dev/pts/\d+", lines[at - 2]), lines
    assert lines[at - 1] == "size=27 91", lines
    # containerd's CRI named the exec with 64 hex characters of its own
    added = [
        e.body["exec_id"]
        for e in events.events()
        if e.topic == "/tasks/exec-added" and e.body.get("container_id") == tty_pod.work
    ]
    assert added and all(HEX64.fullmatch(x) for x in added), added


def test_cri_exec_exit_status(tty_pod: TtyPod) -> None:
    cri = tty_pod.pod.cri
    # a non-zero exit of a shell on a terminal: a Failure Status with the exit code
    with KubeStream(exec_url(cri, tty_pod.work, ["sh"])) as s:
        s.read_until(STDOUT, b"# ")
        s.write("exit 3\n")
        s.read_to_end()
        status = s.status()
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode", status
    assert exit_code(status) == 3, status
    # without a terminal: stdin in, stdout and stderr apart
    cmd = ["sh", "-c", "head -n 1; echo err >&2; exit 4"]
    with KubeStream(exec_url(cri, tty_pod.work, cmd, tty=False)) as s:
        s.write("from-stdin\n")
        got = s.read_to_end()
        assert exit_code(s.status()) == 4, s.status()
    assert (got[STDOUT], got[STDERR]) == (b"from-stdin\n", b"err\n"), got
    # the older protocol (channel.k8s.io): the error channel carries the error's text
    with KubeStream(exec_url(cri, tty_pod.work, ["sh", "-c", "exit 5"], tty=False), [V1]) as s:
        assert s.protocol == V1
        got = s.read_to_end()
    assert b"exit code 5" in got[ERROR], got


def test_cri_attach_tty(tty_pod: TtyPod) -> None:
    cri = tty_pod.pod.cri
    attach = api.AttachRequest(
        container_id=tty_pod.console, stdin=True, tty=True, stdout=True, stderr=False
    )
    url = str(cri.runtime.Attach(attach, timeout=30).url)
    with KubeStream(url) as s:
        s.resize(77, 22)
        s.write(f'{SIZE_WAIT}; echo "size=$s"; echo $((6*7))\n')
        out = s.read_until(STDOUT, b"\n42\r\n")
    lines = lines_of(out)
    # what was typed comes back (the terminal echoes it; the shell's line editor wraps
    # it at the width), then what the shell printed
    assert 'echo "size=$s"; echo $((6*7))' in "".join(lines), lines
    at = lines.index("42")
    assert lines[at - 1] == "size=22 77", lines
    # detached (the session closed): the container runs on
    assert container_state(cri, tty_pod.console).state == api.ContainerState.CONTAINER_RUNNING
    # attached again: typing exit ends the container with its status
    url = str(cri.runtime.Attach(attach, timeout=30).url)
    with KubeStream(url) as s:
        s.write("echo again-$((7*7)); exit 3\n")
        s.read_until(STDOUT, b"again-49")
        s.read_to_end()
        assert exit_code(s.status()) == 0, s.status()  # attach itself succeeded
    wait_for(
        "the console to exit",
        lambda: container_state(cri, tty_pod.console).state == api.ContainerState.CONTAINER_EXITED,
        60,
    )
    assert container_state(cri, tty_pod.console).exit_code == 3
