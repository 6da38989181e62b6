#!/usr/bin/env python3
"""containerd benchmark: carapace behind containerd, against runc and the bare boot floor.

Starts a private containerd (tests/integration/containerd/rig.py, with its own
directories, bridge and pod subnet, so it can run beside the integration tests) and
measures, in one invocation (rounds interleaved), N samples of:

* bare boot: plain QEMU with the shim's VM size, the same guest kernel and a tiny
  initramfs (``measure_bare`` from benchmarks/boot.py);
* ``ctr run --rm --runtime io.containerd.carapace.v2 busybox ID true``, wall time; and
  the same with ``--runtime-config-path`` naming a configuration with VM templates on
  (``[factory] template = true``: the pod restored from a template, built in the
  warm-up round);
* the same ``ctr run`` with ``--runtime io.containerd.runc.v2``;
* CRI, runtime handler "carapace": one pod alone (RunPodSandbox, CreateContainer and
  StartContainer of a busybox ``sleep 3600`` container, until it runs), then P pods
  (default 8) started the same way from P threads at once, until all run; while they
  run: the QEMU processes of our shims and the sum of their VmRSS (peak), per pod; both
  again with the runtime handler "carapace-template" (pods from a VM template);
* a whole CRI pod life, with runtime handler "carapace" and "runc": RunPodSandbox, two
  containers created and started, 7 ExecSyncs, ContainerStats, StopPodSandbox and
  RemovePodSandbox, each step timed.

Reports ``carapace ctr run ÷ (bare boot + runc ctr run)``, ``P pods ÷ 1 pod`` and the
pod life's steps side by side, prints a Markdown table and writes
results/containerd.json and results/containerd.md.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # boot.py beside us; tests/ is a package at the root
    if _p not in sys.path:
        sys.path.insert(0, _p)

import boot  # noqa: E402
import cri_api as api  # noqa: E402
from boot import BenchError, Measurement  # noqa: E402

from carapace.config import load_config  # noqa: E402
from carapace.factory import TemplateStore  # noqa: E402
from carapace.sandbox import Sandbox, SandboxOptions  # noqa: E402
from tests.integration.containerd import rig as rig_module  # noqa: E402
from tests.integration.containerd.rig import (  # noqa: E402
    BUSYBOX_IMAGE,
    CARAPACE,
    RUNC,
    TEMPLATE_HANDLER,
    ContainerdRig,
    RigError,
    pod_config,
)

#: The benchmark's own containerd: not the test rigs' directories, bridge or subnet
#: (those are /var/lib/carapace-test*, carapace-testN, 10.234+N.0.0/24).
BENCH_BASE = Path("/var/lib/carapace-bench")
BENCH_STATE = Path("/run/carapace-bench/containerd")
BENCH_BRIDGE = "carapace-bench0"
BENCH_SUBNET = "10.233.0.0/24"
BENCH_TEMPLATES = Path("/dev/shm/carapace-bench-templates")

HANDLER = "carapace"  # the CRI runtime handler
CTR_TIMEOUT = 600.0
CRI_TIMEOUT = 600.0
SETTLE_TIMEOUT = 120.0
MONITOR_INTERVAL = 0.5
KIB_PER_MIB = 1024

BARE_INIT = "bare boot: reaches /init"
BARE_EXIT = "bare boot: QEMU exits"
CTR_CARAPACE = "ctr run --rm … true (carapace)"
CTR_RUNC = "ctr run --rm … true (runc)"
CRI_ONE = "CRI: 1 pod (carapace)"
CTR_TEMPLATE = "ctr run --rm … true (carapace, template)"
CRI_ONE_TEMPLATE = "CRI: 1 pod (carapace, template)"
LIFE_CARAPACE = "CRI pod life (carapace)"
LIFE_RUNC = "CRI pod life (runc)"


def cri_many_name(n: int, template: bool = False) -> str:
    return f"CRI: {n} pods in parallel (carapace{', template' if template else ''})"


#: Issue 16's goals for the ratios (a ratio at most this is met).
GOALS = {
    "ctr_template / (bare_boot + ctr_runc)": 1.0,
    "cri_{n}_pods / cri_1_pod": 4.5,
    "cri_{n}_pods_template / cri_1_pod_template": 4.5,
}


# -- processes ----------------------------------------------------------------------------


def _processes() -> Iterator[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, argv) of every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        yield int(entry.name), ppid, argv


def _is_qemu(argv: list[bytes]) -> bool:
    return bool(argv) and os.path.basename(argv[0]).startswith(b"qemu-system")


def _is_shim_of(argv: list[bytes], socket: bytes) -> bool:
    """A shim of our containerd: ``-address SOCKET`` among its arguments (carapace's shim
    daemon runs as ``python -m carapace.shim``, runc's as ``containerd-shim-runc-v2``)."""
    return any(a == b"-address" and argv[i + 1 : i + 2] == [socket] for i, a in enumerate(argv))


def _status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM); 0 once the process is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Snapshot:
    shims: list[int]
    qemu: list[int]  # QEMU processes whose parent is one of our shims
    foreign_qemu: list[int]  # any other QEMU, except our own bare boots

    def qemu_rss_kib(self) -> int:
        return sum(_status_kib(p, "VmRSS") for p in self.qemu)

    def qemu_hwm_kib(self) -> int:
        return sum(_status_kib(p, "VmHWM") for p in self.qemu)

    def shim_rss_kib(self) -> int:
        return sum(_status_kib(p, "VmRSS") for p in self.shims)


