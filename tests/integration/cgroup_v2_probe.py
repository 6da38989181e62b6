"""Run inside a container of a carapace guest (test_cgroup_v2_guest.py starts it): the
host cgroup code (carapace.hostcgroup, SandboxCgroupPlacement, state.release) on a real
cgroup v2 kernel. The container is in the guest's root cgroup namespace with cgroup2
mounted read-write at /sys/fs/cgroup, so this process is the "host" of the code under
test: it plays the owner (a shim that joins the sandbox cgroup) and starts a
multi-threaded stand-in for QEMU.

It does what a sandbox's life does to its host cgroups, in order, and prints one JSON
object of what the kernel showed at each step (the test asserts on it); an unexpected
exception is reported as ``error`` after everything is cleaned up. Stdlib and carapace
only (the container has a bare Python).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from typing import Any

from carapace.config import Config
from carapace.errors import CarapaceError
from carapace.hostcgroup import CgroupHandle, detect, driver
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.protocols.contract import VCPU_CGROUP
from carapace.sandbox.placement import SandboxCgroupPlacement
from carapace.sandbox.plan import HostFacts, SandboxOptions, SandboxPlan, plan_sandbox
from carapace.sandbox.state import SandboxRecord, release

ROOT = "/sys/fs/cgroup"
#: The pod cgroup a CRI engine would have made (cgroupfs driver), below the guest root.
POD_PARENT = "kubepods/burstable"
#: The stand-in's vCPU threads: 0 and 1 spin (running vCPUs), 2 sleeps (a vCPU that is
#: plugged later); one more thread sleeps as QEMU's I/O thread.
STANDIN = r"""
import json, sys, threading, time

def spin():
    while True:
        pass

def idle():
    time.sleep(3600)

vcpus = [threading.Thread(target=spin if i < 2 else idle, daemon=True) for i in range(3)]
io = threading.Thread(target=idle, daemon=True)
for t in [*vcpus, io]:
    t.start()
print(json.dumps({"vcpus": [t.native_id for t in vcpus], "io": io.native_id}), flush=True)
sys.stdin.read()
"""
#: A sandbox's life in a loop (create with the runtime's own parent, remove), run by
#: several processes at once: the last one out removes the shared parent while the
#: others create below it.
RACER = r"""
import json, sys, time
from carapace.errors import CarapaceError
from carapace.hostcgroup import CgroupFs, driver
from carapace.hostcgroup.fs import CgroupGone

class Counting(CgroupFs):
    # counts what another owner's removal did to this one's calls
    gone = 0

    def _count(self, call, *args):
        try:
            return call(*args)
        except CgroupGone:
            Counting.gone += 1
            raise

    def mkdir(self, path):
        return self._count(super().mkdir, path)

    def read(self, path):
        return self._count(super().read, path)

    def write(self, path, value):
        return self._count(super().write, path, value)

name, seconds = sys.argv[1], float(sys.argv[2])
drv = driver(fs=Counting())
rounds, errors = 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    rounds += 1
    try:
        drv.create(f"carapace-race/{name}", ["cpu", "memory", "pids"], own_parents=1).remove()
    except CarapaceError as e:
        errors.append(str(e))
print(json.dumps({"rounds": rounds, "failed": len(errors), "errors": sorted(set(errors))[:10],
                  "parent_gone": Counting.gone}))
"""
RACERS = 3
RACE_S = 3.0
#: How long the vCPU threads spin under the CPU cap before their cpu.stat is read again.
THROTTLE_WINDOW_S = 2.0

HOST = HostFacts(usable_cpus=4, memory_total=8 << 30, file_max=1 << 20, nofile_cap=1 << 20)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def cgroup_dirs() -> list[str]:
    """Every cgroup of the guest's hierarchy, relative to its root."""
    out = []
    for top, dirs, _ in os.walk(ROOT):
        out += [os.path.relpath(os.path.join(top, d), ROOT) for d in dirs]
    return sorted(out)


