#!/usr/bin/env python3
"""Boot-time benchmark: how far a carapace pod is from the floor of booting its kernel.

Measures, in one invocation (same machine state, rounds interleaved), N samples of:

* bare boot: plain QEMU, same kernel and machine flags, a tiny busybox initramfs whose
  /init prints a marker and powers off (time to the marker, and time to QEMU's exit);
* pod ready: ``Sandbox.start()`` until the agent answered and the guest sandbox exists;
* ``carapace run --memory 1G -- true`` end to end (a fresh process);
* host ``crun run`` of the same busybox bundle (reference: no VM at all).

Prints a Markdown table of medians (min, max) and the ratios to the bare boot, and
writes results/boot.json and results/boot.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from carapace.config import Config, load_config
from carapace.hypervisor import VMSpec
from carapace.hypervisor.qemu.accel import AccelChoice, choose_accelerator
from carapace.hypervisor.qemu.channels import ChannelFds
from carapace.hypervisor.qemu.cmdline import qemu_argv
from carapace.image.builder import ImageBuilder
from carapace.image.cpio import Entry, encode_archive
from carapace.image.store import GuestImage
from carapace.oci.spec import default_spec
from carapace.sandbox import Sandbox, SandboxOptions

MEMORY = "1G"
INIT_MARKER = b"CARAPACE-BENCH-REACHED-INIT"
BARE_TIMEOUT = 120.0
RUN_TIMEOUT = 300.0
CRUN_TIMEOUT = 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_UNIFIED = CGROUP_ROOT / "unified"
CRUN_STATE_DIR = Path("/run/crun")
HYBRID_ERROR = "hybrid mode not supported"
#: Options of carapace's QEMU argv (each with one value) that the bare boot leaves out:
#: naming, QMP, the pid file, the agent channel, the 9p share, the console's socket.
BARE_DROPPED_OPTIONS = {
    "-name",
    "-serial",
    "-qmp",
    "-mon",
    "-pidfile",
    "-device",
    "-chardev",
    "-fsdev",
}

BARE_INIT = "bare boot: reaches /init"
BARE_EXIT = "bare boot: QEMU exits"
POD_READY = "pod ready (Sandbox.start)"
CARAPACE_RUN = "carapace run true"
CRUN_RUN = "host crun run true"
ORDER = [BARE_INIT, BARE_EXIT, POD_READY, CARAPACE_RUN, CRUN_RUN]


class BenchError(Exception):
    """One measurement could not be taken; the message says why."""


@dataclass
class Measurement:
    name: str
    samples: list[float] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": [round(s, 4) for s in self.samples]}
        if self.samples:
            out.update(
                median=round(statistics.median(self.samples), 4),
                min=round(min(self.samples), 4),
                max=round(max(self.samples), 4),
            )
        if self.error is not None:
            out["error"] = self.error
        return out

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and self.error is None else None


# -- helpers ----------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cgroup_mode() -> str:
    if not CGROUP_ROOT.is_dir():
        return "none"
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return "unified (v2)"
    if (CGROUP_UNIFIED / "cgroup.controllers").exists():
        return "hybrid (v1 + v2 at /sys/fs/cgroup/unified)"
    return "legacy (v1)"


def _qemu_pids_with(needle: str) -> list[int]:
    """PIDs of QEMU processes whose command line contains ``needle``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and needle in cmd:
            pids.append(int(d.name))
    return pids


def _qemu_count() -> int:
    return len(_qemu_pids_with(""))


# -- 1. bare boot -------------------------------------------------------------------------


def build_tiny_initramfs(dest: Path) -> Path:
    """A newc initramfs with only /bin/busybox, /dev/console and an /init script."""
    busybox = Path("/bin/busybox").read_bytes()
    init = (
        f"#!/bin/busybox sh\n/bin/busybox echo {INIT_MARKER.decode()}\n/bin/busybox poweroff -f\n"
    ).encode()
    entries = [
        Entry("bin", stat.S_IFDIR | 0o755),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        Entry("dev", stat.S_IFDIR | 0o755),
        # without /dev/console the kernel gives /init no stdout at all
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        Entry("init", stat.S_IFREG | 0o755, init),
    ]
    dest.write_bytes(encode_archive(entries))
    return dest


