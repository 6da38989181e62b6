"""Fuzzing the engine's inputs (issue 14, item 10): sizes, annotations, OCI
linux.resources, configuration.toml and whole specs. Whatever comes in, parsing either
succeeds or raises one of carapace's own errors (``CarapaceError``), whose message the
shim sends back as INVALID_ARGUMENT; never ValueError, OverflowError, AttributeError,
RecursionError or MemoryError, which it could only answer as UNKNOWN.

Each property runs a bounded number of examples (a few seconds in all); the cases that
broke before are pinned with ``example``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from carapace import resources as r
from carapace.config import parse_config
from carapace.errors import CarapaceError
from carapace.hostcgroup import parse_blkio_cgroup
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.protocols import contract
from carapace.sandbox import HostFacts, SandboxOptions
from carapace.sandbox.plan import plan_sandbox
from carapace.sizing import GiB, parse_size

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HOST = HostFacts(usable_cpus=4, memory_total=8 * GiB, file_max=1 << 20, nofile_cap=20000)
CAP = r.SizeCap(4, 8 * GiB)


def parses_or_refuses(fn: Callable[[], object]) -> None:
    """``fn()`` returns, or raises a CarapaceError; anything else fails the test."""
    with contextlib.suppress(CarapaceError):
        fn()


# -- values ---------------------------------------------------------------------------------

#: Text that looks like numbers: other scripts' digits ("²", "٣"), hundreds of digits,
#: units, signs, ranges, floats' spellings.
numberish = st.one_of(
    st.from_regex(
        r"\s?[-+]?[0-9]{1,30}(\.[0-9]{0,30})?\s?[bkmgtBKMGT]?(i?[bB])?\s?", fullmatch=True
    ),
    st.builds(lambda n, u: "9" * n + u, st.integers(1, 5000), st.sampled_from(["", "G", "m"])),
    st.sampled_from(["²", "٣", "١٢٣", "1_000", "1e400", "-0", "nan", "inf", "0x10", "", " "]),
    st.from_regex(r"[0-9]{1,12}-[0-9]{1,12}(,[0-9]{1,12})?", fullmatch=True),
    st.text(max_size=12),
)
big_ints = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0]),
)
json_leaf = st.one_of(
    st.none(), st.booleans(), big_ints, st.floats(), numberish, st.text(max_size=8)
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# -- sizes ----------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(numberish, big_ints, json_values))
@example("9" * 400 + "G")
@example("²")
def test_parse_size(value: Any) -> None:
    parses_or_refuses(lambda: parse_size(value, "--memory"))


@FUZZ
@given(st.one_of(numberish, big_ints, json_values), st.one_of(numberish, big_ints, json_values))
@example("²", "1")
@example(1024, "9" * 400)
def test_sizing_flags_and_defaults(memory: Any, cpus: Any) -> None:
    parses_or_refuses(
        lambda: r.sandbox_size(
            {}, default_cpus=1, default_memory_mib=1024, cap=CAP, cpus=cpus, memory=memory
        )
    )
    parses_or_refuses(
        lambda: r.sandbox_size({}, default_cpus=cpus, default_memory_mib=memory, cap=CAP)
    )


# -- annotations --------------------------------------------------------------------------

SIZING_KEYS = [
    contract.SANDBOX_CPU,
    contract.SANDBOX_MEM,
    contract.KATA_VCPUS,
    contract.KATA_MEMORY,
    contract.CRI_CPU_QUOTA,
    contract.CRI_CPU_PERIOD,
    contract.CRI_CPU_SHARES,
    contract.CRI_MEMORY,
    contract.FILES_LIMIT,
    contract.BLKIO_CGROUP,
]
annotations = st.dictionaries(
    st.sampled_from(SIZING_KEYS), st.one_of(numberish, json_values), max_size=4
)


@FUZZ
@given(annotations)
@example({contract.SANDBOX_MEM: "9" * 400 + "G"})
@example({contract.CRI_CPU_QUOTA: "1" + "0" * 400})
@example({contract.SANDBOX_CPU: 3})  # not a string: from the Python API
@example({contract.CRI_MEMORY: ["1"]})
def test_annotation_parsing(ann: dict[str, Any]) -> None:
    parses_or_refuses(lambda: r.sandbox_size(ann, default_cpus=1, default_memory_mib=1024, cap=CAP))
    parses_or_refuses(lambda: r.files_limit_value(None, ann))
    parses_or_refuses(lambda: r.check_sandbox_only(ann, "c", {}))
    # the whole plan, with every annotation enabled and blkio parsed (not resolved)
    config = parse_config('[hypervisor]\nenable_annotations = ["."]\n')
    options = SandboxOptions(sandbox_id="p", annotations=ann)
    parses_or_refuses(lambda: plan_sandbox(config, options, HOST, lambda items: []))


@FUZZ
@given(st.one_of(json_values, st.text(max_size=40)))
@example(
    '{"blkiocgroup": [{"path": "/dev/vda", "limits": [{"type": "blkio_weight", '
    '"value": ' + "9" * 5000 + "}]}]}"
)
@example("[" * 5000)
def test_blkio_annotation(value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    parses_or_refuses(lambda: parse_blkio_cgroup(text))


# -- OCI linux.resources ----------------------------------------------------------------------

cpu_sections = st.fixed_dictionaries(
    {},
    optional={
        k: st.one_of(numberish, json_values) for k in ("quota", "period", "shares", "cpus", "mems")
    },
)
resource_sections = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "cpu": st.one_of(cpu_sections, json_values),
            "memory": st.one_of(
                st.fixed_dictionaries({}, optional={"limit": st.one_of(big_ints, json_values)}),
                json_values,
            ),
        },
    ),
)


@FUZZ
@given(resource_sections)
@example({"cpu": {"cpus": "0-4294967295"}})
@example({"cpu": {"quota": 10**400}})
@example({"cpu": {"quota": 1, "period": 10**400}})
@example([{"cpu": {}}])
def test_container_resources(resources: Any) -> None:
    parses_or_refuses(lambda: r.container_resources(resources, "c"))


# -- configuration.toml -----------------------------------------------------------------------

HYPERVISOR_KEYS = [
    "path",
    "accel",
    "default_vcpus",
    "default_memory",
    "default_maxvcpus",
    "default_maxmemory",
    "enable_cpu_memory_hotplug",
    "boot_timeout",
    "shutdown_timeout",
    "kernel_params",
    "shared_fs",
    "enable_annotations",
]
RUNTIME_KEYS = [
    "run_dir",
    "state_dir",
    "kill_vm_with_owner",
    "sandbox_cgroup_only",
    "sandbox_cgroup_prefix",
    "container_cgroup_prefix",
]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (\uXXXX escapes, NUL included)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


toml_leaf = st.one_of(
    st.booleans(),
    big_ints,
    st.integers(1, 300).map(lambda n: 10**n),
    st.floats(),
    numberish,
    st.text(max_size=10),
    st.sampled_from(["(", "a{4294967296}", "[", "\x00", "^sandbox_cpu$"]),
)
toml_values = st.one_of(
    toml_leaf,
    st.lists(toml_leaf, max_size=3),
    st.dictionaries(st.text(max_size=5), toml_leaf, max_size=2),
)


@FUZZ
@given(
    st.sampled_from(
        [("hypervisor", k) for k in HYPERVISOR_KEYS] + [("runtime", k) for k in RUNTIME_KEYS]
    ),
    toml_values,
)
@example(("hypervisor", "default_memory"), "²")
@example(("hypervisor", "default_vcpus"), 10**400)
@example(("hypervisor", "enable_annotations"), ["("])
@example(("hypervisor", "boot_timeout"), math.nan)
def test_parse_config(section_key: tuple[str, str], value: Any) -> None:
    section, key = section_key
    text = f"[{section}]\n{key} = {toml_value(value)}\n"

    def parse_and_plan() -> None:
        config = parse_config(text)
        plan_sandbox(config, SandboxOptions(sandbox_id="p"), HOST)

    parses_or_refuses(parse_and_plan)


@pytest.mark.parametrize(
    "text",
    [
        "[hypervisor]\ndefault_memory = " + "9" * 5000,  # tomllib: ValueError, not TOMLDecodeError
        "[hypervisor]\nenable_annotations = " + "[" * 5000,
        '[hypervisor]\nkernel_params = "\\u0000"',
        "hypervisor = 1",
    ],
)
def test_parse_config_texts(text: str) -> None:
    parses_or_refuses(lambda: parse_config(text))


# -- whole specs ------------------------------------------------------------------------------

SPEC_FIELDS = ["process", "root", "linux", "annotations", "mounts", "hostname", "ociVersion"]


@FUZZ
@given(st.sampled_from(SPEC_FIELDS), json_values, json_values)
@example("linux", [], None)
@example("annotations", {"a": 1}, None)
@example("linux", {"resources": {"cpu": {"quota": 10**400}}}, None)
@example("linux", {"resources": {"cpu": {"cpus": "0-4294967295"}}}, None)
@example("mounts", [{"destination": "/x", "options": [1]}], None)
def test_spec_from_dict(name: str, value: Any, extra: Any) -> None:
    data = default_spec(["true"])
    data[name] = value
    if isinstance(value, dict):
        value.setdefault("extra", extra)

    def parse_and_plan() -> None:
        spec = Spec.from_dict(data)
        r.container_resources(spec.resources, "c")
        options = SandboxOptions(sandbox_id="p", sandbox_spec=spec)
        plan_sandbox(
            parse_config('[hypervisor]\nenable_annotations = ["."]\n'),
            options,
            HOST,
            lambda items: [],
        )

    parses_or_refuses(parse_and_plan)
    parses_or_refuses(lambda: Spec.from_dict(value))


@pytest.mark.parametrize("depth", [60, 500, 5000])
def test_deeply_nested_specs(depth: int) -> None:
    # before: copy.deepcopy of a 500-deep list raised RecursionError
    data = default_spec(["true"])
    data["x"] = nested(depth)
    parses_or_refuses(lambda: Spec.from_dict(data))


@FUZZ
@given(json_values)
def test_spec_linux_resources(resources: Any) -> None:
    data = default_spec(["true"])
    data["linux"]["resources"] = resources

    def parse_and_plan() -> None:
        spec = Spec.from_dict(data)
        plan_sandbox(parse_config(""), SandboxOptions(sandbox_id="p", sandbox_spec=spec), HOST)

    parses_or_refuses(parse_and_plan)
