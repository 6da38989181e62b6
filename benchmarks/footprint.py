#!/usr/bin/env python3
"""Footprint benchmark: what an idle pod costs the host in memory, whether memory the
guest frees goes back to the host, and what the TCG translation cache size costs.

Measures, in one invocation (rounds interleaved), N samples of:

* idle pods: 1 pod alone, then P pods (default 8) idle at once: QEMU's PSS and RSS per
  pod (/proc/PID/smaps_rollup), split into guest RAM, TCG translation cache, mapped
  files and the rest (/proc/PID/smaps), virtiofsd's PSS, the host's MemAvailable drop,
  and what the guest itself uses (its /proc/meminfo, read from a container);
* memory returned: a container allocates and touches 512 MiB and exits; QEMU's RSS
  before, at the peak and a few seconds later, with free page reporting on and off;
* the TCG translation cache: for a few ``tcg_tb_size_mib`` values, pod ready time, idle
  PSS and cache size, a ``true`` container and a small workload, and the cache after it.

Prints Markdown tables with the goals beside the figures and writes
results/footprint.json and results/footprint.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # boot.py beside us
    sys.path.insert(0, str(HERE))

import boot  # noqa: E402
from boot import BenchError  # noqa: E402

from carapace.config import Config, load_config  # noqa: E402
from carapace.sandbox import ProcessIO, Sandbox, SandboxOptions  # noqa: E402

MEMORY = "1G"
#: The goal of issue 16: QEMU's PSS per pod with 8 idle pods (Kata on KVM: ~120 MB).
PSS_GOAL_MIB = 120
KIB_PER_MIB = 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
KSM = Path("/sys/kernel/mm/ksm")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
#: What the TCG rows run in a container after the ``true`` one: a shell loop, a walk of
#: the rootfs and a tar of /bin (emulated code of the guest kernel and busybox).
WORKLOAD = (
    "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; "
    "find / -xdev | wc -l >/dev/null; tar -c /bin | wc -c >/dev/null; echo done"
)
SAMPLE_INTERVAL = 0.2

IDLE_ONE = "1 idle pod"


def idle_many_name(n: int) -> str:
    return f"{n} idle pods at once"


FREE_ON = "free page reporting on"
FREE_OFF = "free page reporting off"


def tb_name(size: int) -> str:
    return "QEMU default (1 GiB)" if size == 0 else f"{size} MiB"


# -- memory of a process ------------------------------------------------------------------


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    rss_kib: int = 0
    pss_kib: int = 0
    flags: str = ""

    @property
    def size_kib(self) -> int:
        return (self.end - self.start) // 1024


def read_smaps(pid: int) -> list[Mapping]:
    maps: list[Mapping] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):
            lo, hi = head[0].split("-")
            maps.append(
                Mapping(int(lo, 16), int(hi, 16), head[1], head[5] if len(head) > 5 else "")
            )
        elif maps and head[0] == "Rss:":
            maps[-1].rss_kib = int(head[1])
        elif maps and head[0] == "Pss:":
            maps[-1].pss_kib = int(head[1])
        elif maps and head[0] == "VmFlags:":
            maps[-1].flags = " ".join(head[1:])
    return maps


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup, in KiB (Rss, Pss, Pss_Anon, Pss_File, Pss_Shmem, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        with contextlib.suppress(ValueError, IndexError):
            out[key] = int(value.split()[0])
    return out


def status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def is_guest_ram(m: Mapping, memory_mib: int) -> bool:
    return m.size_kib == memory_mib * KIB_PER_MIB and "x" not in m.perms and "w" in m.perms


def is_tcg_buffer(m: Mapping) -> bool:
    """TCG's translation cache: QEMU's one anonymous writable and executable mapping."""
    return m.perms.startswith("rwx") and not m.path.startswith("/")


def qemu_memory(pid: int, memory_mib: int) -> dict[str, Any]:
    """QEMU's memory in KiB: the totals and where they are (guest RAM, the TCG cache,
    mapped files: the kernel, the initrd, QEMU and its libraries, the rest)."""
    roll = rollup(pid)
    parts = {k: {"rss_kib": 0, "pss_kib": 0} for k in ("guest_ram", "tcg_cache", "files", "other")}
    ram_flags = ""
    for m in read_smaps(pid):
        if is_guest_ram(m, memory_mib) and not ram_flags:
            kind, ram_flags = "guest_ram", m.flags
        elif is_tcg_buffer(m):
            kind = "tcg_cache"
        elif m.path.startswith("/") and not m.path.startswith("/memfd:"):
            kind = "files"
        else:
            kind = "other"
        parts[kind]["rss_kib"] += m.rss_kib
        parts[kind]["pss_kib"] += m.pss_kib
    flags = ram_flags.split()
    return {
        "rss_kib": roll.get("Rss", 0),
        "pss_kib": roll.get("Pss", 0),
        "pss_anon_kib": roll.get("Pss_Anon", 0),
        "pss_file_kib": roll.get("Pss_File", 0),
        "pss_shmem_kib": roll.get("Pss_Shmem", 0),
        "hwm_kib": status_kib(pid, "VmHWM"),
        "parts": parts,
        # "mg": madvise(MADV_MERGEABLE) (QEMU's mem-merge), "sh": a shared mapping
        "guest_ram_mergeable": "mg" in flags,
        "guest_ram_shared": "sh" in flags,
    }


def _procs() -> list[tuple[int, list[bytes]]]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                out.append((int(d.name), (d / "cmdline").read_bytes().split(b"\0")))
    return out


def virtiofsd_pids(sandbox_id: str) -> list[int]:
    needle = sandbox_id.encode()
    return [
        pid
        for pid, argv in _procs()
        if argv and argv[0].endswith(b"virtiofsd") and any(needle in a for a in argv)
    ]


def host_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def parse_meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        with contextlib.suppress(ValueError, IndexError):
            out[key.strip()] = int(value.split()[0])
    return out


# -- pods ---------------------------------------------------------------------------------


def with_hypervisor(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, hypervisor=dataclasses.replace(config.hypervisor, **changes))


async def start_pod(config: Config, sandbox_id: str) -> tuple[Sandbox, float]:
    sb = Sandbox(config, SandboxOptions(memory=MEMORY, sandbox_id=sandbox_id))
    t0 = time.perf_counter()
    try:
        await sb.start()
    except BaseException:
        await sb.destroy()
        raise
    return sb, time.perf_counter() - t0


async def run_in(sb: Sandbox, args: list[str]) -> tuple[int, str, str, float]:
    """Run a container to completion: exit status, stdout, stderr, seconds."""
    out: list[bytes] = []
    err: list[bytes] = []
    t0 = time.perf_counter()
    code = await sb.run(args, io=ProcessIO(stdout=out.append, stderr=err.append))
    dt = time.perf_counter() - t0
    return code, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"), dt


async def guest_meminfo(sb: Sandbox) -> dict[str, int]:
    code, out, err, _ = await run_in(sb, ["cat", "/proc/meminfo"])
    if code != 0:
        raise BenchError(f"cat /proc/meminfo in the guest: exit {code}: {err.strip()[-200:]}")
    return parse_meminfo(out)


async def destroy_all(pods: list[Sandbox]) -> None:
    results = await asyncio.gather(*(sb.destroy() for sb in pods), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise BenchError(f"destroying pods: {errors[0]}")


# -- (a) idle pods ------------------------------------------------------------------------


async def _idle(config: Config, ids: list[str], settle: float, memory_mib: int) -> dict[str, Any]:
    pods: list[Sandbox] = []
    detail: dict[str, Any] = {"pods": len(ids), "memory_mib": memory_mib}
    try:
        available_before = host_available_kib()
        ready = []
        for sid in ids:  # one after the other: each boot has the cores to itself
            sb, dt = await start_pod(config, sid)
            pods.append(sb)
            ready.append(round(dt, 3))
        await asyncio.sleep(settle)
        mems = [qemu_memory(sb.vm_pid, memory_mib) for sb in pods]
        fs_pss = sum(rollup(p).get("Pss", 0) for sb in pods for p in virtiofsd_pids(sb.id))
        detail.update(
            ready_seconds=ready,
            host_available_drop_kib=available_before - host_available_kib(),
            qemu=mems,
            virtiofsd_pss_kib=fs_pss,
        )
        # the guest's own view, after QEMU was measured (a container touches memory too)
        detail["guest_meminfo_kib"] = [await guest_meminfo(sb) for sb in pods]
    finally:
        await destroy_all(pods)
    return detail


def idle_summary(d: dict[str, Any]) -> dict[str, float]:
    """Per-pod figures of one idle sample, in MiB."""
    n: int = d["pods"]

    def per_pod(fn: Callable[[dict[str, Any]], int]) -> float:
        return round(sum(fn(m) for m in d["qemu"]) / n / KIB_PER_MIB, 1)

    guest = d["guest_meminfo_kib"]
    used = statistics.median(g["MemTotal"] - g["MemFree"] for g in guest)
    return {
        "qemu_pss_mib": per_pod(lambda m: m["pss_kib"]),
        "qemu_rss_mib": per_pod(lambda m: m["rss_kib"]),
        "guest_ram_pss_mib": per_pod(lambda m: m["parts"]["guest_ram"]["pss_kib"]),
        "tcg_cache_pss_mib": per_pod(lambda m: m["parts"]["tcg_cache"]["pss_kib"]),
        "files_pss_mib": per_pod(lambda m: m["parts"]["files"]["pss_kib"]),
        "other_pss_mib": per_pod(lambda m: m["parts"]["other"]["pss_kib"]),
        "virtiofsd_pss_mib": round(d["virtiofsd_pss_kib"] / n / KIB_PER_MIB, 1),
        "host_available_drop_mib": round(d["host_available_drop_kib"] / n / KIB_PER_MIB, 1),
        "guest_used_mib": round(used / KIB_PER_MIB, 1),
        "guest_shmem_mib": round(statistics.median(g["Shmem"] for g in guest) / KIB_PER_MIB, 1),
        "guest_anon_mib": round(statistics.median(g["AnonPages"] for g in guest) / KIB_PER_MIB, 1),
        "guest_slab_mib": round(statistics.median(g["Slab"] for g in guest) / KIB_PER_MIB, 1),
        "guest_kernel_reserved_mib": round(
            statistics.median(d["memory_mib"] * KIB_PER_MIB - g["MemTotal"] for g in guest)
            / KIB_PER_MIB,
            1,
        ),
    }


# -- (b) memory returned ------------------------------------------------------------------


async def _free(
    config: Config, sid: str, settle: float, after_wait: float, mib: int, memory_mib: int
) -> dict[str, Any]:
    sb, ready = await start_pod(config, sid)
    series: list[tuple[float, int]] = []
    try:
        await asyncio.sleep(settle)
        pid = sb.vm_pid
        before = qemu_memory(pid, memory_mib)
        stop = asyncio.Event()
        t0 = time.perf_counter()

        async def monitor() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    series.append((round(time.perf_counter() - t0, 2), rollup(pid)["Rss"]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)

        task = asyncio.ensure_future(monitor())
        try:
            # dd's one buffer of MIB MiB, filled from /dev/zero (every page touched),
            # freed when dd exits
            code, out, err, _ = await run_in(
                sb, ["dd", "if=/dev/zero", "of=/dev/null", f"bs={mib}M", "count=1"]
            )
            exited = time.perf_counter() - t0
            if code != 0 or "1+0 records out" not in err + out:
                raise BenchError(f"dd of {mib} MiB in the guest: exit {code}: {err.strip()[-200:]}")
            await asyncio.sleep(after_wait)
        finally:
            stop.set()
            await task
        after = qemu_memory(pid, memory_mib)
    finally:
        await destroy_all([sb])
    peak = max(rss for _, rss in series) if series else 0
    return {
        "ready_seconds": round(ready, 3),
        "before": before,
        "after": after,
        "peak_rss_kib": peak,
        "container_exited_at": round(exited, 2),
        "rss_series_kib": series,
    }


def free_summary(d: dict[str, Any]) -> dict[str, float]:
    before = d["before"]["rss_kib"] / KIB_PER_MIB
    peak = d["peak_rss_kib"] / KIB_PER_MIB
    after = d["after"]["rss_kib"] / KIB_PER_MIB
    return {
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_mib": round(after, 1),
        "returned_mib": round(peak - after, 1),
        "kept_mib": round(after - before, 1),
    }


# -- (c) TCG translation cache ------------------------------------------------------------


async def _tb(config: Config, sid: str, settle: float, memory_mib: int) -> dict[str, Any]:
    sb, ready = await start_pod(config, sid)
    try:
        await asyncio.sleep(settle)
        idle = qemu_memory(sb.vm_pid, memory_mib)
        code, _, err, t_true = await run_in(sb, ["true"])
        if code != 0:
            raise BenchError(f"true in the guest: exit {code}: {err.strip()[-200:]}")
        code, out, err, t_work = await run_in(sb, ["sh", "-c", WORKLOAD])
        if code != 0 or out.strip() != "done":
            raise BenchError(f"the workload: exit {code}: {err.strip()[-200:]}")
        after = qemu_memory(sb.vm_pid, memory_mib)
    finally:
        await destroy_all([sb])
    return {
        "ready_seconds": round(ready, 3),
        "true_seconds": round(t_true, 3),
        "workload_seconds": round(t_work, 3),
        "idle": idle,
        "after_workload": after,
    }


def tb_summary(d: dict[str, Any]) -> dict[str, float]:
    def mib(kib: int) -> float:
        return round(kib / KIB_PER_MIB, 1)

    return {
        "ready_s": d["ready_seconds"],
        "true_s": d["true_seconds"],
        "workload_s": d["workload_seconds"],
        "idle_pss_mib": mib(d["idle"]["pss_kib"]),
        "idle_tcg_cache_mib": mib(d["idle"]["parts"]["tcg_cache"]["rss_kib"]),
        "after_pss_mib": mib(d["after_workload"]["pss_kib"]),
        "after_tcg_cache_mib": mib(d["after_workload"]["parts"]["tcg_cache"]["rss_kib"]),
    }


# -- bookkeeping --------------------------------------------------------------------------


@dataclass
class Row:
    """The samples of one row: per-sample details and their summaries."""

    name: str
    details: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    def medians(self) -> dict[str, float]:
        if not self.summaries:
            return {}
        keys = self.summaries[0].keys()
        return {k: round(statistics.median(s[k] for s in self.summaries), 3) for k in keys}

    def spread(self, key: str) -> tuple[float, float] | None:
        xs = [s[key] for s in self.summaries if key in s]
        return (min(xs), max(xs)) if xs else None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.details, "summaries": self.summaries}
        out["medians"] = self.medians()
        if self.error is not None:
            out["error"] = self.error
        return out


def sample(
    row: Row,
    record: bool,
    fn: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
    summarize: Callable[[dict[str, Any]], dict[str, float]],
) -> None:
    if row.error is not None:
        return
    try:
        detail = asyncio.run(fn())
    except Exception as e:
        row.error = f"{type(e).__name__}: {e}"
        return
    if record:
        row.details.append(detail)
        row.summaries.append(summarize(detail))


def leftovers(config: Config, prefix: str) -> list[str]:
    """Whatever this run made that still exists: QEMU or virtiofsd processes of its pods,
    run dirs, mounts, host cgroups."""
    found = [f"QEMU pid {p}" for p in boot._qemu_pids_with(prefix)]
    found += [f"virtiofsd pid {p}" for p in virtiofsd_pids(prefix)]
    run_dir = Path(config.runtime.run_dir)
    if run_dir.is_dir():
        found += [str(p) for p in run_dir.iterdir() if p.name.startswith(prefix)]
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if prefix in line.split()[1]]
    for depth in range(0, 6):
        found += [str(p) for p in CGROUP_ROOT.glob("*/" * depth + f"*{prefix}*") if p.is_dir()]
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "absent"


def ksm_facts() -> dict[str, Any]:
    if not KSM.is_dir():
        return {"available": False}
    return {
        "available": True,
        "run": _read(KSM / "run"),
        "pages_sharing": _read(KSM / "pages_sharing"),
        "pages_to_scan": _read(KSM / "pages_to_scan"),
    }


# -- report -------------------------------------------------------------------------------


def ksm_text(ksm: dict[str, Any]) -> str:
    if not ksm.get("available"):
        return "absent"
    state = {"0": "off", "1": "on", "2": "off, unmerging"}.get(ksm["run"], ksm["run"])
    return f"run={ksm['run']} ({state}), pages_sharing={ksm['pages_sharing']}"


def _f(x: float | None, fmt: str = ".0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _range(row: Row, key: str, fmt: str) -> str:
    s = row.spread(key)
    return "" if s is None else f" ({format(s[0], fmt)}-{format(s[1], fmt)})"


def _failed(row: Row, cells: int) -> str:
    err = (row.error or "").replace("|", "/").replace("\n", " ")
    return f"| {row.name} | failed: {err} |" + " |" * (cells - 1)


def markdown(
    machine: dict[str, Any],
    runs: int,
    n: int,
    idle: list[Row],
    free: list[Row],
    tb: list[Row],
    notes: list[str],
    free_mib: int,
) -> str:
    lines = [
        "# carapace footprint benchmark",
        "",
        f"{machine['date']} · {machine['nproc']} CPUs ({machine['cpu']}) · "
        f"{machine['memory_total_mib']} MiB · host kernel {machine['host_kernel']} · "
        f"{machine['qemu']} · accel **{machine['accel']}** ({machine['accel_reason']}) · "
        f"pod VM {machine['vm_vcpus']} vCPU, {machine['vm_memory_mib']} MiB, "
        f"shared_fs {machine['shared_fs']}, tcg_tb_size_mib {machine['tcg_tb_size_mib']}, "
        f"reclaim_guest_freed_memory {machine['reclaim_guest_freed_memory']} · KSM "
        f"{ksm_text(machine['ksm'])} · THP {machine['thp']}",
        "",
        f"Medians of {runs} runs per row (min-max in brackets), rounds interleaved, in one "
        f"invocation ({machine['warmup_rounds']} untimed warm-up pod(s) first). MiB of QEMU's "
        "memory from /proc/PID/smaps_rollup and smaps, once the pods were idle for "
        f"{machine['settle_seconds']:g} s.",
        "",
        "## Idle pods",
        "",
        "| measurement | QEMU PSS MiB per pod | goal | QEMU RSS per pod | guest RAM | TCG cache "
        "| mapped files | other | virtiofsd PSS | host MemAvailable drop per pod | runs |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in idle:
        if row.error is not None:
            lines.append(_failed(row, 10))
            continue
        m = row.medians()
        goal = ""
        if row.name == idle_many_name(n) and m:
            ok = m["qemu_pss_mib"] <= PSS_GOAL_MIB
            goal = f"≤ {PSS_GOAL_MIB}: **{'met' if ok else 'not met'}**"
        lines.append(
            f"| {row.name} | {_f(m.get('qemu_pss_mib'))}{_range(row, 'qemu_pss_mib', '.0f')} "
            f"| {goal} | {_f(m.get('qemu_rss_mib'))} | {_f(m.get('guest_ram_pss_mib'))} "
            f"| {_f(m.get('tcg_cache_pss_mib'))} | {_f(m.get('files_pss_mib'))} "
            f"| {_f(m.get('other_pss_mib'))} | {_f(m.get('virtiofsd_pss_mib'))} "
            f"| {_f(m.get('host_available_drop_mib'))} | {len(row.summaries)} |"
        )
    lines += [
        "",
        "Guest RAM, TCG cache, mapped files and other are QEMU's PSS split by mapping (guest "
        "RAM: the RAM block; TCG cache: the translation buffer; files: the kernel, the initrd, "
        "QEMU and its libraries, shared between pods by the page cache).",
        "",
        "| measurement | guest used (MemTotal - MemFree) | of it Shmem (initramfs files) "
        "| AnonPages | Slab | kernel reserved (VM size - MemTotal) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in idle:
        m = row.medians()
        if m:
            lines.append(
                f"| {row.name} | {_f(m['guest_used_mib'])} | {_f(m['guest_shmem_mib'])} "
                f"| {_f(m['guest_anon_mib'])} | {_f(m['guest_slab_mib'])} "
                f"| {_f(m['guest_kernel_reserved_mib'])} |"
            )
    lines += [
        "",
        f"## Memory returned after a container frees {free_mib} MiB",
        "",
        "| measurement | QEMU RSS before MiB | peak | after | returned (peak - after) "
        "| kept (after - before) | runs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in free:
        if row.error is not None:
            lines.append(_failed(row, 6))
            continue
        m = row.medians()
        lines.append(
            f"| {row.name} | {_f(m.get('rss_before_mib'))} | {_f(m.get('rss_peak_mib'))} "
            f"| {_f(m.get('rss_after_mib'))} | **{_f(m.get('returned_mib'))}**"
            f"{_range(row, 'returned_mib', '.0f')} | {_f(m.get('kept_mib'))} "
            f"| {len(row.summaries)} |"
        )
    lines += [
        "",
        f"`after` is {machine['after_wait_seconds']:g} s after the container exited "
        "(the guest reports freed pages about 2 s after they were freed).",
        "",
        "## TCG translation cache (`[hypervisor] tcg_tb_size_mib`)",
        "",
    ]
    if not tb:
        lines.append(f"Not measured: the pods run under {machine['accel']} (no TCG cache).")
    else:
        lines += [
            "| tb-size | pod ready s | `true` s | workload s | idle QEMU PSS MiB "
            "| TCG cache idle MiB | QEMU PSS after workload | TCG cache after | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in tb:
            if row.error is not None:
                lines.append(_failed(row, 8))
                continue
            m = row.medians()
            lines.append(
                f"| {row.name} | {_f(m.get('ready_s'), '.2f')}{_range(row, 'ready_s', '.2f')} "
                f"| {_f(m.get('true_s'), '.2f')} | {_f(m.get('workload_s'), '.2f')} "
                f"| {_f(m.get('idle_pss_mib'))} | {_f(m.get('idle_tcg_cache_mib'))} "
                f"| {_f(m.get('after_pss_mib'))} | {_f(m.get('after_tcg_cache_mib'))} "
                f"| {len(row.summaries)} |"
            )
        lines += ["", f"The workload: `sh -c '{WORKLOAD}'`."]
    if notes:
        lines += ["", *[f"- {x}" for x in notes]]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed pod starts first (1)")
    ap.add_argument("--pods", type=int, default=8, help="idle pods at once (8)")
    ap.add_argument(
        "--tb-sizes",
        default="0,256,128,64,32",
        help="tcg_tb_size_mib values to compare, 0 = QEMU's default (0,256,128,64,32)",
    )
    ap.add_argument("--free-mib", type=int, default=512, help="MiB a container frees (512)")
    ap.add_argument("--settle", type=float, default=8.0, help="idle seconds before measuring (8)")
    ap.add_argument(
        "--after", type=float, default=8.0, help="seconds after the free to read RSS (8)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory for footprint.json and footprint.md (benchmarks/results)",
    )
    args = ap.parse_args(argv)
    try:
        tb_sizes = [int(x) for x in args.tb_sizes.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--tb-sizes: {args.tb_sizes!r}; accepted: comma-separated MiB, 0 = default")
    if args.runs < 1 or args.warmup < 0 or args.pods < 1 or args.free_mib < 1:
        ap.error("--runs, --pods and --free-mib must be >= 1, --warmup >= 0")
    if os.geteuid() != 0:
        ap.error("run it as root (pods need it)")

    config = load_config()
    hv = config.hypervisor
    _image, kernel, _initrd, accel = boot.guest_of(config, "footprint.py")
    sizing = Sandbox(config, SandboxOptions(memory=MEMORY))
    memory_mib = sizing.memory_mib
    if accel.accel != "tcg":
        tb_sizes = []
    # every tb-size row is a pod of its own; the configured size is one of them
    if accel.accel == "tcg" and hv.tcg_tb_size_mib not in tb_sizes:
        tb_sizes.append(hv.tcg_tb_size_mib)
    prefix = f"fp-{secrets.token_hex(3)}"
    machine: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "cpu": boot._cpu_model(),
        "memory_total_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20,
        "host_kernel": platform.release(),
        "qemu": boot._first_line([hv.path, "--version"]),
        "accel": accel.accel,
        "accel_reason": accel.reason,
        "guest_kernel": str(kernel),
        "vm_vcpus": sizing.vcpus,
        "vm_memory_mib": memory_mib,
        "shared_fs": hv.shared_fs,
        "tcg_tb_size_mib": hv.tcg_tb_size_mib,
        "reclaim_guest_freed_memory": hv.reclaim_guest_freed_memory,
        "cgroups": boot._cgroup_mode(),
        "python": platform.python_version(),
        "config": config.source,
        "ksm": ksm_facts(),
        "thp": _read(THP),
        "warmup_rounds": args.warmup,
        "settle_seconds": args.settle,
        "after_wait_seconds": args.after,
        "qemu_processes_at_start": boot._qemu_count(),
        "loadavg_at_start": round(os.getloadavg()[0], 2),
    }
    many = idle_many_name(args.pods)
    idle = [Row(IDLE_ONE), Row(many)]
    free = [Row(FREE_ON), Row(FREE_OFF)]
    tb = [Row(tb_name(s)) for s in tb_sizes]
    notes: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    interrupted = False

    try:
        for i in range(args.warmup):
            print(f"[warm-up {i + 1}/{args.warmup}] one pod ...", file=sys.stderr, flush=True)
            warm = Row("warm-up")
            sample(
                warm, False, partial(_idle, config, [f"{prefix}-w{i}"], 0, memory_mib), idle_summary
            )
            if warm.error is not None:
                notes.append(f"warm-up failed: {warm.error}")
        for r in range(args.runs):
            tag = f"run {r + 1}/{args.runs}"
            print(f"[{tag}] 1 idle pod, {args.pods} idle pods ...", file=sys.stderr, flush=True)
            one = partial(_idle, config, [f"{prefix}-one{r}"], args.settle, memory_mib)
            sample(idle[0], True, one, idle_summary)
            ids = [f"{prefix}-many{r}-{k}" for k in range(args.pods)]
            sample(
                idle[1], True, partial(_idle, config, ids, args.settle, memory_mib), idle_summary
            )
            print(f"[{tag}] memory returned, on and off ...", file=sys.stderr, flush=True)
            order = [(free[0], True), (free[1], False)]
            for row, on in order if r % 2 == 0 else order[::-1]:
                cfg = with_hypervisor(config, reclaim_guest_freed_memory=on)
                sid = f"{prefix}-free{r}-{int(on)}"
                fn = partial(_free, cfg, sid, args.settle, args.after, args.free_mib, memory_mib)
                sample(row, True, fn, free_summary)
            if tb:
                print(f"[{tag}] tb-size {tb_sizes} ...", file=sys.stderr, flush=True)
            for k, (row, size) in enumerate(zip(tb, tb_sizes, strict=True)):
                cfg = with_hypervisor(config, tcg_tb_size_mib=size)
                sid = f"{prefix}-tb{r}-{k}"
                sample(row, True, partial(_tb, cfg, sid, args.settle, memory_mib), tb_summary)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up ...", file=sys.stderr, flush=True)

    left = leftovers(config, prefix)
    machine["qemu_processes_at_end"] = boot._qemu_count()
    machine["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    if interrupted:
        if left:
            print(f"LEFT BEHIND: {', '.join(left)}", file=sys.stderr)
        return 130
    if machine["qemu_processes_at_start"]:
        notes.append(
            f"{machine['qemu_processes_at_start']} other QEMU process(es) were running when "
            "the benchmark started: the host MemAvailable figures and the times are disturbed."
        )
    ram = [m for row in idle for d in row.details for m in d["qemu"]]
    if ram:
        shared = ram[0]["guest_ram_shared"]
        mergeable = ram[0]["guest_ram_mergeable"]
        notes.append(
            "KSM: guest RAM is "
            + (
                "a shared memfd (virtio-fs needs it): KSM merges only private anonymous "
                "memory, so QEMU's mem-merge (madvise MADV_MERGEABLE) does not apply to it"
                if shared
                else "private anonymous memory"
                + (
                    " marked mergeable by QEMU (mem-merge=on)"
                    if mergeable
                    else " not marked mergeable"
                )
            )
            + f"; KSM on this host: {ksm_text(machine['ksm'])}."
        )
    if left:
        notes.append("LEFT BEHIND: " + ", ".join(left))

    rows = [*idle, *free, *tb]
    report = {
        "machine": machine,
        "runs": args.runs,
        "parameters": {
            "pods": args.pods,
            "tb_sizes_mib": tb_sizes,
            "free_mib": args.free_mib,
            "workload": WORKLOAD,
            "pss_goal_mib_per_pod": PSS_GOAL_MIB,
        },
        "results": {row.name: row.report() for row in rows},
        "notes": notes,
    }
    md = markdown(machine, args.runs, args.pods, idle, free, tb, notes, args.free_mib)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "footprint.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "footprint.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'footprint.json'} and {args.out / 'footprint.md'}", file=sys.stderr)
    failed = any(row.error is not None for row in rows)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
