"""The resource policy (carapace.resources) against every rule and example of
openEuler's "Configuring Resources for a Secure Container" (quoted in the test names)
and containerd/Kata sizing."""

from __future__ import annotations

import pytest

from carapace import resources as r
from carapace.errors import InvalidArgument
from carapace.oci.bundle import Namespace, Spec
from carapace.resources import ContainerResources as CR
from carapace.sizing import GiB, MiB

HOST = 8  # usable host CPUs in these tables


def size(annotations: dict[str, str] | None = None, **kw: object) -> r.SandboxSize:
    args: dict[str, object] = {
        "default_cpus": 1,
        "default_memory_mib": 1024,
        "cap": r.SizeCap(HOST),
    }
    args.update(kw)
    return r.sandbox_size(annotations or {}, **args)  # type: ignore[arg-type]


def bad(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(InvalidArgument) as e:
        fn(*args, **kw)  # type: ignore[operator]
    return str(e.value)


# -- "the lightweight VM uses 1 GB memory by default" / one vCPU by default ------------


def test_seed_default_vm_is_one_vcpu_and_1g() -> None:
    s = size()
    assert (s.cpus, s.vcpus, s.memory, s.cpu_cap) == (1, 1, GiB, None)
    assert s.cpu_source == s.memory_source == "configuration"


# -- "sandbox_cpu=4 ... CPU(s): 4" ------------------------------------------------------


def test_seed_sandbox_cpu_4_gives_4_vcpus() -> None:
    s = size({r.SANDBOX_CPU: "4"})
    assert (s.vcpus, s.cpu_source, s.cpu_cap) == (4, r.SANDBOX_CPU, None)


# -- "The minimum number of CPUs is 0.5" ------------------------------------------------


def test_seed_minimum_cpus_is_half_and_boots_one_capped_vcpu() -> None:
    s = size({r.SANDBOX_CPU: "0.5"})
    assert (s.vcpus, s.cpu_cap) == (1, 0.5)


def test_fractional_cpus_boot_ceil_and_cap_to_the_amount() -> None:
    s = size({r.SANDBOX_CPU: "2.5"})
    assert (s.vcpus, s.cpu_cap) == (3, 2.5)


@pytest.mark.parametrize("value", ["0.4", "0", "-1", "abc", "", "nan", "inf"])
def test_seed_below_minimum_or_malformed_cpus_refused(value: str) -> None:
    msg = bad(size, {r.SANDBOX_CPU: value})
    assert r.SANDBOX_CPU in msg and repr(value) in msg and "0.5 to 8" in msg


# -- "The maximum number of CPUs ... is the number of CPUs (excluding isolated cores)" --


def test_seed_maximum_cpus_is_the_hosts_usable_cpus() -> None:
    assert size({r.SANDBOX_CPU: "8"}).vcpus == 8
    msg = bad(size, {r.SANDBOX_CPU: "9"})
    assert "'9'" in msg and "8 (the host's usable CPUs)" in msg


def test_seed_isolated_cores_are_not_usable() -> None:
    assert r.usable_cpus(range(8), "") == 8
    assert r.usable_cpus(range(8), "2-3,6\n") == 5
    assert r.usable_cpus({0, 1}, "1") == 1


@pytest.mark.parametrize(
    ("text", "ids"),
    [("", set()), ("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-1,4", {0, 1, 4}), (" 2 ", {2})],
)
def test_cpu_list_parsing(text: str, ids: set[int]) -> None:
    assert r.parse_cpu_list(text, "x") == ids


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "-1", "1,,2"])
def test_cpu_list_malformed(text: str) -> None:
    assert repr(text) in bad(r.parse_cpu_list, text, "--cpuset-cpus")


def test_cpu_lists_are_bounded_before_they_are_expanded() -> None:
    # before: "0-4294967295" built a set of 4 billion ids (MemoryError)
    msg = bad(r.parse_cpu_list, "0-4294967295", "--cpuset-cpus")
    assert "'0-4294967295'" in msg and "ids 0 to 8191" in msg
    assert "'8192'" in bad(r.parse_cpu_list, "8192", "x")
    assert r.parse_cpu_list("8190-8191", "x") == {8190, 8191}
    assert "a list" in bad(r.parse_cpu_list, ["0"], "x")  # not a string
    assert "'٣'" in bad(r.parse_cpu_list, "٣", "x")  # other scripts' digits


