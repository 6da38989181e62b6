"""`carapace run` as a user runs it: a subprocess with real stdio and signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from carapace.config import load_config
from carapace.image.builder import ImageBuilder

from .conftest import CARAPACE, RUN_ROOT, host_kernel, qemu_pids


def carapace(
    *args: str, stdin: bytes | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CARAPACE, *args], input=stdin, capture_output=True, timeout=timeout)


def test_run_prints_guest_kernel_and_exit_code() -> None:
    r = carapace("run", "--memory", "512M", "--", "sh", "-c", "uname -r; exit 3")
    guest = ImageBuilder(load_config().image_dir).current()
    assert guest is not None
    assert r.returncode == 3, r.stderr
    assert r.stdout.decode().strip() == guest.kernel_release != host_kernel()


def test_run_relays_stdin() -> None:
    r = subprocess.run(
        f"echo hi | {CARAPACE} run -i -- cat", shell=True, capture_output=True, timeout=180
    )
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr


def test_run_with_a_bundle_and_a_rootfs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    guest = ImageBuilder(load_config().image_dir).current()
    assert guest is not None
    r = carapace(
        "run",
        "--rootfs",
        str(guest.rootfs),
        "--env",
        "A=1",
        "--workdir",
        "/etc",
        "--",
        "sh",
        "-c",
        "echo $A $(pwd)",
    )
    assert (r.returncode, r.stdout) == (0, b"1 /etc\n"), r.stderr


def test_interrupt_cleans_up() -> None:
    before = qemu_pids()
    p = subprocess.Popen(
        [CARAPACE, "run", "--memory", "512M", "--", "sh", "-c", "echo ready; sleep 300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    assert qemu_pids() - before  # the pod VM is up
    # first SIGINT goes to the container (sh as its pid 1 ignores it), the second aborts
    p.send_signal(signal.SIGINT)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    p.wait(60)
    assert p.returncode != 0
    assert not (qemu_pids() - before)


def test_bad_input_is_one_line_with_status_125() -> None:
    cases = {
        ("run", "--bogus", "--", "true"): "--bogus",
        ("run", "--rootfs", "/nonexistent/rootfs", "--", "true"): "/nonexistent/rootfs",
        ("run", "--memory", "16M", "--", "true"): "16M",
        ("run", "--memory", "lots", "--", "true"): "lots",
        ("run", "--cpus", "two", "--", "true"): "two",
        ("run", "--cpus", "64", "--", "true"): "64",
        ("run", "--env", "NOEQUALS", "--", "true"): "NOEQUALS",
        ("run",): "no command",
    }
    for args, needle in cases.items():
        before = set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()
        r = carapace(*args, timeout=30)
        err = r.stderr.decode()
        assert r.returncode == 125, (args, err)
        assert err.count("\n") == 1 and err.startswith("carapace: "), (args, err)
        assert needle in err, (args, err)
        assert (set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()) == before


def test_check_reports_a_verdict() -> None:
    r = carapace("check", "--json", timeout=120)
    report = json.loads(r.stdout)
    names = {c["name"]: c for c in report["checks"]}
    assert report["ready"] is True and r.returncode == 0
    assert {"qemu", "guest image", "crun in image", "accelerator", "cgroups", "tun"} <= set(names)
    accel = names["accelerator"]["detail"]
    assert accel.startswith(("kvm", "tcg")) and ":" in accel
