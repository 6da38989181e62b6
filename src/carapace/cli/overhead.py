"""``carapace overhead``: measure what a pod costs the host beyond its containers and
recommend a RuntimeClass ``overhead.podFixed``.

A pod of the configured size is booted; the sandbox's host cgroup (QEMU with all its
threads, and this process standing in for the shim daemon that serves a pod) is
sampled while
the pod is idle and while a container runs a small CPU and memory load. The
recommendation covers the idle cost (VMM, guest kernel, agent) with a margin: the
containers' own usage is what their requests and limits are for.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass

from carapace.config import Config
from carapace.sandbox import Sandbox, SandboxOptions
from carapace.sizing import MiB

#: Margin on the measured idle cost.
MARGIN = 1.25
SAMPLE_EVERY = 0.25  # seconds
LOAD_SCRIPT = (
    # ~32 MiB in a tmpfs file and a busy shell loop, for the given seconds
    "dd if=/dev/zero of=/dev/shm/load bs=1M count=32 2>/dev/null; "
    "end=$(( $(date +%s) + {seconds} )); while [ $(date +%s) -lt $end ]; do :; done; "
    "rm -f /dev/shm/load"
)


@dataclass(frozen=True)
class Phase:
    seconds: float
    cpu_cores: float  # host CPU time per second of wall time
    memory_bytes: int  # last sample
    memory_peak_bytes: int
    pids: int


@dataclass(frozen=True)
class Recommendation:
    cpu_millicores: int
    memory_mib: int

    def runtimeclass_overhead(self) -> str:
        return (
            "overhead:\n  podFixed:\n"
            f'    memory: "{self.memory_mib}Mi"\n    cpu: "{self.cpu_millicores}m"\n'
        )


def recommend(idle: Phase, owner_rss: int = 0, margin: float = MARGIN) -> Recommendation:
    """podFixed from the idle cost with a margin, rounded up: CPU to 10 millicores (at
    least 10m), memory to whole MiB. ``owner_rss``: the serving process's memory that
    its cgroup does not show (pages it had before it joined stay charged where they
    were)."""
    cpu = max(10, math.ceil(idle.cpu_cores * margin * 1000 / 10) * 10)
    memory = math.ceil((idle.memory_peak_bytes + owner_rss) * margin / MiB)
    return Recommendation(cpu, memory)


def own_rss() -> int:
    """This process's resident memory (VmRSS) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _sample(sb: Sandbox, seconds: float, busy: asyncio.Future[int] | None) -> Phase:
    first = sb.host_stats()
    start = time.monotonic()
    peak = first.memory_bytes or 0
    last = first
    while time.monotonic() - start < seconds or (busy is not None and not busy.done()):
        await asyncio.sleep(SAMPLE_EVERY)
        last = sb.host_stats()
        peak = max(peak, last.memory_bytes or 0)
    elapsed = time.monotonic() - start
    cpu_ns = (last.cpu_usage_ns or 0) - (first.cpu_usage_ns or 0)
    return Phase(
        seconds=round(elapsed, 2),
        cpu_cores=round(cpu_ns / 1e9 / elapsed, 4),
        memory_bytes=last.memory_bytes or 0,
        memory_peak_bytes=peak,
        pids=last.pids or 0,
    )


async def measure(cfg: Config, idle_seconds: float, load_seconds: float) -> dict[str, object]:
    # this process joins the sandbox cgroup as the shim daemon does: a Python process
    # serving the pod is part of its cost
    sb = Sandbox(cfg, SandboxOptions(join_owner=True))
    await sb.start()
    try:
        await asyncio.sleep(2)  # let the guest settle after boot
        idle = await _sample(sb, idle_seconds, None)
        load_run = asyncio.ensure_future(
            sb.run(["sh", "-c", LOAD_SCRIPT.format(seconds=int(load_seconds))])
        )
        loaded = await _sample(sb, load_seconds, load_run)
        status = await load_run
    finally:
        await sb.destroy()
    rss = own_rss()
    rec = recommend(idle, rss)
    return {
        "vm": {"vcpus": sb.vcpus, "memory_mib": sb.memory_mib, "accel": sb.accel},
        "idle": asdict(idle),
        "load": {**asdict(loaded), "exit_status": status},
        "serving_process_rss_bytes": rss,
        "margin": MARGIN,
        "recommended": {"cpu": f"{rec.cpu_millicores}m", "memory": f"{rec.memory_mib}Mi"},
        "runtimeclass": rec.runtimeclass_overhead(),
    }


def cmd_overhead(cfg: Config, idle_seconds: float, load_seconds: float, as_json: bool) -> int:
    result = asyncio.run(measure(cfg, idle_seconds, load_seconds))
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    vm, idle, load = result["vm"], result["idle"], result["load"]
    print(f"pod VM: {vm}")
    print(f"idle:   {idle}")
    print(f"load:   {load}")
    print(f"serving process RSS (as a shim's): {result['serving_process_rss_bytes']}")
    print(f"recommended RuntimeClass overhead ((idle cost + serving process) x {MARGIN}):")
    print(result["runtimeclass"], end="")
    return 0
