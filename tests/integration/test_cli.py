"""`carapace run` as a user runs it: a subprocess with real stdio and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from carapace.config import load_config
from carapace.image.builder import ImageBuilder

from .conftest import CARAPACE, RUN_ROOT, host_kernel, qemu_pids


def carapace(
    *args: str, stdin: bytes | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CARAPACE, *args], input=stdin, capture_output=True, timeout=timeout)


def _stop(p: subprocess.Popen[bytes]) -> None:
    """End a `carapace run` a test started, the way a user would (two Ctrl-Cs)."""
    for _ in range(2):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            time.sleep(1)
    if p.poll() is None:
        p.kill()
    p.wait(60)


def test_run_prints_guest_kernel_and_exit_code() -> None:
    r = carapace("run", "--memory", "1G", "--", "sh", "-c", "uname -r; exit 3")
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
        [CARAPACE, "run", "--memory", "1G", "--", "sh", "-c", "echo ready; sleep 300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        assert qemu_pids() - before  # the pod VM is up
        # first SIGINT goes to the container (sh as its pid 1 ignores it), the second aborts
        p.send_signal(signal.SIGINT)
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        p.wait(60)
    finally:
        _stop(p)
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


def test_run_with_a_terminal() -> None:
    # `script` gives carapace a real pty as its stdin/stdout
    cmd = f"{CARAPACE} run -t -- sh -c 'tty; stty size; exit 4'"
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"],
        capture_output=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 4, (out, r.stderr)
    assert "/dev/pts/" in out, out


def test_gc_releases_what_a_killed_owner_left() -> None:
    before_qemu = qemu_pids()
    name = f"gc-test-{os.getpid()}"
    run_dir = RUN_ROOT / name
    p = subprocess.Popen(
        [
            CARAPACE,
            "run",
            "--name",
            name,
            "--memory",
            "1G",
            "--",
            "sh",
            "-c",
            "echo ready; sleep 300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        assert (run_dir / "state.json").exists()
    except BaseException:
        _stop(p)
        raise
    with open("/proc/self/mounts") as f:
        assert any(str(run_dir) in line for line in f)  # the rootfs share is mounted
    p.kill()  # no chance to clean up
    p.wait(30)
    # the VM dies with its owner; the run dir and the mount remain until gc
    state = json.loads((run_dir / "state.json").read_text())
    deadline = time.monotonic() + 30
    while state["qemu_pid"] in qemu_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state["qemu_pid"] not in qemu_pids() | before_qemu
    assert run_dir.exists()
    r = carapace("gc", timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"removed sandbox {run_dir.name}" in r.stdout.decode()
    assert not run_dir.exists()
    with open("/proc/self/mounts") as f:
        assert not any(str(run_dir) in line for line in f)


def test_factory_status_and_destroy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`carapace factory status` lists the templates of the configured template_dir and
    `destroy` removes them, without a VM: the template here is made by hand as a build
    leaves one (RAM file with the pages touched, device state, template.json)."""
    from carapace.factory.template import file_identity

    cfg = load_config()
    hv = cfg.hypervisor
    guest = ImageBuilder(cfg.image_dir).current()
    assert guest is not None
    # short: template_dir has at most 56 characters; destroy removes it
    with tempfile.TemporaryDirectory(
        prefix="tpl-", dir="/dev/shm", ignore_cleanup_errors=True
    ) as root:
        key = "0123456789abcdef01234567"
        t = Path(root) / key
        t.mkdir()
        with open(t / "memory", "wb") as f:
            f.truncate(512 << 20)  # 512 MiB of guest RAM, 3 MiB of it touched
            f.write(os.urandom(3 << 20))
        (t / "state").write_bytes(b"QEVM")
        inputs = {
            "format": 1,
            "argv": [],
            "qemu": file_identity(hv.path),
            "kernel": file_identity(guest.kernel),
            "initrd": file_identity(guest.initrd),
        }
        info = {"key": key, "built": time.time(), "build_seconds": 7.5, "inputs": inputs}
        (t / "template.json").write_text(json.dumps(info))
        (Path(root) / "ffff.building").mkdir()  # a build that died half-way
        config = tmp_path / "configuration.toml"
        config.write_text(f'[factory]\ntemplate = true\ntemplate_dir = "{root}"\n')
        env = {**os.environ, "CARAPACE_CONFIG": str(config)}

        def factory(*args: str) -> str:
            r = subprocess.run(
                [CARAPACE, "factory", *args], capture_output=True, env=env, timeout=60
            )
            assert r.returncode == 0, r.stderr
            return r.stdout.decode()

        out = factory("status")
        assert out.startswith(f"templates: enabled ([factory] template = true in {config})\n")
        assert f"template_dir: {root}\n" in out
        assert f"{key}: built " in out and " in 7.5 s, memory 3.0 MiB on disk of 512.0 MiB" in out
        assert f"  kernel: {os.path.realpath(guest.kernel)}\n" in out
        status = json.loads(factory("status", "--json"))
        assert status["enabled"] is True and status["template_dir"] == root
        [entry] = status["templates"]  # the half-made one is no template
        assert entry["key"] == key and entry["memory_mib_on_disk"] == 3.0
        assert entry["qemu"] == os.path.realpath(hv.path)
        assert entry["initrd"] == os.path.realpath(guest.initrd)

        assert factory("destroy") == f"removed 1 template from {root}\n"
        assert not os.path.exists(root)
        assert factory("status").endswith("no templates\n")
        assert factory("destroy") == f"removed 0 templates from {root}\n"
