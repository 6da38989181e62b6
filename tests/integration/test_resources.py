"""Pod and container resources with real VMs and the host's real cgroups (seed 003):
sandbox size from annotations, fractional CPUs, container cpuset/memory checks, OOM in
the VM, host namespaces refused, blkio limits and the files limit on the host, CPU and
memory hotplug following the pod's containers.

Every rejection also checks nothing was left (the autouse leak check: no QEMU, run dir,
mount or host cgroup)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import carapace
from carapace import resources as r
from carapace.config import Config, load_config
from carapace.errors import InvalidArgument
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.sandbox import Sandbox as AsyncSandbox
from carapace.sandbox import SandboxOptions
from carapace.sizing import GiB, MiB

from .conftest import RUN_ROOT, host_cgroups, qemu_pids

T = TypeVar("T")
CGROUP = Path("/sys/fs/cgroup")


def enabling(*patterns: str) -> Config:
    """The host's configuration with these annotations enabled too (blkio_cgroup,
    files_limit and Kata's are off by default)."""
    cfg = load_config()
    enable = [*cfg.hypervisor.enable_annotations, *patterns]
    cfg.hypervisor = dataclasses.replace(cfg.hypervisor, enable_annotations=enable)
    return cfg


ALL_ANNOTATIONS = ("blkio_cgroup", "files_limit", "default_vcpus", "default_memory")


def call(sb: carapace.Sandbox, coro: Coroutine[Any, Any, T]) -> T:
    return sb._call(coro)


def inner(sb: carapace.Sandbox) -> AsyncSandbox:
    return sb._sandbox


def mem_total_kb(sb: carapace.Sandbox) -> int:
    out = sb.run(["grep", "MemTotal", "/proc/meminfo"])
    return int(out.text.split()[1])


def sandbox_cgroup(sb: carapace.Sandbox, controller: str) -> Path:
    return CGROUP / controller / "carapace" / sb.id


