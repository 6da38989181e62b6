#!/usr/bin/env python3
"""Storage benchmark: container file I/O over carapace's shared filesystems (virtio-fs
and 9p) against the same commands under runc on the host, and pod ready with each.

Measures in one invocation, rounds interleaved (the order rotating), N samples of:

* the same busybox shell script in a container, on a bind volume (``/vol``) and on the
  container's rootfs: untar of a tree of F files, ``find`` over the untarred tree and
  over the same tree already there, a sequential write of M MiB (``dd conv=fsync``),
  reading it back, a sequential read of M MiB already there, W 4 KiB writes each
  followed by an fsync; every step timed inside the container with its own clock, so
  the VM's boot is not in the figures;
* for each of virtio-fs and 9p (``[hypervisor] shared_fs``): a pod
  (``carapace.Sandbox(volumes=...)``) runs the script twice (volume, rootfs);
* runc on the host runs it twice over a bundle of the same rootfs with the same bind;
* pod ready: ``Sandbox.start()`` with virtio-fs and with 9p.

Prints a Markdown report (ratios virtio-fs ÷ runc, 9p ÷ runc, virtio-fs ÷ 9p per
workload) and writes results/storage.json and results/storage.md.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # boot.py beside us
    sys.path.insert(0, str(HERE))

import boot  # noqa: E402
from boot import BenchError, Measurement  # noqa: E402

import carapace  # noqa: E402
from carapace.config import Config, load_config  # noqa: E402
from carapace.oci.spec import default_spec  # noqa: E402
from carapace.protocols.contract import SHARED_FS_9P, SHARED_FS_VIRTIOFS  # noqa: E402
from carapace.sandbox import Sandbox as AsyncSandbox  # noqa: E402
from carapace.sandbox import SandboxOptions  # noqa: E402

VIRTIOFS = SHARED_FS_VIRTIOFS
NINEP = SHARED_FS_9P
RUNC = "runc"
SHARED_FS = (VIRTIOFS, NINEP)
BACKENDS = (VIRTIOFS, NINEP, RUNC)
LABELS = {VIRTIOFS: "virtio-fs", NINEP: "9p", RUNC: "runc"}

VOLUME = "volume"
ROOTFS = "rootfs"
LOCATIONS = (VOLUME, ROOTFS)
#: Where the script works in the container, per location: (work dir, what is already
#: there, the tarball).
PATHS = {
    VOLUME: ("/vol/work", "/vol/pre", "/vol/tree.tar"),
    ROOTFS: ("/bench/work", "/bench/pre", "/bench/tree.tar"),
}
GUEST_VOLUME = "/vol"

UNTAR = "untar"
FIND_NEW = "find_untarred"
FIND_OLD = "find_present"
WRITE = "write"
READ_BACK = "read_back"
READ_OLD = "read_present"
FSYNC = "fsync"
WORKLOADS = (UNTAR, FIND_NEW, FIND_OLD, WRITE, READ_BACK, READ_OLD, FSYNC)
#: Per location, the rows whose I/O goes through the pod's shared filesystem (on the
#: rootfs, the others write to and read from the guest's in-memory overlay).
THROUGH_SHARE = {VOLUME: set(WORKLOADS), ROOTFS: {UNTAR, FIND_OLD, READ_OLD}}

POD_READY = "pod_ready"
BLOCK = 4096
MIB = 1 << 20
CONTAINER_TIMEOUT = 3600  # seconds, enforced in the container by busybox timeout
RUNC_STATE_DIR = Path("/run/runc")

#: The container's wall clock with microseconds (busybox's date has no %N; adjtimex(2)
#: in read-only mode needs no privilege). Under TCG the guest clock follows the host's.
NOW = (
    "now() { adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} /status/ {st = $2} "
    'END {if (int(st / 8192) % 2) u = int(u / 1000); printf "%d.%06d\\n", s, u}\'; }'
)
#: The workloads, in one busybox shell. $1 work dir (made here, must not exist), $2 the
#: dir holding tree/ and big already, $3 the tarball, $4 MiB, $5 files, $6 writes.
#: Prints "STEP T0 T1" per step; checks every result (untimed) and exits 1 if wrong.
SCRIPT = f"""{NOW}
set -e
W=$1 P=$2 T=$3 MIB=$4 FILES=$5 WRITES=$6
fail() {{ echo "$*" >&2; exit 1; }}
mkdir "$W"
t0=$(now); tar -xf "$T" -C "$W"; t1=$(now); echo "{UNTAR} $t0 $t1"
t0=$(now); n=$(find "$W/tree" -type f | wc -l); t1=$(now); echo "{FIND_NEW} $t0 $t1"
[ "$n" -eq "$FILES" ] || fail "untar: $n files, not $FILES"
t0=$(now); n=$(find "$P/tree" -type f | wc -l); t1=$(now); echo "{FIND_OLD} $t0 $t1"
[ "$n" -eq "$FILES" ] || fail "find over $P/tree: $n files, not $FILES"
t0=$(now); out=$(dd if=/dev/zero of="$W/big" bs=1048576 count="$MIB" conv=fsync 2>&1)
t1=$(now); echo "{WRITE} $t0 $t1"
[ "$(stat -c %s "$W/big")" -eq $((MIB * 1048576)) ] || fail "write: $out"
t0=$(now); out=$(dd if="$W/big" of=/dev/null bs=1048576 2>&1); t1=$(now)
echo "{READ_BACK} $t0 $t1"
case "$out" in "$MIB+0 records in"*) ;; *) fail "read back: $out" ;; esac
t0=$(now); out=$(dd if="$P/big" of=/dev/null bs=1048576 2>&1); t1=$(now)
echo "{READ_OLD} $t0 $t1"
case "$out" in "$MIB+0 records in"*) ;; *) fail "read of $P/big: $out" ;; esac
blk=$(printf '%{BLOCK}s' '')
t0=$(now)
exec 3>"$W/small"
i=0
while [ $i -lt "$WRITES" ]; do printf '%s' "$blk" >&3; sync "$W/small"; i=$((i + 1)); done
exec 3>&-
t1=$(now); echo "{FSYNC} $t0 $t1"
[ "$(stat -c %s "$W/small")" -eq $((WRITES * {BLOCK})) ] || fail "small writes: wrong size"
"""


@dataclass
class Params:
    runs: int
    warmup: int
    mib: int
    files: int
    writes: int


def row_name(location: str, workload: str, backend: str) -> str:
    return f"{location}/{workload}/{backend}"


def workload_label(workload: str, p: Params) -> str:
    return {
        UNTAR: f"untar {p.files:,} files (tar -x)",
        FIND_NEW: "find over the untarred tree",
        FIND_OLD: f"find over {p.files:,} files already there",
        WRITE: f"sequential write {p.mib} MiB (dd, conv=fsync)",
        READ_BACK: f"read back the {p.mib} MiB just written",
        READ_OLD: f"sequential read {p.mib} MiB already there",
        FSYNC: f"{p.writes:,} writes of {BLOCK // 1024} KiB, each + fsync",
    }[workload]


def script_argv(location: str, p: Params) -> list[str]:
    work, present, tarball = PATHS[location]
    return [
        "timeout",
        "-s",
        "KILL",
        str(CONTAINER_TIMEOUT),
        "sh",
        "-c",
        SCRIPT,
        "sh",
        work,
        present,
        tarball,
        str(p.mib),
        str(p.files),
        str(p.writes),
    ]


def parse_figures(out: str, what: str) -> dict[str, float]:
    """The script's "STEP T0 T1" lines: seconds per step (all of them, or BenchError)."""
    figures = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in WORKLOADS:
            figures[parts[0]] = float(parts[2]) - float(parts[1])
    missing = [w for w in WORKLOADS if w not in figures]
    if missing:
        raise BenchError(f"{what}: no figure for {', '.join(missing)}: {out.strip()[-400:]!r}")
    if any(v < 0 for v in figures.values()):
        raise BenchError(f"{what}: a negative time (the clock stepped?): {figures}")
    return figures