@pytest.mark.parametrize(
    ("res", "needle"),
    [
        ({"cpu": {"quota": 10**400}}, "cpu.quota: 1000000000"),  # before: OverflowError
        ({"cpu": {"quota": 1000, "period": 2**64}}, "cpu.period"),
        ({"memory": {"limit": -(2**63) - 1}}, "memory.limit"),
        ([{"cpu": {}}], "a JSON object"),  # before: AttributeError
        ({"cpu": {"cpus": 3}}, "cpu.cpus"),
    ],
)
def test_container_resources_out_of_range(res: object, needle: str) -> None:
    msg = bad(r.container_resources, res, "c")
    assert needle in msg and "accepted" in msg and len(msg) < 300


# -- "sandbox_mem=4G" / "minimum memory size of a pod ... is 1 GB, maximum 256 GB" ------


@pytest.mark.parametrize(
    ("value", "nbytes"),
    [
        ("4G", 4 * GiB),
        ("1G", GiB),
        ("2048m", 2 * GiB),
        ("1073741824", GiB),  # a bare number is bytes, as in docker
        ("256G", 256 * GiB),
        ("1.5G", 1536 * MiB),
    ],
)
def test_seed_sandbox_mem_sizes(value: str, nbytes: int) -> None:
    s = size({r.SANDBOX_MEM: value})
    assert (s.memory, s.memory_source) == (nbytes, r.SANDBOX_MEM)


@pytest.mark.parametrize("value", ["512m", "1073741823", "257G", "1T", "lots", "-1G", ""])
def test_seed_sandbox_mem_out_of_range_or_malformed(value: str) -> None:
    msg = bad(size, {r.SANDBOX_MEM: value})
    assert r.SANDBOX_MEM in msg and repr(value) in msg and "1G to 256G" in msg


@pytest.mark.parametrize(
    "value",
    ["9" * 400 + "G", "9" * 5000, "²", "٣G", 3, ["1G"], None, 1.5, "1e400"],
)
def test_hostile_sandbox_mem_is_refused_with_a_short_message(value: object) -> None:
    # before: OverflowError ("9"*400+"G"), ValueError ("²", 5000 digits), AttributeError
    msg = bad(size, {r.SANDBOX_MEM: value})
    assert r.SANDBOX_MEM in msg and "accepted" in msg and len(msg) < 400


def test_a_size_above_the_cap_names_the_cap() -> None:
    cap = r.SizeCap(2, 4 * GiB, "the host's usable CPUs", "the host's memory")
    msg = bad(size, {r.SANDBOX_MEM: "8G"}, cap=cap)
    assert "'8G'" in msg and "at most 4G (the host's memory)" in msg
    msg = bad(size, {r.CRI_MEMORY: str(8 * GiB)}, cap=cap)
    assert r.CRI_MEMORY in msg and "at most 4G" in msg
    msg = bad(size, {r.KATA_VCPUS: "3"}, cap=cap)
    assert "'3'" in msg and "at most 2 (the host's usable CPUs)" in msg
    assert "1G to 256G" in bad(size, {r.SANDBOX_MEM: "512m"}, cap=cap)
    assert size({r.SANDBOX_MEM: "4G", r.SANDBOX_CPU: "2"}, cap=cap).memory == 4 * GiB


def test_configured_defaults_are_checked_too() -> None:
    assert "default_memory" in bad(size, default_memory_mib=512)
    assert "default_vcpus" in bad(size, default_cpus=0.25)
    assert size(default_cpus=2, default_memory_mib=2048).memory == 2 * GiB


# -- Kata's annotations ------------------------------------------------------------------


def test_kata_default_vcpus_and_memory_annotations() -> None:
    s = size({r.KATA_VCPUS: "2", r.KATA_MEMORY: "2048"})  # memory in MiB, as in Kata
    assert (s.vcpus, s.memory) == (2, 2 * GiB)
    assert (s.cpu_source, s.memory_source) == (r.KATA_VCPUS, r.KATA_MEMORY)
    assert size({r.KATA_MEMORY: "3G"}).memory == 3 * GiB
    assert r.KATA_MEMORY in bad(size, {r.KATA_MEMORY: "512"})


