"""`carapace install containerd` on temporary containerd configs."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from carapace.cli.install import (
    CARAPACE_CONFIG_PATH,
    CRI_PLUGIN,
    RUNTIME_TYPE,
    SNIPPET,
    install_containerd,
    plan_containerd_install,
)
from carapace.cli.main import main
from carapace.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]
ALLOW = ["io.katacontainers.*", "com.github.containers.virtcontainers.*", "io.carapace.*"]

EXISTING = """\
# the node's containerd config
version = 2
root = "/var/lib/containerd"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
        runtime_type = "io.containerd.kata.v2"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def runtimes(path: Path) -> dict[str, Any]:
    data = tomllib.loads(path.read_text())
    result: dict[str, Any] = data["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]
    return result


def assert_carapace_registered(path: Path) -> None:
    rt = runtimes(path)["carapace"]
    assert rt["runtime_type"] == RUNTIME_TYPE
    assert rt["pod_annotations"] == ALLOW
    assert rt["container_annotations"] == ALLOW
    assert rt["options"] == {"ConfigPath": CARAPACE_CONFIG_PATH}


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "containerd" / "config.toml"
    plan = install_containerd(path)
    assert plan.created and plan.changes
    assert tomllib.loads(path.read_text())["version"] == 2
    assert_carapace_registered(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert files_in(path.parent) == ["config.toml"]


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(EXISTING)
    assert install_containerd(path).changes
    first = path.read_bytes()
    inode = path.stat().st_ino
    plan = install_containerd(path)
    assert not plan.changes
    assert plan.notes == []
    assert path.read_bytes() == first
    assert path.stat().st_ino == inode  # not even rewritten


def test_keeps_other_runtimes_settings_and_text(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(EXISTING)
    before = tomllib.loads(EXISTING)
    install_containerd(path)
    text = path.read_text()
    assert text.startswith(EXISTING)  # comments and layout untouched: the snippet is appended
    assert text.endswith(SNIPPET)
    after = tomllib.loads(text)
    del after["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]["carapace"]
    assert after == before
    assert set(runtimes(path)) == {"runc", "kata", "carapace"}
    assert_carapace_registered(path)


def test_keeps_permissions_and_writes_atomically(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(EXISTING)
    path.chmod(0o600)
    inode = path.stat().st_ino
    install_containerd(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert files_in(tmp_path) == ["config.toml"]  # no temporary file left


def test_file_without_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('version = 2\nroot = "/x"')
    install_containerd(path)
    assert tomllib.loads(path.read_text())["root"] == "/x"
    assert_carapace_registered(path)


@pytest.mark.parametrize(
    ("text", "seen"),
    [
        ('version = 1\nroot = "/x"\n', "version = 1"),
        ('root = "/x"\n', "no version key"),
        ("version = 3\n", "version = 3"),
    ],
)
def test_other_versions_are_refused(tmp_path: Path, text: str, seen: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=seen) as e:
        install_containerd(path)
    assert str(path) in str(e.value)
    assert "nothing was written" in str(e.value)
    assert path.read_text() == text


def test_unparseable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = "version = 2\n[plugins\n"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match="is not valid TOML") as e:
        install_containerd(path)
    assert str(path) in str(e.value)
    assert path.read_text() == text
    assert files_in(tmp_path) == ["config.toml"]


def test_inline_runtimes_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = (
        "version = 2\n"
        f'[plugins."{CRI_PLUGIN}".containerd]\n'
        'runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n'
    )
    path.write_text(text)
    with pytest.raises(InvalidArgument, match="by hand"):
        install_containerd(path)
    assert path.read_text() == text


def test_a_different_carapace_runtime_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = (
        "version = 2\n"
        f'[plugins."{CRI_PLUGIN}".containerd.runtimes.carapace]\n'
        'runtime_type = "io.containerd.runc.v2"\n'
    )
    path.write_text(text)
    with pytest.raises(InvalidArgument, match="already has a CRI runtime 'carapace'"):
        install_containerd(path)
    assert path.read_text() == text


def test_an_existing_carapace_runtime_with_other_settings_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = (
        "version = 2\n"
        f'[plugins."{CRI_PLUGIN}".containerd.runtimes.carapace]\n'
        f'runtime_type = "{RUNTIME_TYPE}"\n'
    )
    path.write_text(text)
    plan = install_containerd(path)
    assert not plan.changes
    assert path.read_text() == text
    [note] = plan.notes
    assert "container_annotations, options, pod_annotations" in note


def test_disabled_cri_plugin_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('version = 2\ndisabled_plugins = ["cri"]\n')
    plan = install_containerd(path)
    assert plan.changes
    assert any("disables the CRI plugin" in n for n in plan.notes)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    plan = install_containerd(missing, dry_run=True)
    assert plan.created and plan.new_text is not None
    assert not missing.exists()
    path = tmp_path / "config.toml"
    path.write_text(EXISTING)
    plan = install_containerd(path, dry_run=True)
    assert plan.new_text == EXISTING + "\n" + SNIPPET
    assert path.read_text() == EXISTING


def test_plan_is_pure() -> None:
    plan = plan_containerd_install(Path("/nonexistent/config.toml"), None)
    assert plan.new_text == "version = 2\n\n" + SNIPPET
    assert not Path("/nonexistent").exists()


def test_deploy_snippet_is_the_one_installed() -> None:
    assert (REPO / "deploy" / "containerd-carapace.toml").read_text() == SNIPPET


def test_runtimeclass_names_the_handler() -> None:
    lines = (REPO / "deploy" / "runtimeclass.yaml").read_text().splitlines()
    body = [line for line in lines if line and not line.lstrip().startswith("#")]
    assert "apiVersion: node.k8s.io/v1" in body
    assert "kind: RuntimeClass" in body
    assert "  name: carapace" in body
    assert "handler: carapace" in body
    assert '    memory: "372Mi"' in body
    assert '    cpu: "20m"' in body


# -- the command ----------------------------------------------------------------------


def test_cli_install_then_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(EXISTING)
    assert main(["install", "containerd", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"updated {path}" in out
    assert "restart containerd" in out
    assert main(["install", "containerd", "--config", str(path)]) == 0
    assert "already registered" in capsys.readouterr().out
    assert_carapace_registered(path)


def test_cli_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    assert main(["install", "containerd", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would create {path}" in out
    assert 'runtime_type = "io.containerd.carapace.v2"' in out
    assert not path.exists()


def test_cli_error_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text("version = 1\n")
    assert main(["install", "containerd", "--config", str(path)]) == 125
    err = capsys.readouterr().err
    assert err.startswith("carapace: ") and str(path) in err


def test_cli_does_not_read_carapace_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # carapace's own --config (configuration.toml) is not confused with containerd's
    broken = tmp_path / "configuration.toml"
    broken.write_text("[no-such-section]\n")
    monkeypatch.setenv("CARAPACE_CONFIG", str(broken))
    path = tmp_path / "config.toml"
    argv = ["--config", str(broken), "install", "containerd", "--config", str(path)]
    assert main(argv) == 0
    assert_carapace_registered(path)
    assert os.path.exists(path)
