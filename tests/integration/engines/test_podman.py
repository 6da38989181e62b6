"""Podman 4.3 (with conmon) driving carapace as an OCI runtime (``podman run --runtime
carapace``).

Every test runs twice: with runc, the baseline that proves the test itself right, and
with carapace, where each pod (or standalone container) is a VM. Containers have no
network (the rig's containers.conf: ``netns = "none"``). The ``podman`` fixture fails a
test that leaves a pod, container, network namespace or carapace runtime record behind;
the integration conftest checks for VMs and other traces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from carapace import resources as r

from ..conftest import qemu_pids
from .podman_rig import PodmanRig, runtime_state

pytestmark = pytest.mark.vm

HOST_BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
#: podman run's own exit codes when the command cannot be run
NOT_FOUND, NOT_EXECUTABLE = 127, 126
#: the exit status of a container ended by SIGKILL
KILLED = 128 + 9


def boot_id(podman: PodmanRig, name: str) -> str:
    return podman.podman("exec", name, "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()


@pytest.fixture
def pods(podman: PodmanRig) -> Iterator[list[str]]:
    """Pods made by the test (removed with their containers after it, before the
    ``podman`` fixture checks that nothing was left)."""
    names: list[str] = []
    yield names
    if names:
        podman.podman("pod", "rm", "-f", "-t", "0", *names, check=False, timeout=600)


@pytest.fixture
def containers(podman: PodmanRig) -> Iterator[list[str]]:
    """Containers made by the test outside pods (removed after it)."""
    names: list[str] = []
    yield names
    if names:
        podman.podman("rm", "-f", "-t", "0", *names, check=False, timeout=600)


# -- podman run --rm ------------------------------------------------------------------------


def test_run_rm_output_and_exit_code(podman: PodmanRig, podman_runtime: str) -> None:
    r_ = podman.podman(
        "run", "--rm", "--runtime", podman_runtime, podman.image,
        "sh", "-c", "echo out; echo err >&2; echo $HOME; id -u; exit 3", check=False,
    )  # fmt: skip
    assert r_.returncode == 3, r_.stderr
    assert r_.stdout == "out\n/root\n0\n"
    assert "err\n" in r_.stderr
    assert podman.podman("ps", "-aq").stdout == ""


def test_run_rm_stdin(podman: PodmanRig, podman_runtime: str) -> None:
    """-i: the container's stdin is podman's (a pipe here), closed at its end."""
    r_ = podman.podman(
        "run", "--rm", "-i", "--runtime", podman_runtime, podman.image, "sh", "-c", "wc -l",
        input="one\ntwo\n",
    )  # fmt: skip
    assert r_.stdout.strip() == "2"


@pytest.mark.parametrize(
    ("command", "status"),
    [(["/nonexistent"], NOT_FOUND), (["/etc/passwd"], NOT_EXECUTABLE)],
    ids=["not-found", "not-executable"],
)
def test_run_rm_command_that_cannot_run(
    podman: PodmanRig, podman_runtime: str, command: list[str], status: int
) -> None:
    r_ = podman.podman(
        "run", "--rm", "--runtime", podman_runtime, podman.image, *command, check=False
    )  # fmt: skip
    assert r_.returncode == status, r_.stderr
    assert command[0] in r_.stderr
    assert podman.podman("ps", "-aq").stdout == ""


# -- podman run -d, exec, stop, rm -f --------------------------------------------------------


def test_run_detached_exec_stop(
    podman: PodmanRig, podman_runtime: str, containers: list[str]
) -> None:
    """run -d (the pause image: exits 0 on SIGTERM), exec with output, exit codes and
    stdin, pause and unpause, stop → exited 0, rm."""
    name = f"det-{podman_runtime}"
    containers.append(name)
    cid = podman.podman(
        "run", "-d", "--runtime", podman_runtime, "--name", name, podman.pause_image
    ).stdout.strip()  # fmt: skip
    assert podman.inspect(name, "{{.State.Status}}") == "running"
    assert podman.inspect(name, "{{.Id}}") == cid
    assert podman.podman("exec", name, "sh", "-c", "echo $((6 * 7))").stdout == "42\n"
    assert podman.podman("exec", name, "sh", "-c", "exit 5", check=False).returncode == 5
    assert podman.podman("exec", "-i", name, "cat", input="piped\n").stdout == "piped\n"
    # exec sees the container's processes: the pause script is PID 1
    assert podman.podman("exec", name, "cat", "/proc/1/cmdline").stdout.startswith("/bin/sh")
    podman.podman("pause", name)
    assert podman.inspect(name, "{{.State.Status}}") == "paused"
    podman.podman("unpause", name)
    assert podman.inspect(name, "{{.State.Status}}") == "running"
    assert podman.podman("exec", name, "echo", "awake").stdout == "awake\n"
    podman.podman("stop", "-t", "30", name)
    assert podman.inspect(name, "{{.State.Status}}") == "exited"
    assert podman.inspect(name, "{{.State.ExitCode}}") == "0"
    podman.podman("rm", name)
    assert podman.podman("ps", "-aq").stdout == ""


def test_run_and_exec_with_a_terminal(
    podman: PodmanRig, podman_runtime: str, containers: list[str]
) -> None:
    """-t: the container's stdio is a terminal (conmon hands the runtime a console
    socket and gets the pty master), for run and for exec; the exit code comes through."""
    r_ = podman.podman(
        "run", "--rm", "-t", "--runtime", podman_runtime, podman.image, "sh", "-c", "tty; exit 4",
        check=False,
    )  # fmt: skip
    assert r_.returncode == 4, r_.stderr
    assert r_.stdout.startswith("/dev/pts/"), r_.stdout
    name = f"tty-{podman_runtime}"
    containers.append(name)
    podman.podman("run", "-dt", "--runtime", podman_runtime, "--name", name, podman.image,
                  "sleep", "1000")  # fmt: skip
    assert podman.podman("exec", "-t", name, "tty").stdout.startswith("/dev/pts/")
    assert podman.podman("exec", name, "tty", check=False).stdout.strip() == "not a tty"
    podman.podman("rm", "-f", "-t", "0", name)


def test_stop_kills_a_container_ignoring_sigterm(
    podman: PodmanRig, podman_runtime: str, containers: list[str]
) -> None:
    """sleep as PID 1 has no handler for SIGTERM: stop -t 1 ends it with SIGKILL."""
    name = f"stubborn-{podman_runtime}"
    containers.append(name)
    podman.podman("run", "-d", "--runtime", podman_runtime, "--name", name, podman.image,
                  "sleep", "1000")  # fmt: skip
    podman.podman("stop", "-t", "1", name)
    assert podman.inspect(name, "{{.State.Status}}") == "exited"
    assert podman.inspect(name, "{{.State.ExitCode}}") == str(KILLED)
    podman.podman("rm", name)


def test_rm_force_running(podman: PodmanRig, podman_runtime: str, containers: list[str]) -> None:
    name = f"rmf-{podman_runtime}"
    containers.append(name)
    qemus = qemu_pids()
    podman.podman("run", "-d", "--runtime", podman_runtime, "--name", name, podman.image,
                  "sleep", "1000")  # fmt: skip
    assert podman.podman("exec", name, "true").returncode == 0
    new_vms = qemu_pids() - qemus
    assert len(new_vms) == (1 if podman_runtime == "carapace" else 0)
    podman.podman("rm", "-f", "-t", "0", name)
    assert podman.podman("ps", "-aq").stdout == ""
    assert not new_vms & qemu_pids(), "the container's VM outlived rm -f"


# -- pods --------------------------------------------------------------------------------------


def test_pod_members_share_one_vm(podman: PodmanRig, podman_runtime: str, pods: list[str]) -> None:
    """pod create + two run --pod: with carapace both members are in the pod's VM (same
    boot id, another kernel than the host's) and a container of another pod is in
    another VM; with runc all share the host's kernel."""
    rt = podman_runtime
    first, second = f"pod1-{rt}", f"pod2-{rt}"
    qemus = qemu_pids()
    for pod in (first, second):
        pods.append(pod)
        # the infra (pause) container runs with podman's default runtime: --runtime
        podman.podman("--runtime", rt, "pod", "create", "--name", pod)
    for pod, name in ((first, "a"), (first, "b"), (second, "c")):
        podman.podman("run", "-d", "--runtime", rt, "--pod", pod, "--name", f"{name}-{rt}",
                      podman.image, "sleep", "1000")  # fmt: skip
    a, b, c = (boot_id(podman, f"{n}-{rt}") for n in "abc")
    if rt == "carapace":
        assert a == b, "two members of one pod are not in one VM"
        assert a != c, "containers of two pods share a VM"
        assert HOST_BOOT_ID not in (a, c)
        assert len(qemu_pids() - qemus) == 2, "not one VM per pod"
    else:
        assert a == b == c == HOST_BOOT_ID
    # the members share the pod's namespaces (podman's default --share ipc,net,uts)
    ns = "for n in ipc net uts; do readlink /proc/self/ns/$n; done"
    seen = {n: podman.podman("exec", f"{n}-{rt}", "sh", "-c", ns).stdout for n in "abc"}
    assert seen["a"] == seen["b"] and seen["a"].count("[") == 3, seen
    if rt == "runc":  # (two VMs may well number their namespaces alike)
        assert seen["a"] != seen["c"]
    podman.podman("pod", "rm", "-f", "-t", "0", first, second, timeout=600)
    assert podman.podman("ps", "-aq").stdout == ""
    assert not (qemu_pids() - qemus), "a pod's VM outlived pod rm -f"


