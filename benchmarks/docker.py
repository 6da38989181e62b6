#!/usr/bin/env python3
"""docker benchmark: ``docker run --rm busybox true`` with carapace against runc.

Starts a private dockerd (tests/integration/engines/docker_rig.py: its own data root,
exec root and socket under /tmp/engine-docker-XXXX, no iptables, no default bridge,
vfs storage, the runtime ``carapace`` = .venv/bin/carapace-runtime, the busybox image
built from the host's busybox-static) and measures, in one invocation (rounds
interleaved), N samples of the wall time of

* ``docker run --rm --network none --runtime carapace <busybox> true``;
* the same with ``--runtime runc``.

Reports ``carapace ÷ runc`` (of the medians), prints a Markdown table and writes
results/docker.json and results/docker.md. After every sample it checks, untimed, that
the container is gone and that no QEMU process of the sample is left; dockerd and all
its directories are removed at the end, also after a failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
from boot import BenchError, Measurement  # noqa: E402

from carapace.config import parse_config  # noqa: E402
from carapace.sandbox import Sandbox, SandboxOptions  # noqa: E402
from tests.integration.engines.docker_rig import (  # noqa: E402
    CARAPACE_CONFIG_TEXT,
    CARAPACE_RUNTIME,
    DOCKER,
    DOCKERD,
    DockerCommandError,
    DockerRig,
)

RUN_TIMEOUT = 600.0
SETTLE_TIMEOUT = 120.0

DOCKER_CARAPACE = "docker run --rm … true (carapace)"
DOCKER_RUNC = "docker run --rm … true (runc)"
ORDER = [DOCKER_CARAPACE, DOCKER_RUNC]
RATIO = "docker_carapace / docker_runc"


def measure_run(rig: DockerRig, runtime: str) -> float:
    """Wall time of one ``docker run --rm`` of ``true``; it must exit 0 and print nothing."""
    t0 = time.perf_counter()
    try:
        r = rig.docker(
            "run", "--rm", "--network", "none", "--runtime", runtime, rig.image, "true",
            timeout=RUN_TIMEOUT,
        )  # fmt: skip
    except DockerCommandError as e:
        raise BenchError(f"docker run ({runtime}): {str(e).strip()[-500:]}") from e
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"docker run ({runtime}): no exit within {RUN_TIMEOUT:g}s") from e
    dt = time.perf_counter() - t0
    if r.stdout:
        raise BenchError(f"docker run ({runtime}) true printed {r.stdout[:200]!r}")
    return dt


def settle(rig: DockerRig, qemu_before: set[int], after: str) -> list[str]:
    """Untimed, after every sample: remove any container left (a problem), then wait until
    no QEMU process that appeared during the sample is left."""
    problems: list[str] = []
    try:
        left = rig.remove_all()
        if left:
            problems.append(f"after {after}, had to remove: {', '.join(left)}")
    except Exception as e:
        problems.append(f"after {after}, removing what was left failed: {e}")
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while new := set(boot._qemu_pids_with("")) - qemu_before:
        if time.monotonic() > deadline:
            problems.append(
                f"after {after}: QEMU {sorted(new)} still there {SETTLE_TIMEOUT:g}s later"
            )
            break
        time.sleep(0.2)
    return problems


@dataclass
class Bench:
    rig: DockerRig
    results: dict[str, Measurement]
    #: per measurement and recorded sample: QEMU processes not ours running at its start
    others: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def one(self, name: str, record: bool, fn: Callable[[], float]) -> None:
        if self.results[name].error is not None:
            return
        before = set(boot._qemu_pids_with(""))
        boot._timed(self.results, name, record, fn)
        if record:
            self.others.setdefault(name, []).append(len(before))
        self.problems += settle(self.rig, before, name)


def markdown(
    machine: dict[str, Any],
    runs: int,
    results: dict[str, Measurement],
    ratio: float | None,
    others: dict[str, list[int]],
    notes: list[str],
) -> str:
    lines = [
        "# carapace docker benchmark",
        "",
        f"{machine['date']} · {machine['nproc']} CPUs ({machine['cpu']}) · host kernel "
        f"{machine['host_kernel']} · {machine['qemu']} · accel **{machine['accel']}** "
        f"({machine['accel_reason']}) · {machine['dockerd']} · storage driver vfs · "
        f"container VM {machine['vm_vcpus']} vCPU, {machine['vm_memory_mib']} MiB",
        "",
        f"Medians of {runs} runs per row, rounds interleaved, in one invocation "
        f"({machine['warmup_rounds']} untimed warm-up round(s) first).",
        "",
        "| measurement | median s | min s | max s | runs | other QEMU seen |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ORDER:
        seen = others.get(name, [])
        lines.append(boot.measurement_row(name, results[name], max(seen) if seen else "n/a"))
    lines += [
        "",
        "| ratio (of medians) | value |",
        "|---|---:|",
        f"| **docker run carapace ÷ runc** | {'n/a' if ratio is None else f'{ratio:.3g}x'} |",
    ]
    if notes:
        lines += ["", *[f"- {x}" for x in notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    ap.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory for docker.json and docker.md (benchmarks/results)",
    )
    args = ap.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        ap.error(
            f"--runs {args.runs} / --warmup {args.warmup}: accepted: --runs >= 1, --warmup >= 0"
        )
    if os.geteuid() != 0:
        ap.error("run it as root (dockerd and QEMU need it)")
    for binary in (DOCKERD, DOCKER):
        if not Path(binary).is_file():
            ap.error(f"{binary} is not installed (Debian's docker.io)")
    if not CARAPACE_RUNTIME.exists():
        ap.error(f"{CARAPACE_RUNTIME} does not exist: install the project (pip install -e .)")

    results = {name: Measurement(name) for name in ORDER}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = parse_config(CARAPACE_CONFIG_TEXT, "the test dockerd's carapace configuration")
    hv = config.hypervisor
    _image, kernel, _initrd, accel = boot.guest_of(config, "docker.py")
    sizing = Sandbox(config, SandboxOptions())  # what a container without limits gets
    machine: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": boot._cpu_model(),
        "memory_total_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20,
        "host_kernel": platform.release(),
        "dockerd": boot._first_line([DOCKERD, "--version"]),
        "docker_cli": boot._first_line([DOCKER, "--version"]),
        "runc": boot._first_line(["runc", "--version"]),
        "carapace_runtime": str(CARAPACE_RUNTIME),
        "cgroups": boot._cgroup_mode(),
        "python": platform.python_version(),
        "qemu": boot._first_line([hv.path, "--version"]),
        "qemu_binary": hv.path,
        "accel": accel.accel,
        "accel_reason": accel.reason,
        "guest_kernel": str(kernel),
        "vm_vcpus": sizing.vcpus,
        "vm_memory_mib": sizing.memory_mib,
        "warmup_rounds": args.warmup,
        "loadavg_at_start": round(os.getloadavg()[0], 2),
        "other_qemu_processes_at_start": len(boot._qemu_pids_with("")),
    }
    rig = DockerRig(carapace_config_text=CARAPACE_CONFIG_TEXT)
    machine["rig"] = {"base": str(rig.base), "daemon_json": rig.daemon_config()}
    notes: list[str] = []
    stop_problems: list[str] = []
    interrupted = False
    bench: Bench | None = None
    print(f"starting a private dockerd in {rig.base} ...", file=sys.stderr, flush=True)
    try:
        rig.start()
        bench = Bench(rig, results)
        for i in range(args.warmup + args.runs):
            record = i >= args.warmup
            tag = f"run {i - args.warmup + 1}/{args.runs}" if record else "warm-up"
            print(f"[{tag}] docker run carapace, docker run runc ...", file=sys.stderr, flush=True)
            bench.one(DOCKER_CARAPACE, record, partial(measure_run, rig, "carapace"))
            bench.one(DOCKER_RUNC, record, partial(measure_run, rig, "runc"))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up ...", file=sys.stderr, flush=True)
    finally:
        stop_problems = rig.stop()
    if interrupted or bench is None:
        if stop_problems:
            print(f"stopping the dockerd: {'; '.join(stop_problems)}", file=sys.stderr)
        return 130

    machine["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    notes += bench.problems
    if stop_problems:
        notes.append("stopping the dockerd: " + "; ".join(stop_problems))
    others = max(
        [machine["other_qemu_processes_at_start"]] + [x for xs in bench.others.values() for x in xs]
    )
    if others:
        notes.append(
            f"up to {others} QEMU process(es) not ours were running (other test sessions on "
            "this machine): the timings are disturbed, compare them with care."
        )
    ratio = boot._ratio(results[DOCKER_CARAPACE].median, results[DOCKER_RUNC].median)
    report = {
        "machine": machine,
        "runs": args.runs,
        "results": {name: results[name].summary() for name in ORDER},
        "ratios": {RATIO: ratio},
        "other_qemu_processes_seen": bench.others,
        "notes": notes,
    }
    md = markdown(machine, args.runs, results, ratio, bench.others, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "docker.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "docker.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'docker.json'} and {args.out / 'docker.md'}", file=sys.stderr)
    failed = any(m.error is not None for m in results.values())
    return 1 if failed or bench.problems or stop_problems else 0


if __name__ == "__main__":
    sys.exit(main())
