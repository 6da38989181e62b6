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
from carapace.sandbox.plan import check_id, plan_sandbox

GiB = 1 << 30
MiB = 1 << 20
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


def enabling(*patterns: str) -> Config:
    cfg = Config()
    cfg.hypervisor.enable_annotations = [*cfg.hypervisor.enable_annotations, *patterns]
    return cfg


def test_the_sandbox_spec_carries_the_pods_annotations_and_files_limit() -> None:
    spec = spec_with(
        {contract.SANDBOX_CPU: "2", contract.FILES_LIMIT: "5000"},
        cgroupsPath="/kubepods/pod1/abc",
    )
    opts = SandboxOptions(sandbox_id="p", sandbox_spec=spec, annotations={"ignored": "x"})
    cfg = enabling("^files_limit$")
    plan = plan_sandbox(cfg, opts, HOST)
    assert plan.vcpus == 2 and plan.files_limit == 5000 and "ignored" not in plan.annotations
    assert plan.cgroup_path == "kubepods/pod1/carapace-sandbox-p"
    # the caller's --files-limit is taken over the annotation
    opts.files_limit = 0
    assert plan_sandbox(cfg, opts, HOST).files_limit == 4_000_000 // 400


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
    opts = SandboxOptions(sandbox_id="p", annotations=ann)
    plan_sandbox(enabling("blkio"), opts, HOST, resolve)
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


# -- hostile inputs (issue 14) ------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc\n", "abc\r", "\nabc", "a b", "-abc", "a" * 77, "é"])
def test_ids_are_matched_whole(bad: str) -> None:
    # ``ID_RE.match`` with ``$`` took "abc\n": a trailing newline got into paths
    for what in ("sandbox id", "container id", "exec id", "pod id"):
        with pytest.raises(InvalidArgument, match=f"^{what} "):
            check_id(bad, what)
    with pytest.raises(InvalidArgument, match="sandbox id"):
        plan_sandbox(Config(), SandboxOptions(sandbox_id=bad), HOST)
    assert check_id("abc", "sandbox id") == "abc" and check_id("a" * 76, "x") == "a" * 76


BIG_HOST = HostFacts(usable_cpus=4, memory_total=23 * GiB + 512 * MiB, file_max=1, nofile_cap=1)


@pytest.mark.parametrize(
    ("ann", "needles"),
    [
        # seed 003's annotations are enabled, but capped by the host
        ({contract.SANDBOX_MEM: "256G"}, ["'256G'", "24064M (the host's memory)"]),
        ({contract.SANDBOX_CPU: "64"}, ["'64'", "at most 4 (the host's usable CPUs)"]),
        # containerd's own sizing annotations too
        ({contract.CRI_MEMORY: str(256 * GiB)}, [contract.CRI_MEMORY, "24064M"]),
        ({contract.CRI_CPU_QUOTA: "6400000"}, [contract.CRI_CPU_QUOTA, "at most 4"]),
    ],
)
def test_a_vm_larger_than_the_host_is_refused(ann: dict[str, str], needles: list[str]) -> None:
    # before: a 256 GiB, all-CPU VM was planned on a 23.5 GiB host
    with pytest.raises(InvalidArgument) as e:
        plan_sandbox(Config(), SandboxOptions(sandbox_id="p", annotations=ann), BIG_HOST)
    for needle in needles:
        assert needle in str(e.value)


def test_the_cap_is_the_configured_maximum_when_lower_than_the_host() -> None:
    cfg = Config()
    cfg.hypervisor.default_maxmemory = 4096
    cfg.hypervisor.default_maxvcpus = 2
    opts = SandboxOptions(sandbox_id="p", annotations={contract.SANDBOX_MEM: "4G"})
    assert plan_sandbox(cfg, opts, BIG_HOST).memory_mib == 4096
    opts.annotations = {contract.SANDBOX_MEM: "5G"}
    with pytest.raises(InvalidArgument, match=r"at most 4G \(configuration default_maxmemory\)"):
        plan_sandbox(cfg, opts, BIG_HOST)
    opts.annotations = {contract.SANDBOX_CPU: "3"}
    with pytest.raises(InvalidArgument, match=r"at most 2 \(configuration default_maxvcpus\)"):
        plan_sandbox(cfg, opts, BIG_HOST)
    # a maximum above the host's is the host's
    cfg.hypervisor.default_maxmemory = 1 << 30
    opts.annotations = {contract.SANDBOX_MEM: "24G"}
    with pytest.raises(InvalidArgument, match="the host's memory"):
        plan_sandbox(cfg, opts, BIG_HOST)
    # the CLI's --memory is capped as well
    with pytest.raises(InvalidArgument, match="--memory"):
        plan_sandbox(Config(), SandboxOptions(sandbox_id="p", memory="100G"), BIG_HOST)


def test_the_cri_sizing_annotations_still_size_the_vm_within_the_host() -> None:
    ann = {
        contract.CRI_CPU_QUOTA: "300000",
        contract.CRI_CPU_PERIOD: "100000",
        contract.CRI_MEMORY: str(3 * GiB),
    }
    plan = plan_sandbox(Config(), SandboxOptions(sandbox_id="p", annotations=ann), BIG_HOST)
    assert (plan.vcpus, plan.memory_mib) == (3, 3072)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (contract.KATA_VCPUS, "2"),
        (contract.KATA_MEMORY, "2048"),
        (contract.FILES_LIMIT, "4096"),
        (
            contract.BLKIO_CGROUP,
            '{"blkiocgroup":[{"limits":[{"type":"blkio_weight","value":78}]}]}',
        ),
    ],
)
def test_annotations_not_enabled_are_refused_naming_the_key_and_the_list(
    key: str, value: str
) -> None:
    # before: honoured whatever the configuration
    opts = SandboxOptions(sandbox_id="p", annotations={key: value})
    with pytest.raises(InvalidArgument) as e:
        plan_sandbox(Config(), opts, HOST)
    msg = str(e.value)
    assert key in msg and "enable_annotations" in msg and "'^sandbox_cpu$'" in msg
    # the same pod as a sandbox spec (the shim's way) is refused alike
    spec_opts = SandboxOptions(sandbox_id="p", sandbox_spec=spec_with({key: value}))
    with pytest.raises(InvalidArgument, match="enable_annotations"):
        plan_sandbox(Config(), spec_opts, HOST)
    # enabled by the base name (Kata's rule: any part of it), or by the whole key
    base = key.rsplit(".", 1)[1]
    for pattern in (f"^{base}$", base[2:], key.replace(".", r"\.")):
        plan_sandbox(enabling(pattern), opts, HOST, lambda items: [])


def test_an_empty_allow_list_refuses_even_the_seed_annotations() -> None:
    cfg = Config()
    cfg.hypervisor.enable_annotations = []
    opts = SandboxOptions(sandbox_id="p", annotations={contract.SANDBOX_CPU: "2"})
    with pytest.raises(InvalidArgument, match=r"enable_annotations = \[\]"):
        plan_sandbox(cfg, opts, HOST)
    # annotations carapace does not act on are not its business
    plan_sandbox(cfg, SandboxOptions(sandbox_id="p", annotations={"x.y/z": "1"}), HOST)