def cgroup_of(pid: int, tid: int | None = None) -> str:
    """The v2 cgroup (the ``0::`` line) of a process or one of its threads."""
    path = f"/proc/{pid}/task/{tid}/cgroup" if tid else f"/proc/{pid}/cgroup"
    for line in read(path).splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def flat_keyed(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def ids(path: str) -> list[int]:
    return sorted(int(x) for x in read(path).split())


def make_plan(sandbox_id: str, cgroup_only: bool = True) -> SandboxPlan:
    """A real plan: a 0.5-CPU pod (one vCPU, capped) whose sandbox container's
    cgroupsPath puts it below a kubelet-style pod cgroup; the owner joins."""
    spec = default_spec(["pause"])
    spec["linux"]["cgroupsPath"] = f"/{POD_PARENT}/pod{uuid.uuid4()}/{sandbox_id}"
    config = Config()
    config.runtime.sandbox_cgroup_only = cgroup_only
    options = SandboxOptions(
        cpus=0.5,
        memory="1G",
        sandbox_id=sandbox_id,
        sandbox_spec=Spec.from_dict(spec),
        join_owner=True,
    )
    return plan_sandbox(config, options, HOST)


def legacy_mode(report: dict[str, Any], run_root: str) -> None:
    """sandbox_cgroup_only = false needs v1: refused before anything is made."""
    plan = make_plan("probe-legacy", cgroup_only=False)
    record = SandboxRecord(id=plan.id, run_dir=os.path.join(run_root, plan.id))
    before = cgroup_dirs()
    try:
        SandboxCgroupPlacement(plan, record, "carapace_").make()
        report["legacy_error"] = None
    except CarapaceError as e:
        report["legacy_error"] = str(e)
    report["legacy_made"] = sorted(set(cgroup_dirs()) - set(before))


class Pod:
    """One sandbox's host cgroups as the Sandbox makes them: plan, record (in its run
    dir below ``run_root``), placement, and the stand-in VM once started."""

    def __init__(self, run_root: str) -> None:
        self.run_root = run_root
        self.plan = make_plan(f"probe-{uuid.uuid4().hex[:8]}")
        self.run_dir = os.path.join(run_root, self.plan.id)
        os.makedirs(self.run_dir)
        self.record = SandboxRecord(id=self.plan.id, run_dir=self.run_dir)
        self.record.save()
        self.placement = SandboxCgroupPlacement(self.plan, self.record, "carapace_")
        self.vm: subprocess.Popen[str] | None = None

    def start_vm(self) -> dict[str, Any]:
        """The stand-in joins the sandbox cgroup before exec (as QEMU does) and is
        reaped by this process, its owner; returns its thread ids."""
        self.vm = subprocess.Popen(
            [sys.executable, "-S", "-c", STANDIN, "-name", f"carapace-{self.plan.id},x=y"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=self.placement.join_vm(),
        )
        assert self.vm.stdout is not None
        threads: dict[str, Any] = json.loads(self.vm.stdout.readline())
        threading.Thread(target=self.vm.wait, daemon=True).start()
        self.record.qemu_pid = self.vm.pid
        self.record.save()
        return threads

    def end(self) -> dict[str, Any]:
        """The owner leaves; release kills the VM (its -name is this sandbox's) and
        removes every cgroup the record lists."""
        self.placement.leave()
        out: dict[str, Any] = {"owner_after_leave": cgroup_of(os.getpid())}
        out["release_problems"] = release(self.record, self.run_root)
        if self.vm is not None:
            try:
                out["vm_exit"] = self.vm.wait(10)
            except subprocess.TimeoutExpired:
                self.vm.kill()
                out["vm_exit"] = "still running 10 s after release"
        out["record_after"] = {"cgroup": self.record.cgroup, "more": self.record.more_cgroups}
        out["run_dir_left"] = os.path.exists(self.run_dir)
        out["left"] = [d for d in cgroup_dirs() if self.plan.id in d]
        return out


def sandbox_life(report: dict[str, Any], run_root: str) -> None:
    pod = Pod(run_root)
    plan, record, placement = pod.plan, pod.record, pod.placement
    report["plan"] = {"cgroup_path": plan.cgroup_path, "cpu_cap": plan.size.cpu_cap}
    report["owner_origin"] = cgroup_of(os.getpid())
    try:
        # -- make: the sandbox cgroup, controllers enabled on the way, the owner joins
        placement.make()
        assert placement.cgroup is not None
        handle = placement.cgroup
        leaf = handle.leaves()[0]
        report["made"] = {
            "leaves": handle.leaves(),
            "created": list(handle.created),
            "record": json.loads(json.dumps(record.cgroup)),
            "type": read(f"{leaf}/cgroup.type").strip(),
            "controllers": read(f"{leaf}/cgroup.controllers").split(),
            "parents_subtree_control": {
                os.path.relpath(os.path.dirname(d), ROOT): read(
                    os.path.join(os.path.dirname(d), "cgroup.subtree_control")
                ).split()
                for d in handle.created
            },
            "owner_cgroup": cgroup_of(os.getpid()),
        }

        # -- the VM joins before exec; its vCPU threads are placed once QMP names them
        threads = pod.start_vm()
        assert pod.vm is not None
        pid = pod.vm.pid
        vcpus: list[int] = threads["vcpus"]
        report["standin"] = {
            "pid": pid,
            "vcpus": vcpus,
            "io": threads["io"],
            "cgroup": cgroup_of(pid),
        }
        placement.place_vcpus({0: vcpus[0], 1: vcpus[1]}, plan.size.cpus)
        child = os.path.join(leaf, VCPU_CGROUP)
        report["placed"] = {
            "leaf_type": read(f"{leaf}/cgroup.type").strip(),
            "child_type": read(f"{child}/cgroup.type").strip(),
            "leaf_subtree_control": read(f"{leaf}/cgroup.subtree_control").split(),
            "child_controllers": read(f"{child}/cgroup.controllers").split(),
            "child_threads": ids(f"{child}/cgroup.threads"),
            "leaf_threads": ids(f"{leaf}/cgroup.threads"),
            "leaf_procs": ids(f"{leaf}/cgroup.procs"),
            "cpu_max": read(f"{child}/cpu.max").strip(),
            "thread_cgroups": {str(t): cgroup_of(pid, t) for t in [*vcpus, threads["io"]]},
            "record_children": json.loads(json.dumps(record.cgroup.get("children", {}))),
            "handle_pids": sorted(handle.pids()),
        }

        # -- the cap holds: the two spinning vCPU threads get half a CPU between them
        stat0, t0 = flat_keyed(read(f"{child}/cpu.stat")), time.monotonic()
        time.sleep(THROTTLE_WINDOW_S)
        stat1, t1 = flat_keyed(read(f"{child}/cpu.stat")), time.monotonic()
        report["throttle"] = {
            "elapsed_s": t1 - t0,
            "usage_usec": stat1["usage_usec"] - stat0["usage_usec"],
            "nr_periods": stat1["nr_periods"] - stat0["nr_periods"],
            "nr_throttled": stat1["nr_throttled"] - stat0["nr_throttled"],
        }

        # -- stats as the host reports them, next to the files they come from
        stats = placement.stats()
        report["stats"] = {
            "cpu_usage_ns": stats.cpu_usage_ns,
            "memory_bytes": stats.memory_bytes,
            "pids": stats.pids,
            "file_usage_usec": flat_keyed(read(f"{leaf}/cpu.stat"))["usage_usec"],
            "file_memory_current": int(read(f"{leaf}/memory.current")),
            "file_pids_current": int(read(f"{leaf}/pids.current")),
        }

        # -- hotplug: a third vCPU, the pod now worth 3 CPUs: placed again, cap lifted
        placement.place_vcpus({0: vcpus[0], 1: vcpus[1], 2: vcpus[2]}, 3.0)
        report["hotplugged"] = {
            "child_threads": ids(f"{child}/cgroup.threads"),
            "cpu_max": read(f"{child}/cpu.max").strip(),
        }
        placement.place_vcpus({0: vcpus[0], 1: vcpus[1], 2: vcpus[2]}, plan.size.cpus)
        report["hotplugged"]["cpu_max_again"] = read(f"{child}/cpu.max").strip()

        # -- a remove while the VM still runs fails, names what holds it, keeps the record
        busy = CgroupHandle.from_record(record.cgroup)
        try:
            busy.remove(timeout=0.3)
            report["busy_remove"] = None
        except CarapaceError as e:
            report["busy_remove"] = str(e)
        report["busy_left"] = {
            "child": os.path.isdir(child),
            "leaf": os.path.isdir(leaf),
            "created": list(busy.created),
        }
    finally:
        report["end"] = pod.end()


def failed_placement(report: dict[str, Any], run_root: str) -> None:
    """QMP named a vCPU thread that has exited by the time it is placed (a vCPU
    unplugged meanwhile): the kernel refuses its id half-way through the placement,
    and release must still remove everything, the vcpus child included."""
    pod = Pod(run_root)
    try:
        pod.placement.make()
        vcpus = pod.start_vm()["vcpus"]
        gone = threading.Thread(target=lambda: None)
        gone.start()
        gone.join()
        try:
            pod.placement.place_vcpus({0: vcpus[0], 1: gone.native_id or 0}, 0.5)
            report["failed_place"] = {"error": None}
        except CarapaceError as e:
            report["failed_place"] = {"error": str(e)}
        report["failed_place"]["record_created"] = list(pod.record.cgroup.get("created", []))
    finally:
        report.setdefault("failed_place", {})["end"] = pod.end()


def race(report: dict[str, Any]) -> None:
    """Concurrent sandboxes sharing the runtime's own parent cgroup never fail."""
    racers = [
        subprocess.Popen(
            [sys.executable, "-S", "-c", RACER, f"sb{i}", str(RACE_S)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(RACERS)
    ]
    report["race"] = [json.loads(r.communicate()[0]) for r in racers]


def main() -> None:
    report: dict[str, Any] = {"version": detect(ROOT), "driver": type(driver(ROOT)).__name__}
    report["before"] = cgroup_dirs()
    work = tempfile.mkdtemp(prefix="probe-")
    try:
        legacy_mode(report, work)
        sandbox_life(report, work)
        failed_placement(report, work)
        race(report)
    except BaseException:
        report["error"] = traceback.format_exc()
    finally:
        report["after"] = cgroup_dirs()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
