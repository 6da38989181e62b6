"""VM templates: a pod ready from a template against a cold pod and a bare boot, and the
memory of idle pods restored from one template against idle cold pods.

Rows, interleaved in rounds so that machine load affects all alike: the bare boot to
/init (boot.py's floor), a cold pod ready (virtio-fs, the default), a pod ready from a
template with virtio-fs (its own copy of the template's RAM) and with 9p (the template's
RAM shared copy-on-write), and a pod whose VM it takes from a pool of pre-booted VMs
(``carapace factory pool --size 1``, started by the benchmark on an endpoint of its
own; before each pool sample the pool is full and idle, and the round goes on only once
it booted the replacement, so its boots never overlap another row). Then ``--pods``
idle pods of each kind at once, measured by QEMU's PSS (footprint.py's reading), and
what the pool costs while it waits: the PSS of its idle VM. Templates live in a
directory of this run's, built before the timed rounds (their build time is reported),
removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # boot.py and footprint.py beside us
    sys.path.insert(0, str(HERE))

import boot  # noqa: E402
import footprint  # noqa: E402
from boot import BenchError  # noqa: E402

from carapace.config import Config, load_config  # noqa: E402
from carapace.errors import CarapaceError  # noqa: E402
from carapace.factory import TemplateStore, pool  # noqa: E402
from carapace.sandbox import Sandbox  # noqa: E402

MEMORY_MIB = 1024
#: The goals issue 16 sets, beside the figures.
GOALS = {"template ready / bare boot": 0.5, "cold ready / bare boot": 1.5}
POOL = "pool"
POOL_READY_TIMEOUT = 300.0
KINDS = {
    "cold": ("virtio-fs", False),
    "template virtio-fs": ("virtio-fs", True),
    "template 9p": ("virtio-9p", True),
}


def kind_config(base: Config, kind: str, template_dir: Path) -> Config:
    shared_fs, template = KINDS[kind]
    cfg = footprint.with_hypervisor(base, shared_fs=shared_fs)
    factory = dataclasses.replace(cfg.factory, template=template, template_dir=str(template_dir))
    return dataclasses.replace(cfg, factory=factory)


async def ready_once(cfg: Config, sid: str, template: bool, pooled: bool = False) -> float:
    sb, dt = await footprint.start_pod(cfg, sid)
    try:
        if template and not sb.template:
            raise BenchError(f"pod {sid} booted cold though templates are on (see the log)")
        if pooled and not sb.pooled:
            raise BenchError(f"pod {sid} did not take a pool VM (see the log)")
    finally:
        await sb.destroy()
    return dt


class PoolProcess:
    """``carapace factory pool`` of one VM, on the benchmark's own endpoint."""

    def __init__(self, scratch: Path) -> None:
        self.endpoint = scratch / "vmcache.sock"
        self.config_file = scratch / "pool.toml"
        self.config_file.write_text(
            f'[factory]\nvm_cache_number = 1\nvm_cache_endpoint = "{self.endpoint}"\n'
        )
        self.log = scratch / "pool.log"
        carapace = Path(sys.executable).parent / "carapace"
        self.proc = subprocess.Popen(
            [str(carapace), "--config", str(self.config_file), "factory", "pool"],
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def config(self) -> Config:
        return load_config(self.config_file)

    def wait_full(self) -> dict[str, object]:
        """Until its VM is ready and it boots none."""
        deadline = time.monotonic() + POOL_READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the VM pool exited: {self.log.read_text()[-1500:]}")
            try:
                st = pool.status(self.endpoint)
                if st.get("ready") == 1 and st.get("booting") == 0:
                    return st
            except CarapaceError:
                pass  # not serving yet
            if time.monotonic() > deadline:
                raise BenchError(f"the VM pool did not fill: {self.log.read_text()[-1500:]}")
            time.sleep(0.2)

    def idle_vm_memory(self) -> dict[str, Any]:
        """QEMU memory of the pool's waiting VM (footprint.qemu_memory)."""
        pids = [
            int(d.name)
            for d in Path("/proc").iterdir()
            if d.name.isdigit() and b"\0carapace-pool:" in _cmdline(d)
        ]
        if len(pids) != 1:
            raise BenchError(f"pool VMs found: {pids}; expected 1")
        return footprint.qemu_memory(pids[0], MEMORY_MIB)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cmdline(d: Path) -> bytes:
    try:
        return (d / "cmdline").read_bytes()
    except OSError:
        return b""


async def idle_pss(cfg: Config, n: int, prefix: str, settle: float) -> dict[str, Any]:
    pods: list[Sandbox] = []
    try:
        for i in range(n):
            sb, _ = await footprint.start_pod(cfg, f"{prefix}{i}")
            pods.append(sb)
        await asyncio.sleep(settle)
        mems = [footprint.qemu_memory(sb.vm_pid, MEMORY_MIB) for sb in pods]
        fs = [
            sum(footprint.rollup(p).get("Pss", 0) for p in footprint.virtiofsd_pids(sb.id))
            for sb in pods
        ]
    finally:
        await footprint.destroy_all(pods)
    pss = [m["pss_kib"] / 1024 for m in mems]
    return {
        "pods": n,
        "qemu_pss_mib_each": [round(x, 1) for x in pss],
        "qemu_pss_mib_median": round(statistics.median(pss), 1),
        "qemu_rss_mib_median": round(statistics.median(m["rss_kib"] / 1024 for m in mems), 1),
        "virtiofsd_pss_mib_median": round(statistics.median(fs) / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (3)")
    ap.add_argument("--pods", type=int, default=8, help="idle pods at once per kind (8)")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds before PSS (5)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="report directory")
    args = ap.parse_args(argv)
    base = load_config()
    _, kernel, _initrd, accel = boot.guest_of(base, "template.py")
    prefix = f"bt{secrets.token_hex(3)}"
    template_dir = Path(f"/dev/shm/carapace-bench-{os.getpid()}")
    scratch = Path(f"/tmp/carapace-bench-template-{os.getpid()}")
    scratch.mkdir()
    samples: dict[str, list[float]] = {"bare boot": [], **{k: [] for k in KINDS}, POOL: []}
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "host_kernel": platform.release(),
            "accel": accel.accel,
            "accel_reason": accel.reason,
        },
        "memory_mib": MEMORY_MIB,
    }
    failed = False
    vm_pool: PoolProcess | None = None
    try:
        bare = boot.bare_argv(
            base,
            kernel,
            boot.build_tiny_initramfs(scratch / "tiny.cpio"),
            accel,
            1,
            MEMORY_MIB,
            scratch,
        )
        # the templates are built before the timed rounds (one pod each)
        builds: dict[str, float] = {}
        for kind in KINDS:
            if KINDS[kind][1]:
                asyncio.run(ready_once(kind_config(base, kind, template_dir), f"{prefix}w", True))
        for t in TemplateStore(template_dir).templates():
            info = t.info()
            inputs = info.get("inputs", {})
            argv_ = inputs.get("argv", []) if isinstance(inputs, dict) else []
            nine_p = any("virtio-9p" in str(a) for a in argv_)
            kind = "template 9p" if nine_p else "template virtio-fs"
            builds[kind] = float(str(info.get("build_seconds", 0)))
        report["template_build_seconds"] = builds
        vm_pool = PoolProcess(scratch)
        vm_pool.wait_full()
        report["pool_idle_vm"] = vm_pool.idle_vm_memory()
        for r in range(args.runs):
            samples["bare boot"].append(boot.measure_bare(bare)[0])
            for kind in KINDS:
                cfg = kind_config(base, kind, template_dir)
                dt = asyncio.run(ready_once(cfg, f"{prefix}{r}", KINDS[kind][1]))
                samples[kind].append(dt)
            vm_pool.wait_full()
            dt = asyncio.run(ready_once(vm_pool.config(), f"{prefix}p{r}", False, pooled=True))
            samples[POOL].append(dt)
            vm_pool.wait_full()  # its replacement booted before the next row
        med = {k: statistics.median(v) for k, v in samples.items()}
        report["ready_seconds"] = {k: [round(x, 3) for x in v] for k, v in samples.items()}
        report["ready_median"] = {k: round(v, 3) for k, v in med.items()}
        ratios = {
            "cold ready / bare boot": med["cold"] / med["bare boot"],
            "template ready / bare boot": med["template virtio-fs"] / med["bare boot"],
            "template 9p ready / bare boot": med["template 9p"] / med["bare boot"],
            "pool ready / bare boot": med[POOL] / med["bare boot"],
        }
        report["ratios"] = {k: round(v, 2) for k, v in ratios.items()}
        if args.pods > 0:
            report["idle"] = {
                kind: asyncio.run(
                    idle_pss(
                        kind_config(base, kind, template_dir),
                        args.pods,
                        f"{prefix}i{n}",
                        args.settle,
                    )
                )
                for n, kind in enumerate(KINDS)
            }
    except BenchError as e:
        report["error"] = str(e)
        failed = True
    finally:
        if vm_pool is not None:
            vm_pool.stop()
        shutil.rmtree(template_dir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    report["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "template.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out / "template.md").write_text(md)
    print(md)
    return 1 if failed else 0


def markdown(report: dict[str, Any]) -> str:
    lines = ["# VM templates", ""]
    if "error" in report:
        lines += [f"**failed:** {report['error']}", ""]
    med = report.get("ready_median", {})
    if med:
        lines += ["| pod ready | median s | samples |", "|---|---:|---|"]
        for k, v in med.items():
            lines.append(f"| {k} | {v:.2f} | {report['ready_seconds'][k]} |")
        lines += ["", "| ratio | now | goal |", "|---|---:|---:|"]
        for k, v in report.get("ratios", {}).items():
            goal = GOALS.get(k)
            lines.append(f"| {k} | {v:.2f}x | {'' if goal is None else f'<= {goal}x'} |")
        builds = report.get("template_build_seconds", {})
        lines += ["", f"Template builds (seconds, once per kind): {builds}", ""]
    idle = report.get("idle", {})
    if idle:
        lines += [
            "| idle pods at once | QEMU PSS per pod, MiB | QEMU RSS, MiB | virtiofsd PSS, MiB |",
            "|---|---:|---:|---:|",
        ]
        for k, d in idle.items():
            lines.append(
                f"| {d['pods']} x {k} | {d['qemu_pss_mib_median']} | "
                f"{d['qemu_rss_mib_median']} | {d['virtiofsd_pss_mib_median']} |"
            )
        lines += ["", "Goal: PSS <= 120 MiB per pod with 8 idle pods.", ""]
    waiting = report.get("pool_idle_vm")
    if waiting:
        lines += [
            f"The pool's cost while it waits: its idle VM's QEMU PSS "
            f"{waiting['pss_kib'] / 1024:.1f} MiB (RSS {waiting['rss_kib'] / 1024:.1f} MiB) "
            "per VM kept ready.",
            "",
        ]
    m = report["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs, {m['host_kernel']}, {m['accel']}; {report['date']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