def bare_argv(
    config: Config,
    kernel: Path,
    initrd: Path,
    accel: AccelChoice,
    vcpus: int,
    memory_mib: int,
    scratch: Path,
) -> list[str]:
    """carapace's own QEMU argv (machine, accel, CPU, memory, kernel params), minus the
    devices and sockets a pod adds, with the serial console on stdout."""
    spec = VMSpec(
        name="bench-bare",
        run_dir=scratch,
        kernel=kernel,
        initrd=initrd,
        vcpus=vcpus,
        memory_mib=memory_mib,
        accel=accel.accel,
        shared_dir=scratch,
        kernel_params=config.hypervisor.kernel_params,
        tcg_tb_size_mib=config.hypervisor.tcg_tb_size_mib,
    )
    full = qemu_argv(config.hypervisor.path, spec, ChannelFds(-1, -1, -1))  # all dropped
    argv: list[str] = []
    i = 0
    while i < len(full):
        if full[i] in BARE_DROPPED_OPTIONS:
            i += 2
            continue
        argv.append(full[i])
        i += 1
    return [*argv, "-serial", "stdio"]


def guest_of(config: Config, who: str) -> tuple[GuestImage, Path, Path, AccelChoice]:
    """The guest image, the kernel and initrd a pod boots (configuration overrides
    first) and the accelerator it runs under; exits when no image is built."""
    hv = config.hypervisor
    image = ImageBuilder(config.image_dir).current()
    if image is None:
        raise SystemExit(
            f"{who}: no guest image in {config.image_dir}; build it with `carapace guest build`"
        )
    kernel = Path(hv.kernel) if hv.kernel else image.kernel
    initrd = Path(hv.initrd) if hv.initrd else image.initrd
    accel = choose_accelerator(
        hv.accel, hv.path, kernel, initrd, Path(config.runtime.state_dir) / "accel.json"
    )
    return image, kernel, initrd, accel


def measure_bare(argv: list[str]) -> tuple[float, float]:
    """(seconds until /init printed the marker, seconds until QEMU exited)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    out, err = bytearray(), bytearray()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    for f in (proc.stdout, proc.stderr):
        sel.register(f.fileno(), selectors.EVENT_READ)
    t_init: float | None = None
    try:
        while bufs:
            left = BARE_TIMEOUT - (time.perf_counter() - t0)
            if left <= 0:
                raise BenchError(
                    f"bare boot: no exit within {BARE_TIMEOUT:g}s (console: {bytes(out[-300:])!r})"
                )
            for key, _ in sel.select(timeout=left):
                fd = int(key.fd)
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    del bufs[fd]
                    continue
                bufs[fd] += chunk
                if t_init is None and fd == proc.stdout.fileno() and INIT_MARKER in out:
                    t_init = time.perf_counter() - t0
        rc = proc.wait(timeout=BARE_TIMEOUT)
        t_exit = time.perf_counter() - t0
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if t_init is None:
        raise BenchError(
            f"bare boot: /init never printed its marker (QEMU status {rc}); "
            f"console tail: {bytes(out[-400:])!r}; stderr: {bytes(err[-300:])!r}"
        )
    if rc != 0:
        raise BenchError(f"bare boot: QEMU exited with status {rc}: {bytes(err[-300:])!r}")
    return t_init, t_exit


# -- 2. pod ready -------------------------------------------------------------------------


#: The agent's line on the guest console with its boot timeline (guest/agent.py).
GUEST_UP = re.compile(
    r"guest up: /init at ([\d.]+)s after boot, agent imported at ([\d.]+)s, "
    r"early init done at ([\d.]+)s"
)
#: The steps of that timeline, in the guest's clock (seconds since its kernel started).
GUEST_STEPS = ("/init started", "agent imported", "early init done")
#: The agent's line when it opened its port (guest/server.py): the timeline's last step.
GUEST_PORT = re.compile(r"agent port \S+ opened at ([\d.]+)s after boot")
PORT_STEP = "agent port opened"


def guest_timeline(console: str) -> dict[str, float]:
    """The agent's boot timeline from its console output ({} if it printed none)."""
    m = GUEST_UP.search(console)
    if m is None:
        return {}
    steps = dict(zip(GUEST_STEPS, map(float, m.groups()), strict=True))
    port = GUEST_PORT.search(console, m.end())
    if port is not None:
        steps[PORT_STEP] = float(port.group(1))
    return steps


