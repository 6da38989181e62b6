"""openEuler's resource examples (seed 003) through containerd and the carapace shim:
``docker run --annotation ...`` becomes ``ctr run --annotation ...``, with dockershim's
pod annotations (io.kubernetes.docker.type, io.kubernetes.sandbox.id) as in the seed."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from carapace import resources as r

from ..conftest import RUN_ROOT, host_cgroups
from .conftest import CtrFn
from .rig import BUSYBOX_IMAGE, CARAPACE

POD = "io.kubernetes.docker.type=podsandbox"


def cid(kind: str) -> str:
    return f"res-{kind}-{uuid.uuid4().hex[:8]}"


def test_seed_sandbox_cpu_and_mem_through_ctr(ctr: CtrFn) -> None:
    """docker run --annotation ...sandbox_cpu=2 --annotation ...sandbox_mem=2G → the
    container sees 2 CPUs and about 2G."""
    c = cid("size")
    out = ctr(
        "run", "--rm", "--runtime", CARAPACE,
        "--annotation", POD,
        "--annotation", f"{r.SANDBOX_CPU}=2",
        "--annotation", f"{r.SANDBOX_MEM}=2G",
        BUSYBOX_IMAGE, c, "sh", "-c", "nproc; grep MemTotal /proc/meminfo",
    ).stdout.split()  # fmt: skip
    assert out[0] == "2"
    assert 0.9 * 2 * 1024 * 1024 < int(out[2]) <= 2 * 1024 * 1024


def refused(ctr: CtrFn, c: str, *options: str) -> str:
    r_ = ctr("run", "--rm", "--runtime", CARAPACE, *options, BUSYBOX_IMAGE, c, "true", check=False)
    assert r_.returncode != 0, r_.stdout
    assert not (RUN_ROOT / c).exists()
    assert not any(c in g for g in host_cgroups())
    ctr("containers", "rm", c, check=False)  # ctr run leaves the container record
    return r_.stderr


def test_seed_net_host_refused_through_ctr(ctr: CtrFn) -> None:
    c = cid("nethost")
    err = refused(ctr, c, "--net-host")
    assert "host's network namespace (--net host)" in err


def test_seed_sandbox_mem_below_1g_refused_through_ctr(ctr: CtrFn) -> None:
    c = cid("small")
    err = refused(ctr, c, "--annotation", f"{r.SANDBOX_MEM}=512m")
    assert r.SANDBOX_MEM in err and "'512m'" in err and "1G to 256G" in err


def test_seed_hotplug_example_through_ctr(ctr: CtrFn, tmp_path: Path) -> None:
    """The seed's hotplug walk-through with enable_cpu_memory_hotplug = true: a pause
    container (1 vCPU, 1G), a container of the same pod with --cpus N -m 4G (N = 4, or
    this host's CPUs if fewer) → N CPUs and 4G; the container deleted → 1 CPU, 4G."""
    config = tmp_path / "configuration.toml"
    config.write_text("[hypervisor]\nenable_cpu_memory_hotplug = true\ndefault_maxmemory = 8192\n")
    n = min(4, len(os.sched_getaffinity(0)))
    pause, big = cid("pause"), cid("big")
    runtime = ("--runtime", CARAPACE, "--runtime-config-path", str(config))
    ctr("run", "-d", *runtime, "--annotation", POD, BUSYBOX_IMAGE, pause, "sleep", "999999")
    probe = ("sh", "-c", "nproc; grep MemTotal /proc/meminfo")

    def seen() -> tuple[str, int]:
        out = ctr("task", "exec", "--exec-id", uuid.uuid4().hex[:8], pause, *probe).stdout
        words = out.split()
        return words[0], int(words[2])

    try:
        nproc, mem0 = seen()
        assert nproc == "1"
        ctr(
            "run", "-d", *runtime,
            "--annotation", "io.kubernetes.docker.type=container",
            "--annotation", f"io.kubernetes.sandbox.id={pause}",
            "--cpus", str(n), "--memory-limit", str(4 << 30),
            BUSYBOX_IMAGE, big, "sleep", "999999",
        )  # fmt: skip
        try:
            nproc, mem = seen()
            assert nproc == str(n)
            assert mem - mem0 == 3 * 1024 * 1024  # 3G hot-added: 4G, not 5G
        finally:
            ctr("task", "delete", "--force", big)
            ctr("containers", "rm", big)
        nproc, mem_after = seen()
        assert nproc == "1"
        assert mem_after == mem  # memory is only hot-added
    finally:
        ctr("task", "delete", "--force", pause, check=False)
        ctr("containers", "rm", pause, check=False)


def test_a_path_to_the_hosts_network_namespace_refused_through_ctr(ctr: CtrFn) -> None:
    c = cid("withns")
    err = refused(ctr, c, "--with-ns", f"network:/proc/{os.getpid()}/ns/net")
    assert "host's network namespace (--net host)" in err