def test_sandbox_annotations_win_over_kata_and_the_callers_flags_win_over_all() -> None:
    a = {r.KATA_VCPUS: "2", r.SANDBOX_CPU: "3", r.KATA_MEMORY: "2048", r.SANDBOX_MEM: "4G"}
    s = size(a)
    assert (s.vcpus, s.memory) == (3, 4 * GiB)
    s = size(a, cpus="1", memory="1G")
    assert (s.vcpus, s.memory, s.cpu_source, s.memory_source) == (1, GiB, "--cpus", "--memory")


# -- containerd's sandbox sizing annotations ------------------------------------------------


def test_cri_sandbox_annotations_grow_the_vm_beyond_the_default() -> None:
    s = size({r.CRI_CPU_QUOTA: "250000", r.CRI_CPU_PERIOD: "100000", r.CRI_MEMORY: str(3 * GiB)})
    assert (s.cpus, s.vcpus, s.memory) == (3, 3, 3 * GiB)
    assert s.cpu_source == s.memory_source == "containerd sandbox annotations"


def test_cri_sandbox_annotations_smaller_than_the_default_keep_the_default() -> None:
    # a pod limited to 0.25 CPU and 256Mi still boots the 1 vCPU / 1G default
    s = size({r.CRI_CPU_QUOTA: "25000", r.CRI_CPU_PERIOD: "100000", r.CRI_MEMORY: "268435456"})
    assert (s.vcpus, s.memory, s.cpu_source) == (1, GiB, "configuration")


def test_cri_unlimited_pod_keeps_the_default() -> None:
    s = size({r.CRI_CPU_QUOTA: "-1", r.CRI_CPU_PERIOD: "100000", r.CRI_MEMORY: "0"})
    assert (s.vcpus, s.memory) == (1, GiB)


def test_cri_annotation_malformed_or_beyond_the_host() -> None:
    assert r.CRI_CPU_QUOTA in bad(size, {r.CRI_CPU_QUOTA: "lots"})
    assert r.CRI_MEMORY in bad(size, {r.CRI_MEMORY: "-5"})
    assert "the host's usable CPUs" in bad(
        size, {r.CRI_CPU_QUOTA: "1600000", r.CRI_CPU_PERIOD: "100000"}
    )


# -- "This option can be configured only on the pause container" ------------------------------


@pytest.mark.parametrize("key", r.SANDBOX_ONLY)
def test_seed_sandbox_only_annotations_refused_on_other_containers(key: str) -> None:
    msg = bad(r.check_sandbox_only, {key: "4"}, "web", {})
    assert key in msg and "'4'" in msg and "web" in msg and "sandbox (pause)" in msg


def test_sandbox_only_annotation_copied_from_the_pod_is_accepted() -> None:
    r.check_sandbox_only({r.SANDBOX_CPU: "2"}, "web", {r.SANDBOX_CPU: "2"})
    assert "the pod has '2'" in bad(
        r.check_sandbox_only, {r.SANDBOX_CPU: "3"}, "web", {r.SANDBOX_CPU: "2"}
    )


# -- "--net host, --ipc host, --pid host, and --uts host are not supported" -------------------


def spec_with(*types: str) -> tuple[Namespace, ...]:
    return tuple(Namespace(t) for t in types)


@pytest.mark.parametrize(
    ("missing", "flag"),
    [
        ("network", "--net host"),
        ("ipc", "--ipc host"),
        ("pid", "--pid host"),
        ("uts", "--uts host"),
    ],
)
def test_seed_host_namespaces_refused(missing: str, flag: str) -> None:
    types = [t for t in ("network", "ipc", "pid", "uts", "mount") if t != missing]
    msg = bad(r.check_namespaces, spec_with(*types), "c1")
    assert f"host's {missing} namespace" in msg and flag in msg and "c1" in msg


def test_host_namespaces_all_named() -> None:
    msg = bad(r.check_namespaces, (), "c1")
    assert "network and ipc and pid and uts namespaces" in msg