async def _pod_ready(config: Config, sandbox_id: str, timelines: list[dict[str, float]]) -> float:
    sb = Sandbox(config, SandboxOptions(memory=MEMORY, sandbox_id=sandbox_id))
    try:
        t0 = time.perf_counter()
        await sb.start()
        dt = time.perf_counter() - t0
        if sb.vm is not None:
            await asyncio.sleep(0.1)  # (untimed) the console's last lines reach its log
            with contextlib.suppress(OSError):
                timeline = guest_timeline(sb.vm.spec.console_log.read_text(errors="replace"))
                if timeline:
                    timelines.append({"host: pod ready": round(dt, 4), **timeline})
        return dt
    finally:
        await sb.destroy()


def measure_pod_ready(
    config: Config, sandbox_id: str, timelines: list[dict[str, float]] | None = None
) -> float:
    """Seconds of ``Sandbox.start()``; the guest's own timeline of each boot goes to
    ``timelines``."""
    try:
        return asyncio.run(_pod_ready(config, sandbox_id, [] if timelines is None else timelines))
    except Exception as e:
        raise BenchError(f"pod ready: {type(e).__name__}: {e}") from e


# -- 3. carapace run ----------------------------------------------------------------------


def carapace_cli() -> str:
    beside = Path(sys.executable).parent / "carapace"
    if beside.is_file():
        return str(beside)
    found = shutil.which("carapace")
    if found is None:
        raise SystemExit("boot.py: cannot find the carapace CLI (run it with the venv's python)")
    return found


def measure_carapace_run(cli: str, sandbox_id: str) -> float:
    argv = [cli, "run", "--memory", MEMORY, "--name", sandbox_id, "--", "true"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"carapace run: no exit within {RUN_TIMEOUT:g}s") from e
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(
            f"carapace run: exit status {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}"
        )
    return dt


# -- 4. host crun -------------------------------------------------------------------------


def make_bundle(rootfs: Path, bundle: Path) -> Path:
    bundle.mkdir()
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    spec = default_spec(["true"])
    spec["ociVersion"] = "1.0.2"
    spec["root"]["path"] = "rootfs"
    (bundle / "config.json").write_text(json.dumps(spec, indent=1) + "\n")
    return bundle