def thread_cgroup(pid: int, tid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    raise AssertionError(f"{controller} not in /proc/{pid}/task/{tid}/cgroup")


def nothing_of(sandbox_id: str) -> None:
    assert not (RUN_ROOT / sandbox_id).exists()
    assert not any(sandbox_id in c for c in host_cgroups())


# -- "sandbox_cpu=4 ... CPU(s): 4", "sandbox_mem=4G ... free -m" -------------------------


def test_seed_sandbox_cpu_and_mem_annotations_size_the_vm() -> None:
    ann = {r.SANDBOX_CPU: "2", r.SANDBOX_MEM: "2G"}
    with carapace.Sandbox(annotations=ann) as sb:
        out = sb.run(["sh", "-c", "nproc; cat /sys/devices/system/cpu/online"]).text.split()
        assert out == ["2", "0-1"]
        # MemTotal is what the kernel has left of the 2 GiB it booted with
        assert 0.9 * 2 * GiB / 1024 < mem_total_kb(sb) <= 2 * GiB / 1024
        cmdline = Path(f"/proc/{sb.qemu_pid}/cmdline").read_bytes().split(b"\0")
        assert b"2048M" in cmdline and b"2" in cmdline


def test_seed_default_vm_is_one_vcpu_and_1g(shared_sandbox: carapace.Sandbox) -> None:
    assert shared_sandbox.run(["nproc"]).text == "1\n"
    assert 0.8 * GiB / 1024 < mem_total_kb(shared_sandbox) <= GiB / 1024


def test_seed_half_a_cpu_boots_one_vcpu_capped_on_the_host() -> None:
    """ "The minimum number of CPUs is 0.5": one vCPU whose host thread gets half a CPU."""
    with carapace.Sandbox(annotations={r.SANDBOX_CPU: "0.5"}) as sb:
        assert sb.run(["nproc"]).text == "1\n"
        vm = inner(sb).vm
        assert vm is not None
        threads = call(sb, vm.vcpu_threads())
        vcpus = sandbox_cgroup(sb, "cpu") / "vcpus"
        assert (vcpus / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (vcpus / "cpu.cfs_period_us").read_text().strip() == "100000"
        for tid in threads.values():
            assert thread_cgroup(sb.qemu_pid, tid, "cpu") == f"/carapace/{sb.id}/vcpus"
        # QEMU's other threads stay in the sandbox cgroup itself
        assert thread_cgroup(sb.qemu_pid, sb.qemu_pid, "cpu") == f"/carapace/{sb.id}"


@pytest.mark.parametrize(
    ("ann", "needle"),
    [
        ({r.SANDBOX_MEM: "512m"}, "1G to 256G"),
        ({r.SANDBOX_CPU: "0.25"}, "0.5 to"),
        ({r.SANDBOX_CPU: "HOST+1"}, "the host's usable CPUs"),
        ({r.KATA_MEMORY: "lots"}, r.KATA_MEMORY),
        (
            {
                r.BLKIO_CGROUP: '{"blkiocgroup":[{"path":"/dev/null","limits":'
                '[{"type":"throttle_read_bps","value":1}]}]}'
            },
            "/dev/null",
        ),
        ({r.FILES_LIMIT: "-1"}, r.FILES_LIMIT),
        ({r.SANDBOX_MEM: "256G"}, "at most"),  # more than this host has
    ],
)
def test_bad_sandbox_annotations_refused_before_anything_exists(
    ann: dict[str, str], needle: str
) -> None:
    if ann.get(r.SANDBOX_CPU) == "HOST+1":
        ann = {r.SANDBOX_CPU: str(len(os.sched_getaffinity(0)) + 1)}
    qemus = qemu_pids()
    with pytest.raises(InvalidArgument) as e:
        carapace.Sandbox(sandbox_id="bad-ann", annotations=ann, config=enabling(*ALL_ANNOTATIONS))
    assert needle in str(e.value)
    assert qemu_pids() == qemus
    nothing_of("bad-ann")


def test_annotations_not_enabled_are_refused_before_anything_exists() -> None:
    qemus = qemu_pids()
    with pytest.raises(InvalidArgument) as e:
        carapace.Sandbox(sandbox_id="bad-ann", annotations={r.FILES_LIMIT: "4096"})
    assert r.FILES_LIMIT in str(e.value) and "enable_annotations" in str(e.value)
    assert qemu_pids() == qemus
    nothing_of("bad-ann")


# -- host namespaces -------------------------------------------------------------------------


def test_seed_host_network_refused_nothing_created() -> None:
    spec = default_spec(["true"])
    spec["linux"]["namespaces"] = [
        ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"
    ]
    with pytest.raises(InvalidArgument, match=r"host's network namespace \(--net host\)"):
        AsyncSandbox(
            load_config(), SandboxOptions(sandbox_id="hostnet", sandbox_spec=Spec.from_dict(spec))
        )
    nothing_of("hostnet")


def test_host_pid_container_refused_in_a_running_pod(shared_sandbox: carapace.Sandbox) -> None:
    sb = inner(shared_sandbox)
    spec = default_spec(["true"])
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "pid"]
    with pytest.raises(InvalidArgument, match=r"host's pid namespace \(--pid host\)"):
        call(
            shared_sandbox, sb.create_container("hostpid", Spec.from_dict(spec), sb.image().rootfs)
        )
    assert "hostpid" not in sb.containers
    assert not (sb.shared_dir / "hostpid").exists()
    assert shared_sandbox.run(["true"]).exit_code == 0  # the pod lives on


# -- container options against the VM ---------------------------------------------------------


def spec_with(
    args: list[str], cpu: dict[str, Any] | None = None, memory: int = 0
) -> dict[str, Any]:
    spec = default_spec(args)
    res: dict[str, Any] = {}
    if cpu:
        res["cpu"] = cpu
    if memory:
        res["memory"] = {"limit": memory}
    spec["linux"]["resources"] = res
    return spec


def run_spec(sb: carapace.Sandbox, spec: dict[str, Any], cid: str) -> tuple[int, bytes]:
    out: list[bytes] = []
    from carapace.sandbox import ProcessIO

    status = call(
        sb,
        inner(sb).run(spec=Spec.from_dict(spec), container_id=cid, io=ProcessIO(stdout=out.append)),
    )
    return status, b"".join(out)


def test_seed_cpuset_beyond_the_vms_vcpus_refused(shared_sandbox: carapace.Sandbox) -> None:
    spec = spec_with(["true"], cpu={"cpus": "0-1"})
    with pytest.raises(InvalidArgument) as e:
        run_spec(shared_sandbox, spec, "cpuset1")
    assert "--cpuset-cpus names CPU 1" in str(e.value) and "has 1 vCPU" in str(e.value)
    assert "cpuset1" not in inner(shared_sandbox).containers
    with pytest.raises(InvalidArgument, match="--cpuset-mems 1 is not supported"):
        run_spec(shared_sandbox, spec_with(["true"], cpu={"mems": "1"}), "mems1")


def test_container_cpu_options_applied_in_the_guest(shared_sandbox: carapace.Sandbox) -> None:
    spec = spec_with(
        ["sh", "-c", "cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpuset.cpus"],
        cpu={"quota": 50000, "period": 100000, "cpus": "0", "shares": 512},
    )
    status, out = run_spec(shared_sandbox, spec, "cpuopts")
    assert status == 0
    assert out.decode().split("\n")[:2] == ["50000 100000", "0"]


def test_seed_memory_above_the_vm_refused_without_hotplug(
    shared_sandbox: carapace.Sandbox,
) -> None:
    with pytest.raises(InvalidArgument) as e:
        run_spec(shared_sandbox, spec_with(["true"], memory=2 * GiB), "big")
    assert "--memory 2G" in str(e.value) and "memory hotplug is off" in str(e.value)


def test_seed_oom_inside_the_vm_kills_only_the_container(
    shared_sandbox: carapace.Sandbox,
) -> None:
    """-m 32M and a process that wants 64M: OOM-killed in the VM (137, an OOM event);
    the VM and its other containers live on."""
    sb = inner(shared_sandbox)
    rootfs = sb.image().rootfs
    call(
        shared_sandbox,
        sb.create_container("bystander", Spec.from_dict(default_spec(["sleep", "60"])), rootfs),
    )
    try:
        call(shared_sandbox, sb.start_container("bystander"))
        hog = spec_with(
            ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=64M count=1"], memory=32 * MiB
        )
        status, _ = run_spec(shared_sandbox, hog, "hog")
        assert status == 137
        assert call(shared_sandbox, _oom(sb)) == "hog"
        assert call(shared_sandbox, sb.processes("bystander"))  # still running
        assert shared_sandbox.run(["echo", "alive"]).text == "alive\n"
    finally:
        call(shared_sandbox, sb.kill("bystander", 9))
        call(shared_sandbox, sb.wait("bystander"))
        call(shared_sandbox, sb.remove_container("bystander"))


async def _oom(sb: AsyncSandbox) -> str:
    import asyncio

    return await asyncio.wait_for(sb.oom_event(), 10)


# -- blkio and files limit on the host ----------------------------------------------------------


def first_disk() -> str:
    for name in ("vda", "sda", "nvme0n1", "xvda"):
        if Path(f"/dev/{name}").exists():
            return f"/dev/{name}"
    pytest.skip("no whole-disk block device on this host")


def test_seed_blkio_cgroup_limits_in_the_host_cgroup() -> None:
    disk = first_disk()
    st = os.stat(disk)
    dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    # the seed's shape with workable values: its 400 bytes/s would also throttle QEMU's
    # own page-ins (QEMU is in the cgroup), and every process waiting on those pages
    limits = [
        {"type": "throttle_read_bps", "value": 400 << 20},
        {"type": "throttle_write_bps", "value": 400 << 20},
        {"type": "throttle_read_iops", "value": 70000},
        {"type": "throttle_write_iops", "value": 69999},
    ]
    value = json.dumps(
        {
            "blkiocgroup": [
                {"path": disk, "limits": limits},
                {"limits": [{"type": "blkio_weight", "value": 78}]},
            ]
        }
    )
    with carapace.Sandbox(annotations={r.BLKIO_CGROUP: value}, config=enabling("blkio")) as sb:
        cg = sandbox_cgroup(sb, "blkio")
        assert str(sb.qemu_pid) in (cg / "cgroup.procs").read_text().split()
        bps = str(400 << 20)
        assert (cg / "blkio.throttle.read_bps_device").read_text().split() == [dev, bps]
        assert (cg / "blkio.throttle.write_bps_device").read_text().split() == [dev, bps]
        assert (cg / "blkio.throttle.read_iops_device").read_text().split() == [dev, "70000"]
        assert (cg / "blkio.throttle.write_iops_device").read_text().split() == [dev, "69999"]
        assert sb.run(["true"]).exit_code == 0


def nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100", 1024),  # "less than the default minimum value 1024 and is not 0"
        ("0", None),  # "file-max / 400"
        ("4096", 4096),
    ],
)
def test_seed_files_limit_on_the_qemu_process(value: str, expected: int | None) -> None:
    if expected is None:
        from carapace import hostinfo

        expected = min(max(hostinfo.file_max() // 400, 1024), hostinfo.nofile_cap())
    with carapace.Sandbox(annotations={r.FILES_LIMIT: value}, config=enabling("files")) as sb:
        assert nofile(sb.qemu_pid) == (expected, expected)


def test_seed_files_limit_unset_is_the_system_default(shared_sandbox: carapace.Sandbox) -> None:
    import resource

    assert nofile(shared_sandbox.qemu_pid) == resource.getrlimit(resource.RLIMIT_NOFILE)


# -- hotplug following the pod's containers: the seed's examples ------------------------------


def hotplug_config() -> Config:
    cfg = load_config()
    cfg.hypervisor = dataclasses.replace(
        cfg.hypervisor, enable_cpu_memory_hotplug=True, default_maxmemory=8192
    )
    return cfg


@pytest.fixture(scope="module")
def pod() -> Iterator[carapace.Sandbox]:
    """A pod with hotplug on: the 1 vCPU / 1G default, a pause container."""
    with carapace.Sandbox(config=hotplug_config()) as sb:
        s = inner(sb)
        call(
            sb,
            s.create_container(
                "pause", Spec.from_dict(default_spec(["sleep", "3600"])), s.image().rootfs
            ),
        )
        call(sb, s.start_container("pause"))
        yield sb
        call(sb, s.kill("pause", 9))
        call(sb, s.wait("pause"))
        call(sb, s.remove_container("pause"))


def probe(sb: carapace.Sandbox) -> tuple[str, str, int]:
    out = sb.run(["sh", "-c", "nproc; cat /sys/devices/system/cpu/online"]).text.split()
    return out[0], out[1], mem_total_kb(sb)


def test_seed_cpu_and_memory_hotplug_follow_the_pods_containers(pod: carapace.Sandbox) -> None:
    """The seed: pause (1 vCPU, 1G) + a container with --cpus 4 -m 4G → 4 CPUs, 4G;
    delete it → 1 CPU, memory stays. This host has 2 CPUs, so --cpus 2 → 2 CPUs."""
    sb = inner(pod)
    host = len(os.sched_getaffinity(0))
    want = min(host, 4)
    nproc, online, mem0 = probe(pod)
    assert (nproc, online) == ("1", "0")
    spec = spec_with(
        ["sleep", "3600"], cpu={"quota": want * 100000, "period": 100000}, memory=4 * GiB
    )
    call(pod, sb.create_container("big", Spec.from_dict(spec), sb.image().rootfs))
    try:
        call(pod, sb.start_container("big"))
        nproc, online, mem = probe(pod)
        assert nproc == str(want) and online == f"0-{want - 1}"
        # 1G + a 4G container → about 4G, not 5G: exactly 3G were hot-added
        assert mem - mem0 == 3 * GiB // 1024
        assert sb.memory_mib == 4096
    finally:
        call(pod, sb.kill("big", 9))
        call(pod, sb.wait("big"))
        call(pod, sb.remove_container("big"))
    nproc, online, mem_after = probe(pod)
    assert (nproc, online) == ("1", "0")
    assert mem_after == mem  # "the memory is still 4 GB"


def test_hotplug_beyond_the_host_refused(pod: carapace.Sandbox) -> None:
    sb = inner(pod)
    too_many = len(os.sched_getaffinity(0)) + 1
    spec = spec_with(["true"], cpu={"quota": too_many * 100000, "period": 100000})
    with pytest.raises(InvalidArgument, match=f"need {too_many} vCPUs"):
        call(pod, sb.create_container("toomany", Spec.from_dict(spec), sb.image().rootfs))
    assert "toomany" not in sb.containers
    assert probe(pod)[0] == "1"


def test_update_grows_the_pod(pod: carapace.Sandbox) -> None:
    """Update (CRI's UpdateContainerResources, the shim's Update) resizes through the
    same policy: a container raised to 2 CPUs brings a second vCPU; lowered, it goes."""
    sb = inner(pod)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 host CPUs")
    call(
        pod,
        sb.create_container(
            "upd", Spec.from_dict(default_spec(["sleep", "3600"])), sb.image().rootfs
        ),
    )
    try:
        call(pod, sb.start_container("upd"))
        call(pod, sb.update("upd", {"cpu": {"quota": 200000, "period": 100000}}))
        assert probe(pod)[0] == "2"
        call(pod, sb.update("upd", {"cpu": {"quota": 50000, "period": 100000}}))
        assert probe(pod)[0] == "1"
    finally:
        call(pod, sb.kill("upd", 9))
        call(pod, sb.wait("upd"))
        call(pod, sb.remove_container("upd"))