def test_private_or_pod_namespaces_accepted() -> None:
    r.check_namespaces(spec_with("network", "ipc", "pid", "uts", "mount"), "c1")
    joined = (
        Namespace("network", "/var/run/netns/cni-1"),
        Namespace("ipc", "guest:/proc/1/ns/ipc"),
        Namespace("pid"),
        Namespace("uts", "guest:/proc/1/ns/uts"),
    )
    r.check_namespaces(joined, "c1")


# -- container CPU and memory options ------------------------------------------------------


def test_container_resources_parsed_from_oci() -> None:
    res = r.container_resources(
        {
            "cpu": {"shares": 512, "quota": 150000, "period": 100000, "cpus": "0-1", "mems": "0"},
            "memory": {"limit": 4 * GiB},
        },
        "c",
    )
    assert res == CR(1.5, 512, frozenset({0, 1}), frozenset({0}), 4 * GiB)
    assert r.container_resources(None, "c") == CR()
    assert r.container_resources({"cpu": {"quota": -1}, "memory": {"limit": 0}}, "c") == CR()
    assert r.container_resources({"cpu": {"quota": 50000}}, "c").cpus == 0.5  # default period


@pytest.mark.parametrize(
    ("res", "needle"),
    [
        ({"cpu": {"quota": "1"}}, "cpu.quota: '1' is not an integer"),
        ({"cpu": {"quota": 1000, "period": 0}}, "cpu.period: 0 must be positive"),
        ({"memory": {"limit": True}}, "memory.limit: True"),
        ({"cpu": {"cpus": "0-x"}}, "--cpuset-cpus"),
        ({"cpu": []}, "must be objects"),
    ],
)
def test_container_resources_malformed(res: dict[str, object], needle: str) -> None:
    assert needle in bad(r.container_resources, res, "c")


def test_seed_cpuset_cpu_id_must_be_below_the_vms_vcpus() -> None:
    # "the CPU ID cannot exceed the number of CPUs in the lightweight VM minus 1"
    r.check_container(
        CR(cpuset_cpus=frozenset({0, 1})), "c", vm_vcpus=2, vm_memory=GiB, hotplug=False
    )
    msg = bad(
        r.check_container,
        CR(cpuset_cpus=frozenset({0, 2})),
        "c",
        vm_vcpus=2,
        vm_memory=GiB,
        hotplug=False,
    )
    assert "names CPU 2" in msg and "has 2 vCPUs" in msg and "0 to 1" in msg


def test_seed_cpuset_mems_only_node_0() -> None:
    # "The --cpuset-mems option of NUMA memory can only be set to 0"
    r.check_container(CR(cpuset_mems=frozenset({0})), "c", vm_vcpus=1, vm_memory=GiB, hotplug=False)
    msg = bad(
        r.check_container,
        CR(cpuset_mems=frozenset({0, 1})),
        "c",
        vm_vcpus=1,
        vm_memory=GiB,
        hotplug=False,
    )
    assert "--cpuset-mems 0,1" in msg and "accepted: 0" in msg


def test_seed_memory_without_hotplug_must_fit_the_vm() -> None:
    # "When memory hot swap is disabled, the value of -m must be less than or equal to
    # the memory size allocated when the lightweight VM is started"
    r.check_container(CR(memory=GiB), "c", vm_vcpus=1, vm_memory=GiB, hotplug=False)
    msg = bad(r.check_container, CR(memory=2 * GiB), "c", vm_vcpus=1, vm_memory=GiB, hotplug=False)
    assert "--memory 2G" in msg and "memory hotplug is off" in msg and "at most 1G" in msg
    msg = bad(
        r.check_container, CR(memory=300 * GiB), "c", vm_vcpus=1, vm_memory=256 * GiB, hotplug=True
    )
    assert "can grow to" in msg


# -- hotplug: the seed's examples ----------------------------------------------------------------


def test_seed_cpu_hotplug_pause_1_plus_container_4_gives_4_not_5() -> None:
    assert r.pod_vcpus(1, [CR(), CR(cpus=4)]) == 4


def test_seed_cpu_hotplug_removed_with_the_container() -> None:
    assert r.pod_vcpus(1, [CR()]) == 1