def snapshot(socket: Path) -> Snapshot:
    sock = str(socket).encode()
    procs = list(_processes())
    shims = [pid for pid, _, argv in procs if _is_shim_of(argv, sock)]
    me = os.getpid()
    qemu, foreign = [], []
    for pid, ppid, argv in procs:
        if _is_qemu(argv):
            if ppid in shims:
                qemu.append(pid)
            elif ppid != me:
                foreign.append(pid)
    return Snapshot(shims, qemu, foreign)


class Monitor:
    """Samples our shims and their QEMU processes every MONITOR_INTERVAL seconds in a
    thread: the peaks since ``reset()``, and every QEMU of ours ever seen."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self.seen_qemu: dict[int, list[bytes]] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.window: dict[str, int] = {
                "max_qemu": 0,
                "peak_qemu_rss_kib": 0,
                "peak_shim_rss_kib": 0,
                "max_foreign_qemu": 0,
            }

    def sample(self) -> Snapshot:
        snap = snapshot(self.socket)
        rss, shim_rss = snap.qemu_rss_kib(), snap.shim_rss_kib()
        with self._lock:
            w = self.window
            w["max_qemu"] = max(w["max_qemu"], len(snap.qemu))
            w["peak_qemu_rss_kib"] = max(w["peak_qemu_rss_kib"], rss)
            w["peak_shim_rss_kib"] = max(w["peak_shim_rss_kib"], shim_rss)
            w["max_foreign_qemu"] = max(w["max_foreign_qemu"], len(snap.foreign_qemu))
            for pid in snap.qemu:
                if pid not in self.seen_qemu:
                    with contextlib.suppress(OSError):
                        self.seen_qemu[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return snap

    def read(self) -> dict[str, int]:
        with self._lock:
            return dict(self.window)

    def _run(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL):
            with contextlib.suppress(Exception):  # a process vanishing mid-scan
                self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def surviving_qemu(self) -> list[int]:
        """QEMU processes of ours seen during the run that still exist (same argv)."""
        alive = []
        for pid, argv in self.seen_qemu.items():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") == argv:
                    alive.append(pid)
        return alive


# -- the private containerd ---------------------------------------------------------------


def bench_rig() -> ContainerdRig:
    """ContainerdRig on the benchmark's own paths, bridge and subnet. The bridge and subnet
    are module constants of rig.py, read when used; setting them here changes them for
    this process only."""
    rig_module.BRIDGE = BENCH_BRIDGE
    rig_module.POD_SUBNET = BENCH_SUBNET
    return ContainerdRig(
        root=BENCH_BASE / "containerd",
        state=BENCH_STATE,
        cni_dir=BENCH_BASE / "cni",
        log_path=BENCH_BASE / "containerd.log",
        template_dir=BENCH_TEMPLATES,
    )


def settle(rig: ContainerdRig, monitor: Monitor, after: str) -> list[str]:
    """Untimed, after every measurement: remove whatever is left in containerd, then wait
    until none of our shims or QEMU processes exists, so measurements never overlap."""
    problems: list[str] = []
    try:
        removed = rig.remove_all()
        if removed:
            problems.append(f"after {after}, had to remove: {', '.join(removed)}")
    except Exception as e:
        problems.append(f"after {after}, removing what was left failed: {e}")
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        snap = monitor.sample()
        if not snap.shims and not snap.qemu:
            return problems
        if time.monotonic() > deadline:
            problems.append(
                f"after {after}: shims {snap.shims} and QEMU {snap.qemu} still there "
                f"{SETTLE_TIMEOUT:g}s later"
            )
            return problems
        time.sleep(0.2)


def kill_leftovers(rig: ContainerdRig, monitor: Monitor) -> list[str]:
    """After the rig stopped: our shims and QEMU processes that outlived it (by pid)."""
    found: list[str] = []
    snap = snapshot(rig.socket)
    for pid in snap.shims:
        found.append(f"shim pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the carapace shim destroys its VM on SIGTERM
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and monitor.surviving_qemu():
        time.sleep(0.5)
    for pid in monitor.surviving_qemu():
        found.append(f"QEMU pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


# -- 1-3. ctr run and the bare boot -------------------------------------------------------


def measure_ctr_run(
    rig: ContainerdRig, runtime: str, cid: str, config_path: Path | None = None
) -> float:
    """``ctr run --rm`` of ``true``; ``config_path``: the runtime's configuration
    (``--runtime-config-path``)."""
    extra = [] if config_path is None else ["--runtime-config-path", str(config_path)]
    t0 = time.perf_counter()
    try:
        rig.ctr(
            "run",
            "--rm",
            "--runtime",
            runtime,
            *extra,
            BUSYBOX_IMAGE,
            cid,
            "true",
            timeout=CTR_TIMEOUT,
        )
    except RigError as e:
        raise BenchError(f"ctr run ({runtime}): {str(e).strip()[-500:]}") from e
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"ctr run ({runtime}): no exit within {CTR_TIMEOUT:g}s") from e
    return time.perf_counter() - t0


# -- 4. CRI pods --------------------------------------------------------------------------


@dataclass
class PodRun:
    name: str
    pod_id: str = ""
    container_id: str = ""
    seconds: float | None = None  # from the common start until its container runs
    error: str | None = None


def start_pod(
    rt: Any, pod: PodRun, log_dir: str, label: str, go: threading.Event, handler: str = HANDLER
) -> None:
    """RunPodSandbox, CreateContainer, StartContainer, then ContainerStatus until the
    container is running; ``pod`` gets the ids as they come (for the cleanup)."""
    config = pod_config(pod.name, log_dir, "carapace-bench", {"carapace-bench": label})
    go.wait()
    t0 = time.perf_counter()
    try:
        pod.pod_id = rt.RunPodSandbox(
            api.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=CRI_TIMEOUT
        ).pod_sandbox_id
        pod.container_id = rt.CreateContainer(
            api.CreateContainerRequest(
                pod_sandbox_id=pod.pod_id,
                config=api.ContainerConfig(
                    metadata=api.ContainerMetadata(name="sleeper"),
                    image=api.ImageSpec(image=BUSYBOX_IMAGE),
                    command=["sleep", "3600"],
                    log_path="sleeper.log",
                ),
                sandbox_config=config,
            ),
            timeout=CRI_TIMEOUT,
        ).container_id
        rt.StartContainer(
            api.StartContainerRequest(container_id=pod.container_id), timeout=CRI_TIMEOUT
        )
        deadline = time.monotonic() + CRI_TIMEOUT
        while True:
            state = rt.ContainerStatus(
                api.ContainerStatusRequest(container_id=pod.container_id), timeout=60
            ).status.state
            if state == api.ContainerState.CONTAINER_RUNNING:
                break
            if state == api.ContainerState.CONTAINER_EXITED or time.monotonic() > deadline:
                raise BenchError(f"container {pod.container_id} is {state}, not running")
            time.sleep(0.05)
        pod.seconds = time.perf_counter() - t0
    except Exception as e:
        code = getattr(e, "code", None)
        details = getattr(e, "details", None)
        if callable(code) and callable(details):  # a grpc.RpcError
            pod.error = f"{pod.name}: {code().name}: {details()}"
        else:
            pod.error = f"{pod.name}: {type(e).__name__}: {e}"


def remove_pods(rt: Any, pod_ids: list[str]) -> list[str]:
    """StopPodSandbox + RemovePodSandbox of every pod, in parallel; the failures."""
    errors: list[str] = []

    def remove(pod_id: str) -> None:
        try:
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CRI_TIMEOUT)
            rt.RemovePodSandbox(
                api.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CRI_TIMEOUT
            )
        except Exception as e:
            errors.append(f"removing pod {pod_id[:12]}: {e}")

    threads = [threading.Thread(target=remove, args=(p,), daemon=True) for p in pod_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _join_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)  # short joins: Ctrl-C gets through


def measure_pods(
    rig: ContainerdRig,
    monitor: Monitor,
    n: int,
    label: str,
    details: list[dict[str, Any]],
    handler: str = HANDLER,
) -> float:
    """Wall time until all ``n`` pods' containers run (runtime handler ``handler``);
    appends the sample's details."""
    cri = rig.cri()
    log_dir = tempfile.mkdtemp(prefix="carapace-bench-cri-")
    pods = [PodRun(f"{label}-p{i}") for i in range(n)]
    go = threading.Event()
    threads = [
        threading.Thread(
            target=start_pod, args=(cri.runtime, p, log_dir, label, go, handler), daemon=True
        )
        for p in pods
    ]
    detail: dict[str, Any] = {"pods": n, "label": label}
    try:
        for t in threads:
            t.start()
        monitor.reset()
        t0 = time.perf_counter()
        go.set()
        _join_all(threads)
        joined = time.perf_counter() - t0
        # while all run: our QEMU processes, their memory, the running containers
        snap = monitor.sample()
        window = monitor.read()
        running = {
            c.id
            for c in cri.runtime.ListContainers(
                api.ListContainersRequest(
                    filter=api.ContainerFilter(
                        state=api.ContainerStateValue(state=api.ContainerState.CONTAINER_RUNNING)
                    )
                ),
                timeout=60,
            ).containers
        }
        times = [p.seconds for p in pods if p.seconds is not None]
        detail.update(
            seconds=round(max(times), 4) if len(times) == n else None,
            joined_seconds=round(joined, 4),
            per_pod_seconds=[None if p.seconds is None else round(p.seconds, 4) for p in pods],
            errors=[p.error for p in pods if p.error],
            containers_running=len(running & {p.container_id for p in pods}),
            qemu_processes=len(snap.qemu),
            shim_processes=len(snap.shims),
            qemu_rss_now_kib=snap.qemu_rss_kib(),
            qemu_hwm_sum_kib=snap.qemu_hwm_kib(),
            shim_rss_now_kib=snap.shim_rss_kib(),
            peak_qemu_rss_kib=window["peak_qemu_rss_kib"],
            peak_shim_rss_kib=window["peak_shim_rss_kib"],
            max_qemu_processes=window["max_qemu"],
            other_qemu_processes=max(window["max_foreign_qemu"], len(snap.foreign_qemu)),
            loadavg_1min_after=round(os.getloadavg()[0], 2),
        )
    except Exception as e:  # e.g. a failed ListContainers: this sample fails, not the run
        detail.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
        raise BenchError(f"CRI with {n} pod(s): {type(e).__name__}: {e}") from e
    finally:
        go.set()  # should we be interrupted before the start
        ids = [p.pod_id for p in pods if p.pod_id]
        cleanup_errors = remove_pods(cri.runtime, ids)
        cri.close()
        shutil.rmtree(log_dir, ignore_errors=True)
        detail["cleanup_errors"] = cleanup_errors
        details.append(detail)
    if detail["errors"]:
        raise BenchError("; ".join(detail["errors"])[-800:])
    if detail["containers_running"] != n:
        raise BenchError(f"{detail['containers_running']} of {n} containers running at the end")
    return float(detail["seconds"])


