"""The walking skeleton through the Python API, sharing one pod VM."""

from __future__ import annotations

import hashlib
import threading

import carapace
from carapace.config import load_config
from carapace.image.builder import ImageBuilder

from .conftest import host_kernel


def test_container_sees_the_guest_kernel(shared_sandbox: carapace.Sandbox) -> None:
    r = shared_sandbox.run(["uname", "-r"])
    guest = ImageBuilder(load_config().image_dir).current()
    assert guest is not None
    assert r.exit_code == 0, r.stderr
    assert r.text.strip() == guest.kernel_release
    assert r.text.strip() != host_kernel()


def test_exit_codes(shared_sandbox: carapace.Sandbox) -> None:
    assert shared_sandbox.run(["true"]).exit_code == 0
    assert shared_sandbox.run(["sh", "-c", "exit 3"]).exit_code == 3
    # (a SIGKILL from the host giving 137 is in test_lifecycle: inside its pid
    # namespace, the container's init cannot be killed by its own processes)
    # a child dying of SIGTERM, as its shell sees it
    assert shared_sandbox.run(["sh", "-c", "sh -c 'kill -15 $$'; echo $?"]).text == "143\n"


def test_stdout_and_stderr_are_separate(shared_sandbox: carapace.Sandbox) -> None:
    r = shared_sandbox.run(["sh", "-c", "echo out; echo err >&2"])
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")


def test_stdin_is_piped_through(shared_sandbox: carapace.Sandbox) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    r = shared_sandbox.run(["sh", "-c", "cat; echo done >&2"], stdin=data)
    assert r.exit_code == 0
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert r.stderr == b"done\n"


def test_large_output_arrives_intact(shared_sandbox: carapace.Sandbox) -> None:
    n = 1_500_000  # `seq` prints about 10.9 MB
    expected = "".join(f"{i}\n" for i in range(1, n + 1)).encode()
    assert len(expected) >= 10 * 2**20
    r = shared_sandbox.run(["seq", "1", str(n)])
    assert r.exit_code == 0
    assert len(r.stdout) == len(expected)
    assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(expected).digest()


def test_environment_and_workdir(shared_sandbox: carapace.Sandbox) -> None:
    r = shared_sandbox.run(
        ["sh", "-c", 'echo "$FOO|$EMPTY|$(pwd)"'], env=["FOO=bar baz", "EMPTY="], cwd="/tmp"
    )
    assert r.text == "bar baz||/tmp\n"


def test_containers_share_the_vm_but_not_the_rootfs(shared_sandbox: carapace.Sandbox) -> None:
    results: dict[str, carapace.RunResult] = {}

    def run(name: str) -> None:
        # each writes a file into its own rootfs, then lists what the other wrote
        results[name] = shared_sandbox.run(
            [
                "sh",
                "-c",
                (
                    f"echo {name} > /marker-{name}; sleep 1; ls / | grep marker; "
                    "cat /proc/sys/kernel/random/boot_id; grep ' / ' /proc/self/mountinfo"
                ),
            ]
        )

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = results["a"].text.splitlines(), results["b"].text.splitlines()
    assert a[0] == "marker-a" and b[0] == "marker-b"  # neither sees the other's file
    assert a[1] == b[1] == shared_sandbox.boot_id  # one VM
    assert a[2] != b[2]  # different root mounts
    # and the shared busybox rootfs on the host was not written
    guest = ImageBuilder(load_config().image_dir).current()
    assert guest is not None
    assert not list(guest.rootfs.glob("marker-*"))


def test_sequential_containers_in_one_sandbox(shared_sandbox: carapace.Sandbox) -> None:
    outs = [shared_sandbox.run(["echo", str(i)]).text for i in range(3)]
    assert outs == ["0\n", "1\n", "2\n"]


def test_guest_details(shared_sandbox: carapace.Sandbox) -> None:
    d = shared_sandbox.guest_details()
    assert d.online_cpus == 1
    assert 900 * 2**20 < d.mem_total_bytes <= 1024 * 2**20  # the 1G default
    assert d.crun_version.startswith("crun version")