# -- annotations -------------------------------------------------------------------------------


def test_annotation_reaches_the_runtime(
    podman: PodmanRig, podman_runtime: str, containers: list[str]
) -> None:
    """--annotation k=v is in the spec the runtime gets: its state reports it."""
    name = f"ann-{podman_runtime}"
    containers.append(name)
    cid = podman.podman(
        "run", "-d", "--runtime", podman_runtime, "--name", name,
        "--annotation", "org.example.carapace-test=yes", podman.image, "sleep", "1000",
    ).stdout.strip()  # fmt: skip
    state = runtime_state(podman_runtime, cid)
    annotations = state.get("annotations")
    assert isinstance(annotations, dict), json.dumps(state)
    assert annotations.get("org.example.carapace-test") == "yes"
    assert state.get("status") == "running"


def test_sandbox_cpu_annotation_sizes_the_vm(podman: PodmanRig, podman_runtime: str) -> None:
    """openEuler's sandbox_cpu annotation: with carapace the container's VM has that many
    vCPUs (1 by default); runc ignores it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 host CPUs")
    nproc = podman.podman(
        "run", "--rm", "--runtime", podman_runtime,
        "--annotation", f"{r.SANDBOX_CPU}=2", podman.image, "nproc",
    ).stdout.strip()  # fmt: skip
    default = podman.podman(
        "run", "--rm", "--runtime", podman_runtime, podman.image, "nproc"
    ).stdout.strip()  # fmt: skip
    if podman_runtime == "carapace":
        assert (nproc, default) == ("2", "1")
    else:
        assert nproc == default


def test_runtime_flag_config_reaches_the_runtime(podman_carapace: PodmanRig) -> None:
    """``podman --runtime-flag config=FILE`` gives carapace another configuration for
    the containers of that call (podman passes ``--config=FILE`` before the verb to
    every runtime call it makes, runc included, so it is for carapace-only calls):
    default_vcpus = 2 there → 2 CPUs, where the rig's configuration gives 1."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 host CPUs")
    config = podman_carapace.base / "carapace-two-vcpus.toml"
    config.write_text("[hypervisor]\ndefault_vcpus = 2\n")
    run = ("run", "--rm", "--runtime", "carapace", podman_carapace.image, "nproc")
    flagged = podman_carapace.podman(*run, runtime_flags=[f"config={config}"])
    assert flagged.stdout.strip() == "2"
    assert podman_carapace.podman(*run).stdout.strip() == "1"