# -- 5. a whole CRI pod life, step by step ---------------------------------------------------

BOOT_ID = ["cat", "/proc/sys/kernel/random/boot_id"]
#: The pod life's ExecSyncs: (container, command, expected exit status).
LIFE_EXECS: list[tuple[str, list[str], int]] = [
    ("a", BOOT_ID, 0),
    ("b", BOOT_ID, 0),
    ("a", ["uname", "-r"], 0),
    ("a", ["cat", "/tmp/mark"], 0),
    ("b", ["cat", "/tmp/mark"], 1),  # separate root filesystems
    ("b", ["sh", "-c", "echo out; echo err >&2; exit 4"], 4),
    ("a", ["true"], 0),
]
LIFE_CONTAINERS = {
    "a": ["sh", "-c", "echo from-a > /tmp/mark; exec sleep 3600"],
    "b": ["sleep", "3600"],
}


def life_steps() -> list[str]:
    """The pod life's steps, in order (the report's rows)."""
    steps = ["RunPodSandbox"]
    for name in LIFE_CONTAINERS:
        steps += [f"CreateContainer {name}", f"StartContainer {name}"]
    steps += [f"ExecSync {i + 1}: {c} {' '.join(cmd)}" for i, (c, cmd, _) in enumerate(LIFE_EXECS)]
    return [*steps, "ContainerStats a", "StopPodSandbox", "RemovePodSandbox"]


