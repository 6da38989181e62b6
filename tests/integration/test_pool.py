"""A pool of pre-booted VMs with real VMs (``carapace factory pool``, ``[factory]
vm_cache_number``): pods take VMs the pool booted ahead, each its own (boot_id, random
stream, MAC, clock), with their network and volumes hot-added, in the pod's host
cgroup; the pool boots a replacement; a pod of another shape, or with no pool
serving, boots its own VM; stopping the pool ends the VMs it held and leaves the pods'
VMs running; nothing is left once all is gone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import carapace
from carapace.config import Config, load_config
from carapace.errors import CarapaceError
from carapace.factory import pool

from .procs import processes
from .test_template import PODS, netns, probe  # noqa: F401 - netns is a fixture

SIZE = 2
CARAPACE = str(Path(sys.executable).parent / "carapace")
READY_TIMEOUT = 240.0


def pool_vms() -> list[int]:
    """QEMU processes running a pool's VM (their -name is ``carapace-pool:…``)."""
    return [
        pid
        for pid, argv in processes()
        if b"-name" in argv and any(a.startswith(b"carapace-pool:") for a in argv)
    ]


def cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


class Pool:
    """``carapace factory pool`` as a process of the test's."""

    def __init__(self, config_file: Path, endpoint: Path, log: Path) -> None:
        self.endpoint = endpoint
        self.log = log
        self.proc = subprocess.Popen(
            [CARAPACE, "--config", str(config_file), "factory", "pool"],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def status(self) -> dict[str, object]:
        return pool.status(self.endpoint)

    def wait_ready(self, n: int) -> dict[str, object]:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert self.proc.poll() is None, f"the pool exited: {self.log.read_text()[-2000:]}"
            try:
                st = self.status()
                if st.get("ready") == n:
                    return st
            except CarapaceError:
                pass  # not serving yet
            assert time.monotonic() < deadline, f"pool not ready: {self.log.read_text()[-2000:]}"
            time.sleep(0.5)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def pool_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """The default configuration with a pool of SIZE on a test endpoint; its file."""
    d = tmp_path_factory.mktemp("pool")
    endpoint = d / "vmcache.sock"
    text = f'[factory]\nvm_cache_number = {SIZE}\nvm_cache_endpoint = "{endpoint}"\n'
    (d / "configuration.toml").write_text(text)
    return load_config(d / "configuration.toml"), d / "configuration.toml"


@pytest.fixture
def vm_pool(pool_config: tuple[Config, Path], tmp_path: Path) -> Iterator[Pool]:
    """A pool of the test's own (the check after each test wants no VM left)."""
    cfg, path = pool_config
    p = Pool(path, Path(cfg.factory.vm_cache_endpoint), tmp_path / "pool.log")
    try:
        p.wait_ready(SIZE)
        yield p
    finally:
        p.stop()


def test_pods_take_pre_booted_vms_each_their_own(
    vm_pool: Pool,
    pool_config: tuple[Config, Path],
    netns: dict[str, str],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    config = pool_config[0]
    before = set(pool_vms())
    assert len(before) == SIZE
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "hello").write_text("from the host\n")
    with carapace.Sandbox(
        config=config, memory="1G", net=f"netns:{netns['a']}", volumes={str(vol): "/data"}
    ) as a:
        assert a.pooled, "the first pod did not take a pool VM"
        assert a.qemu_pid in before
        with carapace.Sandbox(
            config=config, memory="1G", net=f"netns:{netns['b']}", volumes={str(vol): "/data"}
        ) as b:
            assert b.pooled and b.qemu_pid in before and b.qemu_pid != a.qemu_pid
            pa, before_a, after_a = probe(a)
            pb, before_b, after_b = probe(b)
            for what in ("boot_id", "random", "mac"):
                assert pa[what] != pb[what], f"both pods have the same {what}: {pa[what]}"
            for seen, t0, t1 in ((pa, before_a, after_a), (pb, before_b, after_b)):
                assert t0 - 2 < int(seen["clock"]) <= t1 + 1, (seen, t0, t1)
                assert seen["cpus"] == "1"
                assert 900_000 < int(seen["mem_kib"]) <= 1024 * 1024, seen
            for sb, name in ((a, "a"), (b, "b")):
                # the VM is in the pod's host cgroup now, not the pool's
                assert cgroup_of(sb.qemu_pid, "cpu") != cgroup_of(vm_pool.proc.pid, "cpu")
                assert sb.id in cgroup_of(sb.qemu_pid, "cpu")
                ping = sb.run(["ping", "-c", "1", "-W", "5", PODS[name][0]])
                assert ping.exit_code == 0, ping.text
                assert sb.run(["cat", "/data/hello"]).text == "from the host\n"
                wrote = sb.run(["sh", "-c", f"echo from {name} > /data/from-{name}"])
                assert wrote.exit_code == 0, wrote.text
                assert (vol / f"from-{name}").read_text() == f"from {name}\n"
            # the pool boots replacements while the pods run
            st = vm_pool.wait_ready(SIZE)
            assert st["taken"] == 2, st
            qemu_a, qemu_b = a.qemu_pid, b.qemu_pid
    for pid in (qemu_a, qemu_b):  # the pods' VMs ended with them (the pool reaped them)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists(), f"pod VM {pid} still there"


def test_a_pod_of_another_shape_boots_its_own(
    vm_pool: Pool, pool_config: tuple[Config, Path]
) -> None:
    config = pool_config[0]
    vm_pool.wait_ready(SIZE)
    with carapace.Sandbox(config=config, cpus=2, memory="1G") as sb:
        assert not sb.pooled
        assert sb.run(["nproc"]).text.strip() == "2"
    assert vm_pool.status()["ready"] == SIZE  # nothing taken


def test_stopping_the_pool_ends_its_vms_and_leaves_the_pods(
    vm_pool: Pool, pool_config: tuple[Config, Path]
) -> None:
    cfg = pool_config[0]
    vm_pool.wait_ready(SIZE)
    with carapace.Sandbox(config=cfg, memory="1G") as sb:
        assert sb.pooled
        vm_pool.wait_ready(SIZE)  # the replacement: the pool holds SIZE idle VMs again
        assert len(pool_vms()) == SIZE + 1
        assert vm_pool.stop() == 0
        assert pool_vms() == [sb.qemu_pid]  # the pool's own VMs ended, the pod's runs
        assert not Path(cfg.factory.vm_cache_endpoint).exists()
        assert not (Path(cfg.runtime.run_dir) / ".pool").exists()
        assert sb.run(["echo", "still here"]).text == "still here\n"
        # no pool serving: a pod boots its own VM
        with carapace.Sandbox(config=cfg, memory="1G") as cold:
            assert not cold.pooled
            assert cold.run(["true"]).exit_code == 0
    assert pool_vms() == []
    out = vm_pool.log.read_text()
    assert "handed over" in out, out[-2000:]