def _crun_once(argv: list[str], bundle: str, cid: str) -> tuple[int, float, str]:
    """Time one ``crun run``; always delete the container afterwards (untimed)."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            [*argv, "run", "--bundle", bundle, cid],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CRUN_TIMEOUT,
        )
        rc, msg = r.returncode, (r.stderr or r.stdout).strip()
    except subprocess.TimeoutExpired:
        rc, msg = -1, f"no exit within {CRUN_TIMEOUT:g}s"
    dt = time.perf_counter() - t0
    subprocess.run([*argv, "delete", "-f", cid], capture_output=True, timeout=CRUN_TIMEOUT)
    return rc, dt, msg


def crun_helper() -> int:
    """The hidden ``--crun-helper`` mode: runs in a private mount namespace (started by
    ``unshare -m``) where the cgroup v2 half of a hybrid setup is unmounted, so crun
    sees plain cgroup v1. Reads "BUNDLE ID" lines, answers JSON lines."""
    if os.path.ismount(CGROUP_UNIFIED):
        r = subprocess.run(["umount", str(CGROUP_UNIFIED)], capture_output=True, text=True)
        if r.returncode != 0:
            print(json.dumps({"error": f"umount {CGROUP_UNIFIED}: {r.stderr.strip()}"}), flush=True)
            return 1
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        bundle, cid = line.split()
        rc, dt, msg = _crun_once(["crun"], bundle, cid)
        print(json.dumps({"rc": rc, "seconds": dt, "message": msg}), flush=True)
    return 0


class CrunRunner:
    """Runs crun on the host as-is if it can; if it refuses the host's hybrid cgroups
    (crun supports only v1 or v2, not both), from a helper in a private mount namespace
    where only the v1 hierarchies are visible. ``note`` says which."""

    def __init__(self, bundle: Path, prefix: str) -> None:
        self.bundle = bundle
        self.prefix = prefix
        self.note = ""
        self.error: str | None = None
        self.ids: list[str] = []
        self._helper: subprocess.Popen[str] | None = None
        self._argv: list[str] = []
        self._n = 0

    def _next_id(self) -> str:
        self._n += 1
        cid = f"{self.prefix}-crun-{self._n}"
        self.ids.append(cid)
        return cid

    def setup(self) -> None:
        crun = shutil.which("crun")
        if crun is None:
            self.error = "crun is not installed on this host"
            return
        tried = []
        for argv in (["crun"], ["crun", "--cgroup-manager=disabled"]):
            rc, _, msg = _crun_once(argv, str(self.bundle), self._next_id())
            if rc == 0:
                self._argv = argv
                self.note = f"`{' '.join(argv)} run` directly on the host"
                return
            tried.append(f"`{' '.join(argv)} run`: {msg or f'exit status {rc}'}")
        if not any(HYBRID_ERROR in t for t in tried) or shutil.which("unshare") is None:
            self.error = "crun cannot run here: " + "; ".join(tried)
            return
        self._helper = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                str(Path(__file__).resolve()),
                "--crun-helper",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        ready = self._reply()
        if "ready" not in ready:
            self.error = (
                "crun cannot run here: "
                + "; ".join(tried)
                + f"; in a private mount namespace: {ready.get('error', ready)}"
            )
            self.close()
            return
        rc, _, msg = self._run_in_helper(self._next_id())
        if rc != 0:
            self.error = (
                "crun cannot run here: "
                + "; ".join(tried)
                + f"; in a private mount namespace without the v2 hierarchy: {msg}"
            )
            self.close()
            return
        self.note = (
            "the host's cgroups are hybrid (v1 + v2) and crun refuses them "
            f'("{HYBRID_ERROR}", with any cgroup manager), so `crun run` runs '
            f"in a private mount namespace with {CGROUP_UNIFIED} unmounted "
            "(crun then uses the v1 hierarchies, cgroupfs manager); only the "
            "crun command itself is timed"
        )

    def _reply(self) -> dict[str, Any]:
        assert self._helper is not None and self._helper.stdout is not None
        line = self._helper.stdout.readline()
        if not line:
            return {"error": f"helper exited (status {self._helper.wait()})"}
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _run_in_helper(self, cid: str) -> tuple[int, float, str]:
        assert self._helper is not None and self._helper.stdin is not None
        self._helper.stdin.write(f"{self.bundle} {cid}\n")
        self._helper.stdin.flush()
        r = self._reply()
        if "rc" not in r:
            return -1, 0.0, str(r.get("error", r))
        return int(r["rc"]), float(r["seconds"]), str(r["message"])

    def measure(self) -> float:
        if self.error is not None:
            raise BenchError(self.error)
        cid = self._next_id()
        if self._helper is not None:
            rc, dt, msg = self._run_in_helper(cid)
        else:
            rc, dt, msg = _crun_once(self._argv, str(self.bundle), cid)
        if rc != 0:
            raise BenchError(f"crun run: exit status {rc}: {msg}")
        return dt

    def close(self) -> None:
        if self._helper is not None:
            assert self._helper.stdin is not None
            with contextlib.suppress(OSError):
                self._helper.stdin.close()
            try:
                self._helper.wait(timeout=CRUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._helper.kill()
                self._helper.wait()
            if self._helper.stdout is not None:
                self._helper.stdout.close()
            self._helper = None


# -- leftovers ----------------------------------------------------------------------------


def leftovers(config: Config, prefix: str, scratch: Path, crun_ids: list[str]) -> list[str]:
    """Whatever this run made that still exists."""
    found = [f"QEMU pid {p}" for p in _qemu_pids_with(prefix) + _qemu_pids_with(str(scratch))]
    run_dir = Path(config.runtime.run_dir)
    if run_dir.is_dir():
        found += [str(p) for p in run_dir.iterdir() if p.name.startswith(prefix)]
    found += [str(CRUN_STATE_DIR / c) for c in crun_ids if (CRUN_STATE_DIR / c).exists()]
    if CGROUP_ROOT.is_dir():
        for hier in CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                found += [str(hier / c) for c in crun_ids if (hier / c).exists()]
    if scratch.exists():
        found.append(str(scratch))
    return found


# -- report -------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def measurement_row(name: str, m: Measurement, *extra: object) -> str:
    """A row of a report's measurement table: name, median, min, max, runs and any
    ``extra`` cells, or the failure in place of the figures."""
    tail = " | ".join(str(e) for e in (len(m.samples), *extra))
    if m.error is not None:
        err = m.error.replace("|", "/").replace("\n", " ")
        return f"| {name} | failed: {err} | | | {tail} |"
    s = m.summary()
    return (
        f"| {name} | {_fmt(s.get('median'))} | {_fmt(s.get('min'))} | "
        f"{_fmt(s.get('max'))} | {tail} |"
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else float(f"{a / b:.3g}")


def ratios(results: dict[str, Measurement]) -> dict[str, float | None]:
    floor = results[BARE_INIT].median
    return {
        "pod_ready / bare_boot": _ratio(results[POD_READY].median, floor),
        "carapace_run / bare_boot": _ratio(results[CARAPACE_RUN].median, floor),
        "crun / bare_boot": _ratio(results[CRUN_RUN].median, floor),
        "bare_boot_exit / bare_boot": _ratio(results[BARE_EXIT].median, floor),
    }


def timeline_medians(timelines: list[dict[str, float]]) -> dict[str, float]:
    """Each step's median over the pod boots that reported it."""
    keys = list(dict.fromkeys(k for t in timelines for k in t))
    return {k: round(statistics.median(t[k] for t in timelines if k in t), 3) for k in keys}