# -- the data -----------------------------------------------------------------------------


def make_tree(dest: Path, files: int) -> int:
    """``files`` files of 0 to 8 KiB (deterministic bytes) in directories of 100; bytes."""
    rng = random.Random(13)
    total = 0
    for i in range(files):
        d = dest / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        data = rng.randbytes(rng.randrange(0, 8192))
        (d / f"f{i:05d}").write_bytes(data)
        total += len(data)
    return total


def make_tarball(tree: Path, dest: Path) -> None:
    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(tree, arcname="tree", filter=owned_by_root)


def make_big(dest: Path, mib: int) -> None:
    """``mib`` MiB of a repeated random MiB (not zeros: nothing may skip them)."""
    block = random.Random(17).randbytes(MIB)
    with dest.open("wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def prepare(scratch: Path, image_rootfs: Path, p: Params) -> dict[str, Any]:
    """scratch/volume/{tree.tar,pre/tree,pre/big} and scratch/rootfs (a copy of the image
    rootfs with the same under bench/): distinct files, so that one is never in a cache
    because the other was read."""
    volume = scratch / "volume"
    (volume / "pre").mkdir(parents=True)
    tree_bytes = make_tree(volume / "pre" / "tree", p.files)
    make_tarball(volume / "pre" / "tree", volume / "tree.tar")
    make_big(volume / "pre" / "big", p.mib)
    rootfs = scratch / "rootfs"
    shutil.copytree(image_rootfs, rootfs, symlinks=True)
    bench = rootfs / "bench"
    bench.mkdir()
    shutil.copy2(volume / "tree.tar", bench / "tree.tar")
    shutil.copytree(volume / "pre" / "tree", bench / "pre" / "tree")
    make_big(bench / "pre" / "big", p.mib)
    return {"tree_bytes": tree_bytes, "tarball_bytes": (volume / "tree.tar").stat().st_size}


def clean_work(scratch: Path) -> None:
    """What a sample wrote on the host (the volume's and runc's rootfs work dirs)."""
    for d in (scratch / "volume" / "work", scratch / "rootfs" / "bench" / "work"):
        shutil.rmtree(d, ignore_errors=True)


# -- carapace --------------------------------------------------------------------------------


def config_for(base: Config, fs: str) -> Config:
    """The configuration with ``[hypervisor] shared_fs = fs``."""
    return dataclasses.replace(base, hypervisor=dataclasses.replace(base.hypervisor, shared_fs=fs))


def run_in_pod(
    sb: carapace.Sandbox, location: str, rootfs: Path, p: Params, what: str
) -> dict[str, float]:
    """The script in a new container of the pod (its rootfs: ``rootfs``); its figures."""
    try:
        r = sb.run(script_argv(location, p), rootfs=rootfs)
    except Exception as e:
        raise BenchError(f"{what}: {type(e).__name__}: {e}") from e
    if r.exit_code != 0:
        err = (r.stderr or r.stdout).decode(errors="replace").strip()[-400:]
        raise BenchError(f"{what}: exit status {r.exit_code}: {err}")
    return parse_figures(r.text, what)


def carapace_sample(
    config: Config,
    fs: str,
    sandbox_id: str,
    scratch: Path,
    locations: tuple[str, ...],
    p: Params,
) -> tuple[float, dict[str, dict[str, float] | BenchError]]:
    """One pod: (seconds to ready, per location the figures or why there are none)."""
    sb = carapace.Sandbox(
        config=config,
        sandbox_id=sandbox_id,
        volumes={str(scratch / "volume"): GUEST_VOLUME},
    )
    t0 = time.perf_counter()
    try:
        sb.start()
    except Exception as e:
        raise BenchError(f"pod ready ({LABELS[fs]}): {type(e).__name__}: {e}") from e
    ready = time.perf_counter() - t0
    figures: dict[str, dict[str, float] | BenchError] = {}
    try:
        for loc in locations:
            try:
                figures[loc] = run_in_pod(sb, loc, scratch / "rootfs", p, f"{LABELS[fs]}, {loc}")
            except BenchError as e:
                figures[loc] = e
            finally:
                clean_work(scratch)
    finally:
        try:
            sb.close()
        except Exception as e:
            raise BenchError(f"destroying the pod ({LABELS[fs]}): {type(e).__name__}: {e}") from e
    return ready, figures


# -- runc ----------------------------------------------------------------------------------


class Runc:
    """runc on the host over a bundle of the same rootfs copy, ``/vol`` bound from the
    same host directory."""

    def __init__(self, scratch: Path, prefix: str) -> None:
        self.scratch = scratch
        self.bundle = scratch / "bundle"
        self.prefix = prefix
        self.ids: list[str] = []

    def write_spec(self, args: list[str]) -> None:
        spec = default_spec(args)
        spec["root"] = {"path": str(self.scratch / "rootfs"), "readonly": False}
        spec["mounts"].append(
            {
                "destination": GUEST_VOLUME,
                "type": "bind",
                "source": str(self.scratch / "volume"),
                "options": ["rbind", "rw", "nodev", "nosuid"],
            }
        )
        self.bundle.mkdir(exist_ok=True)
        (self.bundle / "config.json").write_text(json.dumps(spec, indent=1) + "\n")

    def sample(self, location: str, p: Params) -> dict[str, float]:
        what = f"runc, {location}"
        cid = f"{self.prefix}-runc-{len(self.ids)}"
        self.ids.append(cid)
        self.write_spec(script_argv(location, p))
        try:
            r = subprocess.run(
                ["runc", "run", "--bundle", str(self.bundle), cid],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CONTAINER_TIMEOUT + 60,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{what}: no exit within {CONTAINER_TIMEOUT + 60}s") from e
        finally:
            subprocess.run(["runc", "delete", "-f", cid], capture_output=True, timeout=60)
            clean_work(self.scratch)
        if r.returncode != 0:
            raise BenchError(
                f"{what}: exit status {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}"
            )
        return parse_figures(r.stdout, what)


# -- leftovers -------------------------------------------------------------------------------


def _cmdlines() -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if cmd:
                    out.append((int(d.name), cmd))
    return out


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def leftovers(config: Config, prefix: str, scratch: Path, runc_ids: list[str]) -> list[str]:
    """Whatever this run made that still exists."""
    run_root = Path(config.runtime.run_dir)
    found = [
        f"{'QEMU' if 'qemu-system' in cmd else 'virtiofsd'} pid {pid}"
        for pid, cmd in _cmdlines()
        if ("qemu-system" in cmd or "virtiofsd" in cmd) and (prefix in cmd or str(scratch) in cmd)
    ]
    if run_root.is_dir():
        found += [str(d) for d in run_root.iterdir() if d.name.startswith(prefix)]
    found += [f"mount {m}" for m in _mount_points() if prefix in m or str(scratch) in m]
    found += [str(RUNC_STATE_DIR / c) for c in runc_ids if (RUNC_STATE_DIR / c).exists()]
    if boot.CGROUP_ROOT.is_dir():
        for hier in boot.CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                found += [str(hier / c) for c in runc_ids if (hier / c).exists()]
    if scratch.exists():
        found.append(str(scratch))
    return found


# -- report ---------------------------------------------------------------------------------


def ratios(results: dict[str, Measurement]) -> dict[str, dict[str, float | None]]:
    """Per row (location/workload, and pod ready): the three ratios of median times."""
    r = boot._ratio
    out: dict[str, dict[str, float | None]] = {}
    for loc in LOCATIONS:
        for w in WORKLOADS:
            fs, ninep, runc = (results[row_name(loc, w, b)].median for b in BACKENDS)
            out[f"{loc}/{w}"] = {
                "virtio-fs / runc": r(fs, runc),
                "9p / runc": r(ninep, runc),
                "virtio-fs / 9p": r(fs, ninep),
            }
    fs, ninep = (results[row_name("pod", POD_READY, b)].median for b in SHARED_FS)
    out[POD_READY] = {"virtio-fs / runc": None, "9p / runc": None, "virtio-fs / 9p": r(fs, ninep)}
    return out


def fsync_cost(results: dict[str, Measurement], p: Params) -> dict[str, float]:
    """Per shared filesystem: milliseconds per small write on the volume beyond the same
    loop on the rootfs (guest memory, where fsync costs nothing)."""
    out = {}
    for fs in SHARED_FS:
        vol = results[row_name(VOLUME, FSYNC, fs)].median
        mem = results[row_name(ROOTFS, FSYNC, fs)].median
        if vol is not None and mem is not None:
            out[fs] = (vol - mem) / p.writes * 1000
    return out


#: The kinds of work the verdict sums up separately.
KINDS = {
    "metadata (untar, find)": (UNTAR, FIND_NEW, FIND_OLD),
    "bulk data (write, read)": (WRITE, READ_BACK, READ_OLD),
    "small writes + fsync": (FSYNC,),
}


def verdict(
    results: dict[str, Measurement], rat: dict[str, dict[str, float | None]]
) -> dict[str, Any]:
    """virtio-fs against 9p over the rows whose I/O crosses the share, two ways: per row
    (the geometric mean of the ratios: each workload weighs the same) and in total time
    (the sum of the medians: the longest workloads weigh most); and per kind of work.
    Below 1, virtio-fs is faster. ``favours`` is None when the two ways disagree."""
    keys = [(loc, w) for loc in LOCATIONS for w in WORKLOADS if w in THROUGH_SHARE[loc]]
    ratio = {
        (loc, w): v for loc, w in keys if (v := rat[f"{loc}/{w}"]["virtio-fs / 9p"]) is not None
    }
    if len(ratio) != len(keys):
        return {"favours": None, "reason": "not every row through the share was measured"}
    vals = list(ratio.values())
    per_row = statistics.geometric_mean(vals)
    total = {
        fs: sum(results[row_name(loc, w, fs)].median or 0.0 for loc, w in keys) for fs in SHARED_FS
    }
    in_total = total[VIRTIOFS] / total[NINEP]
    by_kind = {
        kind: round(statistics.geometric_mean([v for (_, w), v in ratio.items() if w in ws]), 3)
        for kind, ws in KINDS.items()
        if any(w in ws for _, w in keys)
    }
    winners = {VIRTIOFS if x < 1 else NINEP for x in (per_row, in_total)}
    return {
        "favours": winners.pop() if len(winners) == 1 else None,
        "rows": [f"{loc}/{w}" for loc, w in keys],
        "per row: geomean virtio-fs / 9p": round(per_row, 3),
        "in total: sum virtio-fs / sum 9p": round(in_total, 3),
        "total seconds": {fs: round(t, 3) for fs, t in total.items()},
        "by kind: geomean virtio-fs / 9p": by_kind,
        "rows faster with virtio-fs": sum(v < 1 for v in vals),
        "rows faster with 9p": sum(v > 1 for v in vals),
        "pod ready virtio-fs / 9p": rat[POD_READY]["virtio-fs / 9p"],
    }


def verdict_line(v: dict[str, Any]) -> str:
    if "rows" not in v:
        return f"No verdict: {v['reason']}."
    per_row, in_total = v["per row: geomean virtio-fs / 9p"], v["in total: sum virtio-fs / sum 9p"]
    head = (
        f"**The figures favour {LABELS[v['favours']]}**"
        if v["favours"]
        else "**The figures are split**"
    )

    def side(x: float) -> str:
        return LABELS[VIRTIOFS] if x < 1 else LABELS[NINEP]

    kinds = "; ".join(f"{k} {x:.3g}x" for k, x in v["by kind: geomean virtio-fs / 9p"].items())
    return (
        f"{head} (virtio-fs ÷ 9p over the {len(v['rows'])} rows whose I/O crosses the share): "
        f"per row (geometric mean, each workload once) {per_row:.3g}x, for {side(per_row)} "
        f"({v['rows faster with virtio-fs']} rows faster with virtio-fs, "
        f"{v['rows faster with 9p']} with 9p); in total time {in_total:.3g}x, for "
        f"{side(in_total)}. By kind: {kinds}. Pod ready: "
        f"{_cell(v['pod ready virtio-fs / 9p'], 'x')}."
    )


def _cell(x: float | None, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:.3g}{suffix}" if suffix else f"{x:.3f}"


def markdown(
    machine: dict[str, Any],
    p: Params,
    prep: dict[str, Any],
    results: dict[str, Measurement],
    rat: dict[str, dict[str, float | None]],
    verdict_: dict[str, Any],
    notes: list[str],
) -> str:
    lines = [
        "# carapace storage benchmark",
        "",
        f"{machine['date']} · {machine['nproc']} CPUs ({machine['cpu']}) · host kernel "
        f"{machine['host_kernel']} · {machine['qemu']} · accel **{machine['accel']}** "
        f"({machine['accel_reason']}) · pod VM {machine['vm_vcpus']} vCPU, "
        f"{machine['vm_memory_mib']} MiB · files on {machine['scratch_fs']} · "
        f"{machine['runc']}",
        "",
        f"Medians of {p.runs} runs, rounds interleaved (order rotating), in one invocation "
        f"({p.warmup} untimed warm-up round(s) first). Seconds, timed inside the container "
        f"(busybox sh); tree: {p.files:,} files of 0-8 KiB in directories of 100 "
        f"({prep['tree_bytes'] / MIB:.1f} MiB; tarball {prep['tarball_bytes'] / MIB:.1f} MiB). "
        "Ratios are of times: below 1, the first is faster.",
        "",
        "| workload | where | runc s | virtio-fs s | 9p s | virtio-fs ÷ runc | 9p ÷ runc "
        "| virtio-fs ÷ 9p |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for loc in LOCATIONS:
        for w in WORKLOADS:
            meds = [results[row_name(loc, w, b)].median for b in (RUNC, *SHARED_FS)]
            rr = rat[f"{loc}/{w}"]
            where = loc if w in THROUGH_SHARE[loc] else f"{loc} (guest memory)"
            lines.append(
                f"| {workload_label(w, p)} | {where} | "
                + " | ".join(_cell(m) for m in meds)
                + " | "
                + " | ".join(_cell(v, "x") for v in rr.values())
                + " |"
            )
    ready = [results[row_name("pod", POD_READY, b)].median for b in SHARED_FS]
    lines.append(
        f"| pod ready (Sandbox.start) | | | {_cell(ready[0])} | {_cell(ready[1])} | | | "
        f"{_cell(rat[POD_READY]['virtio-fs / 9p'], 'x')} |"
    )
    lines += ["", verdict_line(verdict_)]
    lines += [
        "",
        "| measurement | median s | min s | max s | runs |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [boot.measurement_row(name, m) for name, m in results.items()]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------


@dataclass
class Bench:
    base: Config
    scratch: Path
    prefix: str
    p: Params
    runc: Runc
    results: dict[str, Measurement] = field(default_factory=dict)

    def fail(self, backend: str, locations: tuple[str, ...], error: str) -> None:
        for loc in locations:
            for w in WORKLOADS:
                m = self.results[row_name(loc, w, backend)]
                m.error = m.error or error

    def record(self, backend: str, loc: str, figures: dict[str, float], record: bool) -> None:
        if record:
            for w, seconds in figures.items():
                self.results[row_name(loc, w, backend)].samples.append(seconds)

    def live(self, backend: str, loc: str) -> bool:
        """Still measured: no sample of this location and backend failed yet."""
        return self.results[row_name(loc, UNTAR, backend)].error is None

    def carapace(self, fs: str, i: int, locations: tuple[str, ...], record: bool) -> None:
        ready_row = self.results[row_name("pod", POD_READY, fs)]
        if ready_row.error is not None:
            return
        live = tuple(loc for loc in locations if self.live(fs, loc))
        try:
            ready, figures = carapace_sample(
                config_for(self.base, fs), fs, f"{self.prefix}-{fs}-{i}", self.scratch, live, self.p
            )
        except BenchError as e:
            ready_row.error = str(e)
            self.fail(fs, LOCATIONS, str(e))
            return
        if record:
            ready_row.samples.append(ready)
        for loc, got in figures.items():
            if isinstance(got, BenchError):
                self.fail(fs, (loc,), str(got))
            else:
                self.record(fs, loc, got, record)

    def runc_round(self, locations: tuple[str, ...], record: bool) -> None:
        for loc in locations:
            if not self.live(RUNC, loc):
                continue
            try:
                self.record(RUNC, loc, self.runc.sample(loc, self.p), record)
            except BenchError as e:
                self.fail(RUNC, (loc,), str(e))


def machine_facts(config: Config, scratch_parent: Path) -> tuple[dict[str, Any], Path]:
    """The machine's facts, and the guest image's rootfs."""
    hv = config.hypervisor
    image, _kernel, _initrd, accel = boot.guest_of(config, "storage.py")
    sizing = AsyncSandbox(config, SandboxOptions())  # what a pod gets; starts nothing
    st = os.statvfs(scratch_parent)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": boot._cpu_model(),
        "memory_total_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20,
        "host_kernel": platform.release(),
        "qemu": boot._first_line([hv.path, "--version"]),
        "virtiofsd": boot._first_line([hv.virtiofsd, "--version"]),
        "default_shared_fs": hv.shared_fs,
        "accel": accel.accel,
        "accel_reason": accel.reason,
        "vm_vcpus": sizing.vcpus,
        "vm_memory_mib": sizing.memory_mib,
        "runc": boot._first_line(["runc", "--version"]),
        "cgroups": boot._cgroup_mode(),
        "scratch_parent": str(scratch_parent),
        "scratch_fs": _fs_of(scratch_parent),
        "scratch_free_gib": round(st.f_bavail * st.f_frsize / (1 << 30), 1),
        "image_rootfs": str(image.rootfs),
        "python": platform.python_version(),
        "config": config.source,
        "qemu_processes_at_start": boot._qemu_count(),
        "loadavg_at_start": round(os.getloadavg()[0], 2),
    }, image.rootfs


def _fs_of(path: Path) -> str:
    """The type and device of the mount holding ``path``: "ext4 (/dev/vda)"."""
    best, found = "", "unknown"
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4]
            sep = fields.index("-")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, found = mnt, f"{fields[sep + 1]} ({fields[sep + 2]})"
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    ap.add_argument("--mib", type=int, default=256, help="MiB written and read (256)")
    ap.add_argument("--files", type=int, default=5000, help="files in the tree (5000)")
    ap.add_argument("--writes", type=int, default=1000, help="4 KiB writes with fsync (1000)")
    ap.add_argument(
        "--quick", action="store_true", help="for trying: 64 MiB, 1,000 files, 1 run, no warm-up"
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the tree, the volume and the rootfs copy go, on disk (/var/tmp)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory for storage.json and storage.md (benchmarks/results)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.files, args.runs, args.warmup = 64, 1000, 1, 0
    if min(args.runs, args.mib, args.files, args.writes) < 1 or args.warmup < 0:
        ap.error("--runs, --mib, --files and --writes must be >= 1, --warmup >= 0")
    if os.geteuid() != 0:
        ap.error("run it as root (pods and runc need it)")
    if shutil.which("runc") is None:
        ap.error("runc is not installed (scripts/install-deps.sh installs it)")
    if not args.dir.is_dir():
        ap.error(f"--dir {args.dir}: not a directory")

    p = Params(args.runs, args.warmup, args.mib, args.files, args.writes)
    base = load_config()
    machine, image_rootfs = machine_facts(base, args.dir)
    prefix = f"bsto-{secrets.token_hex(3)}"
    results = {
        row_name(loc, w, b): Measurement(row_name(loc, w, b))
        for loc in LOCATIONS
        for w in WORKLOADS
        for b in BACKENDS
    }
    for fs in SHARED_FS:
        results[row_name("pod", POD_READY, fs)] = Measurement(row_name("pod", POD_READY, fs))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="carapace-bench-storage-", dir=args.dir))
    runc = Runc(scratch, prefix)
    bench = Bench(base, scratch, prefix, p, runc, results)
    interrupted = False
    started = time.monotonic()
    prep: dict[str, Any] = {}
    try:
        print(f"preparing the tree, tarball and files in {scratch} ...", file=sys.stderr)
        t0 = time.perf_counter()
        prep = prepare(scratch, image_rootfs, p)
        prep["seconds"] = round(time.perf_counter() - t0, 1)
        for i in range(p.warmup + p.runs):
            record = i >= p.warmup
            tag = f"run {i - p.warmup + 1}/{p.runs}" if record else "warm-up"
            order = BACKENDS[i % 3 :] + BACKENDS[: i % 3]
            locations = LOCATIONS if i % 2 == 0 else LOCATIONS[::-1]
            print(
                f"[{tag}] {', '.join(LABELS[b] for b in order)}; {', '.join(locations)} ...",
                file=sys.stderr,
                flush=True,
            )
            for backend in order:
                if backend == RUNC:
                    bench.runc_round(locations, record)
                else:
                    bench.carapace(backend, i, locations, record)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up ...", file=sys.stderr, flush=True)
    finally:
        for m in _mount_points():
            if str(scratch) in m:
                print(f"not removing {scratch}: {m} is mounted in it", file=sys.stderr)
                break
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    left = leftovers(base, prefix, scratch, runc.ids)
    if interrupted:
        if left:
            print(f"LEFT BEHIND: {', '.join(left)}", file=sys.stderr)
        return 130

    machine["qemu_processes_at_end"] = boot._qemu_count()
    machine["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    machine["wall_seconds"] = round(time.monotonic() - started, 1)
    notes = [
        "On the rootfs, a carapace container writes to an in-guest overlay whose upper "
        "layer is in guest memory: the rows marked (guest memory) measure that (and the "
        "emulated CPU), whichever the shared filesystem, while runc writes to the "
        f"host's {machine['scratch_fs']}. The rootfs rows 'already there' and the untar "
        "(its tarball is in the image) read the image rootfs through the shared filesystem.",
        "Files 'already there' were made on the host (its page cache holds them) and are "
        "read once per pod: cold in the guest. The untarred tree and the file read back "
        "were just written by the same container: the guest's caches may hold them.",
        f"Each small write is a {BLOCK}-byte printf to an open file, then busybox `sync "
        "FILE` (fsync, a fork without exec); on the rootfs (guest memory) the fsync is "
        "free, so that row is the loop's own cost in the guest.",
        "With virtio-fs the guest's RAM is a shared memfd (vhost-user needs it), with 9p "
        "plain anonymous memory: the rows in guest memory show what that difference costs "
        "apart from the share itself.",
    ]
    extra = fsync_cost(results, p)
    if extra:
        notes.append(
            "Per small write on the volume, beyond the loop's own cost in the guest (volume "
            "row minus rootfs row): "
            + ", ".join(f"{LABELS[fs]} {ms:.2f} ms" for fs, ms in extra.items())
            + "."
        )
    if machine["qemu_processes_at_start"]:
        notes.append(
            f"{machine['qemu_processes_at_start']} other QEMU process(es) were running when "
            "the benchmark started: the figures may be disturbed."
        )
    if left:
        notes.append("LEFT BEHIND: " + ", ".join(left))
    rat = ratios(results)
    verdict_ = verdict(results, rat)
    report = {
        "machine": machine,
        "parameters": dataclasses.asdict(p),
        "data": prep,
        "workloads": {w: workload_label(w, p) for w in WORKLOADS},
        "results": {name: {"unit": "s", **m.summary()} for name, m in results.items()},
        "ratios": rat,
        "throughput_mib_s": {
            name: round(p.mib / m.median, 1)
            for name, m in results.items()
            if name.split("/")[1] in (WRITE, READ_BACK, READ_OLD) and m.median
        },
        "verdict": verdict_,
        "notes": notes,
    }
    md = markdown(machine, p, prep, results, rat, verdict_, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "storage.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'storage.json'} and {args.out / 'storage.md'}", file=sys.stderr)
    failed = any(m.error is not None for m in results.values())
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
