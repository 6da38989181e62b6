"""configuration.toml parsing and loading (carapace.config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import carapace.config as config
from carapace.config import (
    Config,
    HypervisorConfig,
    RuntimeConfig,
    load_config,
    parse_config,
)
from carapace.errors import InvalidArgument


def test_empty_config_is_all_defaults() -> None:
    cfg = parse_config("")
    assert cfg.hypervisor == HypervisorConfig()
    assert cfg.runtime == RuntimeConfig()
    assert cfg.hypervisor.accel == "auto"
    assert cfg.hypervisor.default_memory == 1024
    assert cfg.hypervisor.path == "/usr/bin/qemu-system-x86_64"
    assert cfg.runtime.run_dir == "/run/carapace"
    assert cfg.runtime.kill_vm_with_owner is True
    assert cfg.source == "<string>"
    assert cfg.image_dir == Path("/var/lib/carapace/guest")


def test_values_are_applied() -> None:
    cfg = parse_config(
        """
[hypervisor]
accel = "tcg"
default_memory = 2048
default_vcpus = 2
boot_timeout = 30
kernel_params = "loglevel=7"
image_dir = "/srv/guest"

[runtime]
run_dir = "/tmp/run"
kill_vm_with_owner = false
""",
        source="test.toml",
    )
    assert cfg.source == "test.toml"
    assert cfg.hypervisor.accel == "tcg"
    assert cfg.hypervisor.default_memory == 2048
    assert cfg.hypervisor.default_vcpus == 2
    # an integer where a float is expected is accepted, and stored as a float
    assert cfg.hypervisor.boot_timeout == 30.0
    assert isinstance(cfg.hypervisor.boot_timeout, float)
    assert cfg.hypervisor.kernel_params == "loglevel=7"
    assert cfg.image_dir == Path("/srv/guest")
    assert cfg.runtime.run_dir == "/tmp/run"
    assert cfg.runtime.kill_vm_with_owner is False
    # untouched keys keep their defaults
    assert cfg.runtime.state_dir == "/var/lib/carapace"


def test_fractional_vcpus_accepted() -> None:
    cfg = parse_config("[hypervisor]\ndefault_vcpus = 1.5\n")
    assert cfg.hypervisor.default_vcpus == 1.5


@pytest.mark.parametrize("section", [HypervisorConfig, RuntimeConfig])
def test_every_float_key_accepts_a_fraction(section: type) -> None:
    name = {HypervisorConfig: "hypervisor", RuntimeConfig: "runtime"}[section]
    for f in dataclasses.fields(section):
        if f.type in ("float", float):
            cfg = parse_config(f"[{name}]\n{f.name} = 2.5\n")
            assert getattr(getattr(cfg, name), f.name) == 2.5, f.name


def test_unknown_section() -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_config("[hypervisr]\naccel = 'kvm'\n", source="c.toml")
    msg = str(exc.value)
    assert "c.toml: unknown section [hypervisr]" in msg
    assert "[hypervisor]" in msg and "[runtime]" in msg


def test_top_level_key_is_an_unknown_section() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown section \[accel\]"):
        parse_config("accel = 'kvm'\n")


def test_unknown_key_lists_accepted_keys() -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_config("[hypervisor]\nmemory = 2048\n", source="c.toml")
    msg = str(exc.value)
    assert "c.toml [hypervisor]: unknown key 'memory'" in msg
    accepted = msg.split("accepted: ", 1)[1].split(", ")
    assert accepted == sorted(f.name for f in dataclasses.fields(HypervisorConfig))


def test_unknown_runtime_key() -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_config("[runtime]\nrundir = '/x'\n")
    assert "'rundir'" in str(exc.value)
    assert "run_dir" in str(exc.value) and "kill_vm_with_owner" in str(exc.value)


@pytest.mark.parametrize(
    ("toml", "seen"),
    [
        ("[hypervisor]\ndefault_memory = '1024'\n", "'1024' is a str; expected a int"),
        ("[hypervisor]\ndefault_memory = true\n", "True is a bool; expected a int"),
        ("[hypervisor]\ndefault_memory = 1.5\n", "1.5 is a float; expected a int"),
        ("[hypervisor]\nboot_timeout = true\n", "True is a bool; expected a float"),
        ("[hypervisor]\nboot_timeout = '10'\n", "'10' is a str; expected a float"),
        ("[hypervisor]\naccel = 1\n", "1 is a int; expected a str"),
        ("[runtime]\nkill_vm_with_owner = 1\n", "1 is a int; expected a bool"),
        ("[runtime]\nrun_dir = ['/a']\n", "is a list; expected a str"),
    ],
)
def test_wrong_types(toml: str, seen: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_config(toml)
    assert seen in str(exc.value)


@pytest.mark.parametrize("accel", ["xen", "KVM", "", "hvf"])
def test_accel_must_be_auto_kvm_or_tcg(accel: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_config(f"[hypervisor]\naccel = {accel!r}\n")
    msg = str(exc.value)
    assert repr(accel) in msg
    assert "accepted: auto, kvm, tcg" in msg


@pytest.mark.parametrize("accel", ["auto", "kvm", "tcg"])
def test_accel_accepted(accel: str) -> None:
    assert parse_config(f"[hypervisor]\naccel = {accel!r}\n").hypervisor.accel == accel


def test_invalid_toml() -> None:
    with pytest.raises(InvalidArgument, match=r"^bad\.toml: not valid TOML"):
        parse_config("[hypervisor\naccel = 'kvm'\n", source="bad.toml")


def test_load_config_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text("[hypervisor]\ndefault_memory = 512\n")
    monkeypatch.setenv("CARAPACE_CONFIG", str(path))
    cfg = load_config()
    assert cfg.source == str(path)
    assert cfg.hypervisor.default_memory == 512


def test_load_config_env_error_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text("[hypervisor]\nbogus = 1\n")
    monkeypatch.setenv("CARAPACE_CONFIG", str(path))
    with pytest.raises(InvalidArgument, match=f"^{path} \\[hypervisor\\]: unknown key 'bogus'"):
        load_config()


def test_load_config_missing_env_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARAPACE_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(InvalidArgument, match=r"cannot read configuration .*absent\.toml"):
        load_config()


def test_load_config_missing_explicit_path_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CARAPACE_CONFIG", raising=False)
    missing = tmp_path / "nope.toml"
    with pytest.raises(InvalidArgument) as exc:
        load_config(missing)
    assert str(missing) in str(exc.value)
    assert "No such file" in str(exc.value)


def test_load_config_explicit_path_wins_over_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[runtime]\nrun_dir = '/explicit'\n")
    monkeypatch.setenv("CARAPACE_CONFIG", str(tmp_path / "absent.toml"))
    assert load_config(str(explicit)).runtime.run_dir == "/explicit"


def test_load_config_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CARAPACE_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "configuration.toml")
    cfg = load_config()
    assert cfg.source == "defaults"
    assert cfg.hypervisor == HypervisorConfig()


def test_load_config_reads_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARAPACE_CONFIG", raising=False)
    default = tmp_path / "configuration.toml"
    default.write_text("[hypervisor]\naccel = 'tcg'\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", default)
    cfg = load_config()
    assert cfg.source == str(default)
    assert cfg.hypervisor.accel == "tcg"


def test_config_sections_are_independent_instances() -> None:
    a, b = Config(), Config()
    a.hypervisor.default_memory = 1
    assert b.hypervisor.default_memory == 1024


def test_hotplug_defaults_are_off_and_host_sized() -> None:
    hv = parse_config("").hypervisor
    assert hv.enable_cpu_memory_hotplug is False
    assert (hv.default_maxvcpus, hv.default_maxmemory) == (0, 0)


def test_hotplug_keys_are_applied() -> None:
    hv = parse_config(
        "[hypervisor]\nenable_cpu_memory_hotplug = true\ndefault_maxvcpus = 4\n"
        "default_maxmemory = 8192\n"
    ).hypervisor
    assert hv.enable_cpu_memory_hotplug is True
    assert (hv.default_maxvcpus, hv.default_maxmemory) == (4, 8192)


@pytest.mark.parametrize(
    ("toml", "seen"),
    [
        ("enable_cpu_memory_hotplug = 1", "1 is a int; expected a bool"),
        ("enable_cpu_memory_hotplug = 'yes'", "'yes' is a str; expected a bool"),
        ("default_maxmemory = 8.5", "8.5 is a float; expected a int"),
        ("default_maxmemory = -1", "default_maxmemory: -1; accepted: 0"),
        ("default_maxvcpus = -2", "default_maxvcpus: -2; accepted: 0"),
    ],
)
def test_hotplug_keys_are_checked(toml: str, seen: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_config(f"[hypervisor]\n{toml}\n")
    assert seen in str(exc.value)


def test_sandbox_cgroup_prefix_ours_or_katas() -> None:
    assert parse_config("").runtime.sandbox_cgroup_prefix == "carapace-sandbox-"
    cfg = parse_config('[runtime]\nsandbox_cgroup_prefix = "kata-sandbox-"\n')
    assert cfg.runtime.sandbox_cgroup_prefix == "kata-sandbox-"
    with pytest.raises(InvalidArgument, match="accepted: carapace-sandbox-, kata-sandbox-"):
        parse_config('[runtime]\nsandbox_cgroup_prefix = "x-"\n')


def test_sandbox_cgroup_only_default_and_legacy() -> None:
    assert parse_config("").runtime.sandbox_cgroup_only is True
    cfg = parse_config(
        '[runtime]\nsandbox_cgroup_only = false\ncontainer_cgroup_prefix = "kata_"\n'
    )
    assert (cfg.runtime.sandbox_cgroup_only, cfg.runtime.container_cgroup_prefix) == (
        False,
        "kata_",
    )


@pytest.mark.parametrize("fs", ["virtio-fs", "virtio-9p"])
def test_shared_fs_accepted(fs: str) -> None:
    assert parse_config(f"[hypervisor]\nshared_fs = {fs!r}\n").hypervisor.shared_fs == fs


def test_shared_fs_default_and_refused() -> None:
    assert parse_config("").hypervisor.shared_fs == "virtio-fs"
    with pytest.raises(InvalidArgument, match="shared_fs: '9p'; accepted: virtio-fs, virtio-9p"):
        parse_config("[hypervisor]\nshared_fs = '9p'\n")


# -- hostile or mistaken values (issue 14) -------------------------------------------------


def test_enable_annotations_default_is_openeulers_sizing_keys() -> None:
    assert Config().hypervisor.enable_annotations == ["^sandbox_cpu$", "^sandbox_mem$"]
    cfg = parse_config('[hypervisor]\nenable_annotations = ["files_limit", "^default_"]\n')
    assert cfg.hypervisor.enable_annotations == ["files_limit", "^default_"]
    assert (
        parse_config("[hypervisor]\nenable_annotations = []\n").hypervisor.enable_annotations == []
    )


@pytest.mark.parametrize(
    ("toml", "seen"),
    [
        ('enable_annotations = ["("]', "enable_annotations[0]: '('"),
        ('enable_annotations = ["a{4294967296}"]', "not a regular expression"),
        ("enable_annotations = [1]", "enable_annotations[0]: 1 is not a string"),
        ('enable_annotations = "sandbox_cpu"', "is a str; expected a list"),
        ("default_vcpus = 1e400", "accepted: a finite number"),
        ("default_vcpus = nan", "accepted: a finite number"),
        ("default_memory = 99999999999999999999", "accepted: a 64-bit integer"),
        ("boot_timeout = -1.0", "a positive number of seconds"),
        ('kernel_params = "a\\u0000b"', "NUL"),
    ],
)
def test_hostile_values_are_refused_naming_the_key(toml: str, seen: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_config(f"[hypervisor]\n{toml}\n")
    assert seen in str(e.value)


@pytest.mark.parametrize(
    "text",
    ["[hypervisor]\ndefault_memory = " + "9" * 5000, "a = " + "[" * 5000],
)
def test_toml_that_python_cannot_read_is_invalid_argument(text: str) -> None:
    # before: ValueError (an int of 5000 digits) and RecursionError escaped
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        parse_config(text)


def test_kill_timeout_default_and_bounds() -> None:
    """[runtime] kill_timeout: how long a SIGKILL waits for the guest before the shim
    stops the VM (issue 14, item 8)."""
    assert config.parse_config("").runtime.kill_timeout == 10.0
    assert config.parse_config("[runtime]\nkill_timeout = 2.5\n").runtime.kill_timeout == 2.5
    for bad in ("0", "-1", "3601", "nan", "inf"):
        with pytest.raises(InvalidArgument, match="kill_timeout"):
            config.parse_config(f"[runtime]\nkill_timeout = {bad}\n")