def test_cpu_hotplug_sums_containers_and_rounds_up() -> None:
    assert r.pod_vcpus(1, [CR(cpus=1.5), CR(cpus=1.5), CR(cpus=0.5)]) == 4
    assert r.pod_vcpus(2, [CR(cpus=0.5)]) == 2


def test_seed_memory_hotplug_1g_plus_4g_container_gives_4g_not_5g() -> None:
    assert r.pod_memory(GiB, GiB, [CR(), CR(memory=4 * GiB)]) == 4 * GiB


def test_seed_memory_hot_add_only_stays_after_delete() -> None:
    # "after the hot added memory container is deleted ... the memory is still 4 GB"
    assert r.pod_memory(GiB, 4 * GiB, [CR()]) == 4 * GiB


def test_memory_hotplug_rounds_up_to_memory_blocks() -> None:
    assert r.pod_memory(GiB, GiB, [CR(memory=GiB + 1)]) == GiB + 128 * MiB
    assert r.pod_memory(GiB, GiB, [CR(memory=700 * MiB), CR(memory=700 * MiB)]) == 1408 * MiB


# -- files limit: the seed's three rules ---------------------------------------------------------


def test_seed_files_limit_below_1024_and_not_0_becomes_1024() -> None:
    assert r.files_limit(1, 2466174, 20000) == (1024, "")
    assert r.files_limit(1023, 2466174, 20000) == (1024, "")


def test_seed_files_limit_0_is_file_max_over_400() -> None:
    assert r.files_limit(0, 2466174, 20000) == (6165, "")
    assert r.files_limit(0, 100000, 20000) == (1024, "")  # never below the minimum


def test_seed_files_limit_unset_is_the_system_default() -> None:
    assert r.files_limit(None, 2466174, 20000) == (None, "")


def test_files_limit_capped_at_the_hosts_limit_with_a_warning() -> None:
    n, warning = r.files_limit(50000, 2466174, 20000)
    assert n == 20000 and "50000" in warning and "20000" in warning
    assert r.files_limit(4096, 2466174, 20000) == (4096, "")


def test_files_limit_from_spec_or_annotation() -> None:
    spec = Spec.from_dict({"process": {}, "linux": {"resources": {"files": {"limit": 100}}}})
    assert r.files_limit_value(spec.files_limit, {}) == 100
    assert r.files_limit_value(None, {r.FILES_LIMIT: "0"}) == 0
    assert r.files_limit_value(spec.files_limit, {r.FILES_LIMIT: "5"}) == 100  # the spec wins
    assert r.files_limit_value(None, {}) is None
    msg = bad(r.files_limit_value, None, {r.FILES_LIMIT: "-3"})
    assert r.FILES_LIMIT in msg and "'-3'" in msg
    assert "--files-limit" in bad(
        Spec.from_dict, {"process": {}, "linux": {"resources": {"files": {"limit": "x"}}}}
    )


def test_update_keeps_what_it_leaves_out() -> None:
    old = CR(cpus=2, memory=GiB, cpuset_cpus=frozenset({0}))
    assert r.merge(old, CR(memory=2 * GiB)) == CR(
        cpus=2, memory=2 * GiB, cpuset_cpus=frozenset({0})
    )
    assert r.merge(old, CR()) == old


def test_a_path_to_the_hosts_namespace_is_refused() -> None:
    spec = (Namespace("network", "/proc/1/ns/net"), *spec_with("ipc", "pid", "uts"))
    msg = bad(r.check_namespaces, spec, "c1", lambda t, p: p == "/proc/1/ns/net")
    assert "host's network namespace (--net host)" in msg
    r.check_namespaces(spec, "c1", lambda t, p: False)


# -- sandbox_cgroup_only = false: "the pod cgroup limited by the sum of all container limits"


def test_pod_limits_sum_the_containers_limits() -> None:
    pod = [CR(), CR(cpus=1.5, memory=GiB), CR(cpus=0.5, memory=512 * MiB)]
    assert r.pod_limits(pod) == (2.0, GiB + 512 * MiB)


def test_pod_limits_without_any_limit_are_none() -> None:
    assert r.pod_limits([CR(), CR()]) == (None, None)
    assert r.pod_limits([]) == (None, None)
    assert r.pod_limits([CR(memory=GiB)]) == (None, GiB)
