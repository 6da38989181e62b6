"""The sandbox plan (carapace.sandbox.plan): decided once, from configuration, options
and host facts, without touching the host."""

from __future__ import annotations

import pytest

from carapace.config import Config
from carapace.errors import InvalidArgument
from carapace.hostcgroup import BlkioItem, ResolvedBlkioItem
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.protocols import contract
from carapace.resources import ContainerResources
from carapace.sandbox import HostFacts, SandboxOptions
from carapace.sandbox.plan import plan_sandbox

GiB = 1 << 30
HOST = HostFacts(
    usable_cpus=4, memory_total=8 * GiB + 5 * (1 << 20), file_max=4_000_000, nofile_cap=20000
)


def spec_with(annotations: dict[str, str] | None = None, **linux: object) -> Spec:
    data = default_spec(["true"])
    data["annotations"] = annotations or {}
    data["linux"].update(linux)
    return Spec.from_dict(data)


def test_defaults() -> None:
    plan = plan_sandbox(Config(), SandboxOptions(sandbox_id="p"), HOST)
    assert (plan.vcpus, plan.memory_mib, plan.max_vcpus, plan.max_memory_mib) == (1, 1024, 1, 1024)
    assert plan.cgroup_path == "carapace/p" and plan.pod_cgroup_path is None
    assert plan.files_limit is None and plan.blkio == () and not plan.hotplug
    assert str(plan.run_dir) == "/run/carapace/p"


def test_hotplug_headroom_is_whole_memory_blocks_of_the_host() -> None:
    cfg = Config()
    cfg.hypervisor.enable_cpu_memory_hotplug = True
    plan = plan_sandbox(cfg, SandboxOptions(sandbox_id="p"), HOST)
    # 8G + 5M of host memory: the headroom is whole 128M blocks above the boot 1G
    assert (plan.max_vcpus, plan.max_memory_mib) == (4, 8192)
    cfg.hypervisor.default_maxmemory = 2000
    plan = plan_sandbox(cfg, SandboxOptions(sandbox_id="p"), HOST)
    assert plan.max_memory_mib == 1024 + 896


def test_the_sandbox_spec_carries_the_pods_annotations_and_files_limit() -> None:
    spec = spec_with(
        {contract.SANDBOX_CPU: "2", contract.FILES_LIMIT: "5000"},
        cgroupsPath="/kubepods/pod1/abc",
    )
    opts = SandboxOptions(sandbox_id="p", sandbox_spec=spec, annotations={"ignored": "x"})
    plan = plan_sandbox(Config(), opts, HOST)
    assert plan.vcpus == 2 and plan.files_limit == 5000 and "ignored" not in plan.annotations
    assert plan.cgroup_path == "kubepods/pod1/carapace-sandbox-p"
    # the caller's --files-limit is taken over the annotation
    opts.files_limit = 0
    assert plan_sandbox(Config(), opts, HOST).files_limit == 4_000_000 // 400


def test_the_sandbox_containers_own_resources_are_checked() -> None:
    spec = spec_with(resources={"cpu": {"cpus": "3"}})
    with pytest.raises(InvalidArgument, match="cpuset"):
        plan_sandbox(Config(), SandboxOptions(sandbox_id="p", sandbox_spec=spec), HOST)
    spec = spec_with(resources={"memory": {"limit": 512 << 20}})
    plan = plan_sandbox(Config(), SandboxOptions(sandbox_id="p", sandbox_spec=spec), HOST)
    assert plan.sandbox_resources == ContainerResources(memory=512 << 20)


def test_blkio_is_resolved_once_by_the_given_resolver() -> None:
    seen: list[list[BlkioItem]] = []

    def resolve(items: list[BlkioItem]) -> list[ResolvedBlkioItem]:
        seen.append(items)
        return []

    ann = {
        contract.BLKIO_CGROUP: (
            '{"blkiocgroup":[{"path":"/dev/sda","limits":[{"type":"throttle_read_bps",'
            '"value":1048576}]}]}'
        )
    }
    plan_sandbox(Config(), SandboxOptions(sandbox_id="p", annotations=ann), HOST, resolve)
    assert len(seen) == 1 and len(seen[0]) == 1


def test_check_fit_with_hotplug() -> None:
    cfg = Config()
    cfg.hypervisor.enable_cpu_memory_hotplug = True
    plan = plan_sandbox(cfg, SandboxOptions(sandbox_id="p"), HOST)
    big = ContainerResources(cpus=3, memory=3 * GiB)
    assert plan.check_fit("c", big, [], (1, 1024)) == (3, 3072)
    with pytest.raises(InvalidArgument, match="need 5 vCPUs"):
        plan.check_fit("c", ContainerResources(cpus=2), [big], (3, 3072))
    plain = plan_sandbox(Config(), SandboxOptions(sandbox_id="p"), HOST)
    with pytest.raises(InvalidArgument, match="c"):
        plain.check_fit("c", big, [], (1, 1024))


def test_the_hosts_own_network_namespace_is_refused() -> None:
    host = HostFacts(4, 8 * GiB, 4_000_000, 20000, lambda kind, path: path == "/proc/1/ns/net")
    with pytest.raises(InvalidArgument, match=r"host's own \(--net host\)"):
        plan_sandbox(Config(), SandboxOptions(sandbox_id="p", net="netns:/proc/1/ns/net"), host)
    plan = plan_sandbox(Config(), SandboxOptions(sandbox_id="p", net="netns:/run/netns/a"), host)
    assert (plan.network.mode, plan.network.netns) == ("netns", "/run/netns/a")