def markdown(
    machine: dict[str, Any],
    runs: int,
    results: dict[str, Measurement],
    rat: dict[str, float | None],
    notes: list[str],
    timeline: dict[str, float] | None = None,
) -> str:
    lines = [
        "# carapace boot benchmark",
        "",
        f"{machine['date']} · {machine['nproc']} CPUs ({machine['cpu']}) · host kernel "
        f"{machine['host_kernel']} · {machine['qemu']} · accel **{machine['accel']}** "
        f"({machine['accel_reason']})",
        "",
        f"Medians of {runs} runs per row, rounds interleaved, in one invocation "
        f"({machine['warmup_rounds']} untimed warm-up round(s) first).",
        "",
        "| measurement | median s | min s | max s | runs |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ORDER:
        lines.append(measurement_row(name, results[name]))
    lines += ["", "| ratio (of medians) | value |", "|---|---:|"]
    labels = {
        "pod_ready / bare_boot": "**pod ready ÷ bare boot** (to /init)",
        "carapace_run / bare_boot": "**carapace run ÷ bare boot** (to /init)",
        "crun / bare_boot": "host crun ÷ bare boot (reference)",
        "bare_boot_exit / bare_boot": "bare boot to exit ÷ to /init",
    }
    for key, label in labels.items():
        v = rat.get(key)
        lines.append(f"| {label} | {'n/a' if v is None else f'{v:.3g}x'} |")
    if timeline:
        lines += [
            "",
            "Where a pod's boot goes, by the guest's clock (seconds since its kernel "
            "started; medians), beside the host's time to pod ready:",
            "",
            "| step | s |",
            "|---|---:|",
            *[f"| {k} | {v:.3f} |" for k, v in timeline.items()],
        ]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------


def _timed(
    results: dict[str, Measurement], name: str, record: bool, fn: Callable[[], float]
) -> None:
    m = results[name]
    if m.error is not None:
        return
    try:
        dt = fn()
    except BenchError as e:
        m.error = str(e)
        return
    if record:
        m.samples.append(dt)


def bare(argv: list[str], results: dict[str, Measurement], record: bool) -> float:
    """One bare boot: records the time to exit, returns the time to /init."""
    t_init, t_exit = measure_bare(argv)
    if record:
        results[BARE_EXIT].samples.append(t_exit)
    return t_init


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="carapace-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (5)")
    ap.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first, to warm the page cache (1)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for boot.json and boot.md (benchmarks/results)",
    )
    ap.add_argument("--crun-helper", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.crun_helper:
        return crun_helper()
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")
    if os.geteuid() != 0:
        ap.error("run it as root (pods and crun need it)")

    config = load_config()
    hv = config.hypervisor
    image, kernel, _initrd, accel = guest_of(config, "boot.py")
    # the same sizing a pod gets (the constructor validates only; it creates nothing)
    sizing = Sandbox(config, SandboxOptions(memory=MEMORY))
    cli = carapace_cli()
    prefix = f"bench-{secrets.token_hex(3)}"
    machine: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "host_kernel": platform.release(),
        "qemu": _first_line([hv.path, "--version"]),
        "qemu_binary": hv.path,
        "accel": accel.accel,
        "accel_reason": accel.reason,
        "guest_kernel": str(kernel),
        "vm_vcpus": sizing.vcpus,
        "vm_memory_mib": sizing.memory_mib,
        "crun": _first_line(["crun", "--version"]) if shutil.which("crun") else "absent",
        "cgroups": _cgroup_mode(),
        "python": platform.python_version(),
        "config": config.source,
        "warmup_rounds": args.warmup,
        "qemu_processes_at_start": _qemu_count(),
        "loadavg_at_start": os.getloadavg()[0],
    }
    results = {name: Measurement(name) for name in ORDER}
    timelines: list[dict[str, float]] = []
    notes: list[str] = []
    crun_ids: list[str] = []
    # on SIGTERM, unwind through the finally blocks below (which clean up)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with _scratch_dir() as scratch:
        tiny = build_tiny_initramfs(scratch / "tiny-initramfs.cpio")
        argv_bare = bare_argv(config, kernel, tiny, accel, sizing.vcpus, sizing.memory_mib, scratch)
        machine["bare_boot_argv"] = argv_bare
        crun = CrunRunner(make_bundle(image.rootfs, scratch / "bundle"), prefix)
        try:
            crun.setup()
            crun_ids = crun.ids
            if crun.note:
                notes.append(f"crun: {crun.note}.")
            total = args.warmup + args.runs
            for i in range(total):
                record = i >= args.warmup
                tag = f"run {i - args.warmup + 1}/{args.runs}" if record else "warm-up"
                print(
                    f"[{tag}] bare boot, pod ready, carapace run, crun ...",
                    file=sys.stderr,
                    flush=True,
                )

                _timed(results, BARE_INIT, record, partial(bare, argv_bare, results, record))
                if results[BARE_INIT].error is not None:
                    results[BARE_EXIT].error = results[BARE_INIT].error
                _timed(
                    results,
                    POD_READY,
                    record,
                    partial(
                        measure_pod_ready,
                        config,
                        f"{prefix}-pod-{i}",
                        timelines if record else None,
                    ),
                )
                _timed(
                    results,
                    CARAPACE_RUN,
                    record,
                    partial(measure_carapace_run, cli, f"{prefix}-run-{i}"),
                )
                _timed(results, CRUN_RUN, record, crun.measure)
        finally:
            crun.close()
            crun_ids = crun.ids
    left = leftovers(config, prefix, scratch, crun_ids)
    machine["qemu_processes_at_end"] = _qemu_count()
    if machine["qemu_processes_at_start"]:
        notes.append(
            f"{machine['qemu_processes_at_start']} other QEMU process(es) were "
            "running when the benchmark started; figures may be inflated."
        )
    if left:
        notes.append("LEFT BEHIND: " + ", ".join(left))

    rat = ratios(results)
    timeline = timeline_medians(timelines)
    report = {
        "machine": machine,
        "runs": args.runs,
        "results": {name: results[name].summary() for name in ORDER},
        "ratios": rat,
        "guest_timeline": {"median": timeline, "samples": timelines},
        "notes": notes,
    }
    md = markdown(machine, args.runs, results, rat, notes, timeline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "boot.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "boot.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'boot.json'} and {args.out / 'boot.md'}", file=sys.stderr)
    failed = any(m.error is not None for name, m in results.items() if name != CRUN_RUN)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