def measure_pod_life(
    rig: ContainerdRig, handler: str, label: str, details: list[dict[str, Any]]
) -> float:
    """The whole life of a pod with two containers, over CRI, each step timed apart;
    returns the total, appends the steps' seconds to ``details``."""
    cri = rig.cri()
    rt = cri.runtime
    log_dir = tempfile.mkdtemp(prefix="carapace-bench-life-")
    config = pod_config(label, log_dir, "carapace-bench", {"carapace-bench": label})
    steps: dict[str, float] = {}
    pod_id = ""
    removed = False

    def step(name: str, call: Callable[..., Any], request: Any) -> Any:
        """One CRI call, timed: its answer."""
        t0 = time.perf_counter()
        try:
            out = call(request, timeout=CRI_TIMEOUT)
        except Exception as e:
            raise BenchError(f"pod life ({handler}), {name}: {_rpc_error(e)}") from e
        steps[name] = round(time.perf_counter() - t0, 4)
        return out

    t_start = time.perf_counter()
    try:
        pod_id = step(
            "RunPodSandbox",
            rt.RunPodSandbox,
            api.RunPodSandboxRequest(config=config, runtime_handler=handler),
        ).pod_sandbox_id
        ids: dict[str, str] = {}
        for name, command in LIFE_CONTAINERS.items():
            container = api.ContainerConfig(
                metadata=api.ContainerMetadata(name=name),
                image=api.ImageSpec(image=BUSYBOX_IMAGE),
                command=command,
                log_path=f"{name}.log",
            )
            ids[name] = step(
                f"CreateContainer {name}",
                rt.CreateContainer,
                api.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=container, sandbox_config=config
                ),
            ).container_id
            step(
                f"StartContainer {name}",
                rt.StartContainer,
                api.StartContainerRequest(container_id=ids[name]),
            )
        for i, (name, cmd, want) in enumerate(LIFE_EXECS):
            label_i = f"ExecSync {i + 1}: {name} {' '.join(cmd)}"
            r = step(
                label_i,
                rt.ExecSync,
                api.ExecSyncRequest(container_id=ids[name], cmd=cmd, timeout=60),
            )
            if r.exit_code != want:
                raise BenchError(
                    f"pod life ({handler}), {label_i}: exit {r.exit_code}, expected {want}: "
                    f"{r.stderr.decode(errors='replace')[-200:]}"
                )
        stats = step(
            "ContainerStats a", rt.ContainerStats, api.ContainerStatsRequest(container_id=ids["a"])
        ).stats
        if stats.attributes.id != ids["a"]:
            raise BenchError(f"pod life ({handler}): ContainerStats of {ids['a']} answered {stats}")
        step("StopPodSandbox", rt.StopPodSandbox, api.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        step(
            "RemovePodSandbox",
            rt.RemovePodSandbox,
            api.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
        )
        removed = True
        total = time.perf_counter() - t_start
    finally:
        if pod_id and not removed:
            remove_pods(rt, [pod_id])
        cri.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    details.append({"label": label, "total_seconds": round(total, 4), "steps": steps})
    return total


def _rpc_error(e: Exception) -> str:
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    if callable(code) and callable(details):  # a grpc.RpcError
        return f"{code().name}: {details()}"
    return f"{type(e).__name__}: {e}"


def life_medians(details: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds of each step over the samples (and of the total)."""
    out: dict[str, float] = {}
    for name in [*life_steps(), "total"]:
        xs = [d["total_seconds"] if name == "total" else d["steps"][name] for d in details]
        xs = [x for x in xs if x is not None]
        if xs:
            out[name] = round(statistics.median(xs), 4)
    return out


def life_table(life: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The pod life's steps, carapace and runc side by side (medians)."""
    car = life_medians(life.get(LIFE_CARAPACE, []))
    runc = life_medians(life.get(LIFE_RUNC, []))
    if not car and not runc:
        return []
    total = car.get("total")
    lines = [
        "",
        "A whole CRI pod life (2 containers, 7 execs, stats, teardown), step by step:",
        "",
        "| step | carapace s | runc s | carapace - runc s | share of carapace's total |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in [*life_steps(), "total"]:
        c, r = car.get(name), runc.get(name)
        diff = "n/a" if c is None or r is None else f"{c - r:+.3f}"
        share = "n/a" if c is None or not total else f"{100 * c / total:.0f}%"
        label = "**whole pod life** (wall time)" if name == "total" else name
        lines.append(f"| {label} | {boot._fmt(c)} | {boot._fmt(r)} | {diff} | {share} |")
    if total is not None and "RunPodSandbox" in car:
        rest_c = total - car["RunPodSandbox"]
        rest_r = None if "total" not in runc else runc["total"] - runc.get("RunPodSandbox", 0.0)
        execs = [n for n in life_steps() if n.startswith("ExecSync")]
        exec_c = sum(car.get(n, 0.0) for n in execs)
        lines += [
            "",
            f"carapace without RunPodSandbox (the VM boot): {rest_c:.3f} s"
            + ("" if rest_r is None else f" against runc's {rest_r:.3f} s ({rest_c / rest_r:.3g}x)")
            + f"; of it the 7 ExecSyncs {exec_c:.3f} s, the teardown "
            f"{car.get('StopPodSandbox', 0.0) + car.get('RemovePodSandbox', 0.0):.3f} s.",
        ]
    return lines


# -- report -------------------------------------------------------------------------------


def _mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / KIB_PER_MIB:.0f}"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratios(results: dict[str, Measurement], n: int) -> dict[str, float | None]:
    floor = results[BARE_INIT].median
    runc = results[CTR_RUNC].median
    one = results[CRI_ONE].median
    many = results[cri_many_name(n)].median
    one_t = results[CRI_ONE_TEMPLATE].median
    many_t = results[cri_many_name(n, True)].median
    return {
        "ctr_carapace / (bare_boot + ctr_runc)": boot._ratio(
            results[CTR_CARAPACE].median, None if floor is None or runc is None else floor + runc
        ),
        "ctr_carapace / bare_boot": boot._ratio(results[CTR_CARAPACE].median, floor),
        f"cri_{n}_pods / cri_1_pod": boot._ratio(many, one),
        f"cri_{n}_pods / ({n} x cri_1_pod)": boot._ratio(many, None if one is None else n * one),
        "ctr_template / (bare_boot + ctr_runc)": boot._ratio(
            results[CTR_TEMPLATE].median, None if floor is None or runc is None else floor + runc
        ),
        "cri_1_pod_template / cri_1_pod": boot._ratio(one_t, one),
        f"cri_{n}_pods_template / cri_1_pod_template": boot._ratio(many_t, one_t),
        "pod_life_carapace / pod_life_runc": boot._ratio(
            results[LIFE_CARAPACE].median, results[LIFE_RUNC].median
        ),
    }


def memory_summary(details: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the successful samples of one CRI measurement."""
    ok = [d for d in details if not d.get("errors") and d.get("seconds") is not None]
    if not ok:
        return {}
    n = ok[0]["pods"]
    return {
        "qemu_processes_while_all_run": [d["qemu_processes"] for d in ok],
        "peak_qemu_rss_mib_per_pod": round(
            statistics.median(d["peak_qemu_rss_kib"] for d in ok) / KIB_PER_MIB / n, 1
        ),
        "qemu_hwm_mib_per_pod": round(
            statistics.median(d["qemu_hwm_sum_kib"] for d in ok) / KIB_PER_MIB / n, 1
        ),
        "shim_rss_mib_per_pod_while_all_run": round(
            statistics.median(d["shim_rss_now_kib"] for d in ok) / KIB_PER_MIB / n, 1
        ),
    }


def markdown(
    machine: dict[str, Any],
    runs: int,
    n: int,
    order: list[str],
    results: dict[str, Measurement],
    rat: dict[str, float | None],
    cri_details: dict[str, list[dict[str, Any]]],
    others: dict[str, list[int]],
    notes: list[str],
    life: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    lines = [
        "# carapace containerd benchmark",
        "",
        f"{machine['date']} · {machine['nproc']} CPUs ({machine['cpu']}) · host kernel "
        f"{machine['host_kernel']} · {machine['qemu']} · accel **{machine['accel']}** "
        f"({machine['accel_reason']}) · {machine['containerd']} · snapshotter "
        f"{machine['snapshotter']} · pod VM {machine['vm_vcpus']} vCPU, "
        f"{machine['vm_memory_mib']} MiB",
        "",
        f"Medians of {runs} runs per row, rounds interleaved, in one invocation "
        f"({machine['warmup_rounds']} untimed warm-up round(s) first, without the "
        f"{n}-pod measurement).",
        "",
        "| measurement | median s | min s | max s | runs | other QEMU seen |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in order:
        m = results[name]
        seen = others.get(BARE_INIT if name == BARE_EXIT else name, [])
        other = max(seen) if seen else "n/a"
        lines.append(boot.measurement_row(name, m, other))
    labels = {
        "ctr_carapace / (bare_boot + ctr_runc)": (
            "**carapace ctr run ÷ (bare boot + runc ctr run)**"
        ),
        "ctr_carapace / bare_boot": "carapace ctr run ÷ bare boot",
        f"cri_{n}_pods / cri_1_pod": f"**{n} pods in parallel ÷ 1 pod**",
        f"cri_{n}_pods / ({n} x cri_1_pod)": f"{n} pods in parallel ÷ ({n} x 1 pod)",
        "pod_life_carapace / pod_life_runc": "**CRI pod life carapace ÷ runc**",
        "ctr_template / (bare_boot + ctr_runc)": (
            "**carapace ctr run from a template ÷ (bare boot + runc ctr run)**"
        ),
        "cri_1_pod_template / cri_1_pod": "CRI 1 pod from a template ÷ cold",
        f"cri_{n}_pods_template / cri_1_pod_template": (
            f"**{n} pods in parallel ÷ 1 pod, from a template**"
        ),
    }
    goals = {k.replace("{n}", str(n)): g for k, g in GOALS.items()}
    lines += ["", "| ratio (of medians) | value | goal |", "|---|---:|---:|"]
    for key, label in labels.items():
        v = rat.get(key)
        goal = f"≤ {goals[key]:g}x" if key in goals else ""
        lines.append(f"| {label} | {'n/a' if v is None else f'{v:.3g}x'} | {goal} |")

    lines += [
        "",
        "| CRI sample | wall s | fastest / slowest pod s | QEMU processes while all run "
        "| containers running | peak QEMU RSS MiB (sum) | per pod MiB | shims "
        "| shim RSS per pod MiB | other QEMU seen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in (CRI_ONE, cri_many_name(n), CRI_ONE_TEMPLATE, cri_many_name(n, True)):
        for i, d in enumerate(cri_details.get(name, []), 1):
            if "qemu_processes" not in d:
                lines.append(f"| {name} #{i} | interrupted | | | | | | | | |")
                continue
            k = d["pods"]
            times = [t for t in d["per_pod_seconds"] if t is not None]
            spread = f"{min(times):.1f} / {max(times):.1f}" if times else "n/a"
            wall = boot._fmt(d["seconds"]) if d["seconds"] is not None else "failed"
            lines.append(
                f"| {name} #{i} | {wall} | {spread} | {d['qemu_processes']} | "
                f"{d['containers_running']} | {_mib(d['peak_qemu_rss_kib'])} | "
                f"{_mib(d['peak_qemu_rss_kib'] / k)} | {d['shim_processes']} | "
                f"{_mib(d['shim_rss_now_kib'] / k)} | "
                f"{d['other_qemu_processes']} |"
            )
    lines += life_table(life or {})
    if notes:
        lines += ["", *[f"- {x}" for x in notes]]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------


_timed = boot._timed


@dataclass
class Bench:
    rig: ContainerdRig
    monitor: Monitor
    prefix: str
    pods: int
    results: dict[str, Measurement]
    cri_details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: per pod-life row: each recorded sample's steps
    life: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: per measurement and recorded sample: the most QEMU processes not ours seen
    others: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def one(self, name: str, record: bool, fn: Callable[[], float]) -> None:
        """One sample, then the cleanup check (untimed)."""
        if self.results[name].error is not None:
            return
        self.monitor.reset()
        _timed(self.results, name, record, fn)
        if record:
            self.others.setdefault(name, []).append(self.monitor.read()["max_foreign_qemu"])
        self.problems += settle(self.rig, self.monitor, name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (3)")
    ap.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (1; no parallel pods)"
    )
    ap.add_argument("--pods", type=int, default=8, help="pods started in parallel (8)")
    ap.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory for containerd.json and containerd.md (benchmarks/results)",
    )
    args = ap.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.pods < 1:
        ap.error("--runs and --pods must be >= 1, --warmup >= 0")
    if os.geteuid() != 0:
        ap.error("run it as root (containerd, pods and QEMU need it)")
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (scripts/install-deps.sh installs it)")

    n = args.pods
    many = cri_many_name(n)
    many_t = cri_many_name(n, True)
    order = [
        BARE_INIT,
        BARE_EXIT,
        CTR_CARAPACE,
        CTR_TEMPLATE,
        CTR_RUNC,
        CRI_ONE,
        many,
        CRI_ONE_TEMPLATE,
        many_t,
        LIFE_CARAPACE,
        LIFE_RUNC,
    ]
    results = {name: Measurement(name) for name in order}
    prefix = f"bench-{secrets.token_hex(3)}"
    notes: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    rig = bench_rig()
    machine: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": boot._cpu_model(),
        "memory_total_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20,
        "host_kernel": platform.release(),
        "containerd": boot._first_line(["containerd", "--version"]),
        "cgroups": boot._cgroup_mode(),
        "python": platform.python_version(),
        "warmup_rounds": args.warmup,
        "parallel_pods": n,
        "loadavg_at_start": round(os.getloadavg()[0], 2),
        "other_qemu_processes_at_start": len(snapshot(rig.socket).foreign_qemu),
        "rig": {
            "root": str(rig.root),
            "state": str(rig.state),
            "bridge": BENCH_BRIDGE,
            "pod_subnet": BENCH_SUBNET,
            "log": str(rig.log_path),
        },
    }
    monitor = Monitor(rig.socket)
    left: list[str] = []
    problems: list[str] = []
    interrupted = False
    bench: Bench | None = None
    print(f"starting a private containerd in {BENCH_BASE} ...", file=sys.stderr, flush=True)
    rig.start()
    try:
        monitor.start()
        machine["snapshotter"] = f"{rig.snapshotter} ({rig.snapshotter_reason})"
        machine["ctr"] = boot._first_line(["ctr", "--version"])
        # the configuration the shim reads (ConfigPath of the rig's carapace runtime)
        config = load_config(rig.carapace_config)
        hv = config.hypervisor
        _image, kernel, _initrd, accel = boot.guest_of(config, "containerd.py")
        sizing = Sandbox(config, SandboxOptions())  # what the shim gives a pod
        machine.update(
            qemu=boot._first_line([hv.path, "--version"]),
            qemu_binary=hv.path,
            accel=accel.accel,
            accel_reason=accel.reason,
            guest_kernel=str(kernel),
            vm_vcpus=sizing.vcpus,
            vm_memory_mib=sizing.memory_mib,
            carapace_config=f"{rig.carapace_config} ({config.source})",
        )
        bench = Bench(rig, monitor, prefix, n, results)
        with boot._scratch_dir() as scratch:
            tiny = boot.build_tiny_initramfs(scratch / "tiny-initramfs.cpio")
            argv_bare = boot.bare_argv(
                config, kernel, tiny, accel, sizing.vcpus, sizing.memory_mib, scratch
            )
            machine["bare_boot_argv"] = argv_bare
            for i in range(args.warmup + args.runs):
                record = i >= args.warmup
                tag = f"run {i - args.warmup + 1}/{args.runs}" if record else "warm-up"
                label = f"{prefix}-{i}"
                steps = "bare boot, ctr carapace (cold, template), ctr runc, CRI 1 pod, pod lives"
                print(
                    f"[{tag}] {steps}{f', CRI {n} pods' if record else ''} ...",
                    file=sys.stderr,
                    flush=True,
                )
                bench.one(BARE_INIT, record, partial(boot.bare, argv_bare, results, record))
                if results[BARE_INIT].error is not None:
                    results[BARE_EXIT].error = results[BARE_INIT].error
                bench.one(
                    CTR_CARAPACE, record, partial(measure_ctr_run, rig, CARAPACE, f"{label}-c")
                )
                bench.one(
                    CTR_TEMPLATE,
                    record,
                    partial(measure_ctr_run, rig, CARAPACE, f"{label}-t", rig.template_config),
                )
                bench.one(CTR_RUNC, record, partial(measure_ctr_run, rig, RUNC, f"{label}-r"))
                one_details = bench.cri_details.setdefault(CRI_ONE, []) if record else []
                bench.one(
                    CRI_ONE,
                    record,
                    partial(measure_pods, rig, monitor, 1, f"{label}-one", one_details),
                )
                one_t = bench.cri_details.setdefault(CRI_ONE_TEMPLATE, []) if record else []
                bench.one(
                    CRI_ONE_TEMPLATE,
                    record,
                    partial(
                        measure_pods, rig, monitor, 1, f"{label}-onet", one_t, TEMPLATE_HANDLER
                    ),
                )
                lives = [(LIFE_CARAPACE, HANDLER), (LIFE_RUNC, "runc")]
                for name, handler in lives if i % 2 == 0 else lives[::-1]:
                    bench.one(
                        name,
                        record,
                        partial(
                            measure_pod_life,
                            rig,
                            handler,
                            f"{label}-life-{handler}",
                            bench.life.setdefault(name, []) if record else [],
                        ),
                    )
                if record:
                    many_details = bench.cri_details.setdefault(many, [])
                    bench.one(
                        many,
                        record,
                        partial(measure_pods, rig, monitor, n, f"{label}-par", many_details),
                    )
                    many_t_details = bench.cri_details.setdefault(many_t, [])
                    bench.one(
                        many_t,
                        record,
                        partial(
                            measure_pods,
                            rig,
                            monitor,
                            n,
                            f"{label}-part",
                            many_t_details,
                            TEMPLATE_HANDLER,
                        ),
                    )
            # the templates the pods were restored from (the rig removes them at its stop)
            machine["templates"] = [
                {"key": t.key, **t.info()} for t in TemplateStore(rig.template_dir).templates()
            ]
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up ...", file=sys.stderr, flush=True)
    finally:
        monitor.stop()
        try:
            problems = rig.stop()
        finally:
            left = kill_leftovers(rig, monitor)
    if interrupted or bench is None:
        if problems:
            print(f"stopping the containerd: {'; '.join(problems)}", file=sys.stderr)
        if left:
            print(f"LEFT BEHIND (killed): {', '.join(left)}", file=sys.stderr)
        return 130

    machine["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    notes += bench.problems
    if problems:
        notes.append("stopping the containerd: " + "; ".join(problems))
    if left:
        notes.append("LEFT BEHIND (killed): " + ", ".join(left))
    others = max(
        [machine["other_qemu_processes_at_start"]] + [x for xs in bench.others.values() for x in xs]
    )
    if others:
        notes.append(
            f"up to {others} QEMU process(es) not ours were running (other test sessions on "
            "this machine): the timings are disturbed, compare them with care."
        )
    bad_counts = [
        d["qemu_processes"]
        for d in [*bench.cri_details.get(many, []), *bench.cri_details.get(many_t, [])]
        if "qemu_processes" in d and d["qemu_processes"] != n
    ]
    if bad_counts:
        notes.append(f"QEMU processes while all {n} pods ran: {bad_counts}, expected {n}.")

    if not machine.get("templates"):
        notes.append(
            "no VM template was found after the runs: the template rows are cold boots "
            "(see the containerd log)."
        )
    else:
        builds = [t.get("build_seconds") for t in machine["templates"]]
        notes.append(
            f"template rows: pods restored from {len(builds)} template(s), built in the "
            f"warm-up round (build seconds: {builds})."
        )
    rat = ratios(results, n)
    memory = {name: memory_summary(ds) for name, ds in bench.cri_details.items()}
    report = {
        "machine": machine,
        "runs": args.runs,
        "results": {name: results[name].summary() for name in order},
        "ratios": rat,
        "cri_samples": bench.cri_details,
        "cri_memory": memory,
        "pod_life_steps": bench.life,
        "pod_life_medians": {name: life_medians(ds) for name, ds in bench.life.items()},
        "other_qemu_processes_seen": bench.others,
        "notes": notes,
    }
    md = markdown(
        machine,
        args.runs,
        n,
        order,
        results,
        rat,
        bench.cri_details,
        bench.others,
        notes,
        bench.life,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "containerd.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "containerd.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'containerd.json'} and {args.out / 'containerd.md'}", file=sys.stderr)
    failed = any(m.error is not None for m in results.values())
    return 1 if failed or left or bad_counts or problems or bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
