"""The shim binary's one-shot parts (carapace.shim.main): the runtime options containerd
passes on stdin and ``delete`` after a dead shim; and how the task service reports
carapace's errors over ttrpc."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyPb

from carapace.errors import (
    AgentError,
    AlreadyExists,
    CarapaceError,
    HostError,
    HypervisorError,
    InvalidArgument,
    NotFound,
    StateError,
)
from carapace.protocols.containerd import runtimeoptions_pb2
from carapace.protocols.containerd import shim_pb2 as api
from carapace.protocols.contract import CRI_CONTAINER_TYPE, CRI_SANDBOX_ID
from carapace.sandbox.state import STATE_FILE, Runstate, SandboxRecord
from carapace.shim import main as shim_main
from carapace.shim.command import ShimArgs
from carapace.shim.main import SHIM_FILE, cmd_delete, config_path_from_options
from carapace.shim.service import to_ttrpc_error
from carapace.ttrpc import Code

# --- config_path_from_options ---------------------------------------------------------------


def options_any(any_type_url: str, **fields: str) -> bytes:
    opts = runtimeoptions_pb2.Options(**fields)
    return AnyPb(type_url=any_type_url, value=opts.SerializeToString()).SerializeToString()


@pytest.mark.parametrize(
    "type_url", ["runtimeoptions.v1.Options", "type.googleapis.com/runtimeoptions.v1.Options"]
)
def test_config_path_from_runtime_options(type_url: str) -> None:
    data = options_any(type_url, config_path="/etc/carapace/pod.toml")
    assert config_path_from_options(data) == "/etc/carapace/pod.toml"


def test_runtime_options_without_config_path() -> None:
    assert config_path_from_options(options_any("runtimeoptions.v1.Options")) is None
    data = options_any("runtimeoptions.v1.Options", type_url="x", config_body="a = 1")
    assert config_path_from_options(data) is None


def test_other_options_type_is_ignored() -> None:
    """runc's options (containerd.runc.v1.Options) are not ours to read."""
    data = AnyPb(type_url="containerd.runc.v1.Options", value=b"\x12\x03abc").SerializeToString()
    assert config_path_from_options(data) is None


def test_no_options() -> None:
    assert config_path_from_options(b"") is None


def test_garbage_options() -> None:
    with pytest.raises(InvalidArgument) as info:
        config_path_from_options(b"\x0a\x40not an Any")  # a length past the end
    assert "runtime options" in str(info.value)


def test_garbage_inside_runtime_options() -> None:
    data = AnyPb(type_url="runtimeoptions.v1.Options", value=b"\x12\x40short").SerializeToString()
    with pytest.raises(InvalidArgument):
        config_path_from_options(data)


# --- cmd_delete -------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def write_config(path: Path, run_dir: Path) -> Path:
    path.write_text(f'[runtime]\nrun_dir = "{run_dir}"\n')
    return path


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$CARAPACE_CONFIG names a configuration whose run_dir is in tmp_path."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("CARAPACE_CONFIG", str(write_config(tmp_path / "carapace.toml", run)))
    return run


def make_bundle(tmp_path: Path, annotations: dict[str, str] | None = None) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    spec: dict[str, Any] = {
        "ociVersion": "1.1.0",
        "process": {"args": ["sh"]},
        "root": {"path": "rootfs"},
    }
    if annotations is not None:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def make_sandbox(run: Path, pod: str, owner_pid: int) -> Path:
    d = run / pod
    d.mkdir()
    SandboxRecord(id=pod, run_dir=str(d), state=Runstate.RUNNING, owner_pid=owner_pid).save()
    (d / "console.log").write_text("left behind\n")
    return d


def delete_args(tmp_path: Path, cid: str, bundle: Path) -> ShimArgs:
    # an address of our own: the default socket path it hashes to is never a real shim's
    return ShimArgs(
        namespace="default",
        address=str(tmp_path / "containerd.sock"),
        id=cid,
        bundle=str(bundle),
        action="delete",
    )


def read_delete_response(capsysbinary: pytest.CaptureFixture[bytes]) -> api.DeleteResponse:
    out, err = capsysbinary.readouterr()
    assert err == b""
    return api.DeleteResponse.FromString(out)


def test_delete_prints_a_delete_response(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = make_bundle(tmp_path)
    before = time.time()
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    resp = read_delete_response(capsysbinary)
    assert resp.exit_status == 137
    assert resp.pid == 0
    assert resp.HasField("exited_at")
    assert before - 1 <= resp.exited_at.ToNanoseconds() / 1e9 <= time.time() + 1


def test_delete_removes_the_run_dir_of_a_dead_owner(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``ctr run``: the container is its own pod."""
    bundle = make_bundle(tmp_path)
    stale = make_sandbox(run_dir, "c1", dead_pid())
    other = make_sandbox(run_dir, "c2", dead_pid())
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    assert read_delete_response(capsysbinary).exit_status == 137
    assert not stale.exists()
    assert (other / STATE_FILE).exists()  # another pod's is not ours to clean


def test_delete_of_a_cri_container_cleans_its_pod(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = make_bundle(tmp_path, {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "pod1"})
    stale = make_sandbox(run_dir, "pod1", dead_pid())
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    assert read_delete_response(capsysbinary).exit_status == 137
    assert not stale.exists()


def test_delete_leaves_a_live_owners_run_dir(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = make_bundle(tmp_path, {CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "pod1"})
    live = make_sandbox(run_dir, "pod1", os.getpid())
    assert cmd_delete(delete_args(tmp_path, "pod1", bundle)) == 0
    assert read_delete_response(capsysbinary).exit_status == 137
    assert (live / STATE_FILE).exists()
    assert (live / "console.log").exists()


def test_delete_is_idempotent(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = make_bundle(tmp_path)
    stale = make_sandbox(run_dir, "c1", dead_pid())
    responses = []
    for _ in range(2):
        assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
        resp = read_delete_response(capsysbinary)
        resp.ClearField("exited_at")
        responses.append(resp)
    assert responses[0] == responses[1] == api.DeleteResponse(exit_status=137)
    assert not stale.exists()


def test_delete_without_a_bundle_config(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = tmp_path / "empty-bundle"
    bundle.mkdir()
    stale = make_sandbox(run_dir, "c1", dead_pid())
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    assert read_delete_response(capsysbinary).exit_status == 137
    assert not stale.exists()


def test_delete_uses_the_configuration_start_recorded(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """The bundle's carapace-shim.json names the configuration (from containerd's
    runtime options) and the socket; both win over the environment."""
    bundle = make_bundle(tmp_path)
    own_run = tmp_path / "own-run"
    own_run.mkdir()
    own_config = write_config(tmp_path / "own.toml", own_run)
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))  # nobody listens: stale
    (bundle / SHIM_FILE).write_text(json.dumps({"socket": str(sock), "config": str(own_config)}))
    recorded = make_sandbox(own_run, "c1", dead_pid())
    from_env = make_sandbox(run_dir, "c1", dead_pid())
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    assert read_delete_response(capsysbinary).exit_status == 137
    assert not recorded.exists()
    assert (from_env / STATE_FILE).exists()
    assert not sock.exists()


def test_delete_keeps_a_socket_somebody_serves(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """The pod's shim still serves its other containers: its socket stays."""
    bundle = make_bundle(tmp_path)
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))
        s.listen(1)
        (bundle / SHIM_FILE).write_text(json.dumps({"socket": str(sock), "config": None}))
        assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
        assert sock.exists()
    assert read_delete_response(capsysbinary).exit_status == 137


def test_main_delete(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """The command line containerd runs."""
    bundle = make_bundle(tmp_path)
    stale = make_sandbox(run_dir, "c1", dead_pid())
    argv = ["-namespace", "default", "-address", str(tmp_path / "containerd.sock")]
    argv += ["-publish-binary", "/usr/bin/containerd", "-id", "c1", "-bundle", str(bundle)]
    assert shim_main.main([*argv, "delete"]) == 0
    assert read_delete_response(capsysbinary).exit_status == 137
    assert not stale.exists()


@pytest.fixture
def unreadable_state(run_dir: Path) -> Path:
    d = run_dir / "c1"
    d.mkdir()
    (d / STATE_FILE).write_text('{"id": "c1", "run_')  # cut short
    return d


def test_delete_with_an_unreadable_state_file(
    tmp_path: Path, unreadable_state: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = make_bundle(tmp_path)
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    out, _ = capsysbinary.readouterr()
    assert api.DeleteResponse.FromString(out).exit_status == 137


# --- to_ttrpc_error ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotFound("container c1 not found"), Code.NOT_FOUND),
        (AlreadyExists("container c1 exists"), Code.ALREADY_EXISTS),
        (InvalidArgument("bad -id"), Code.INVALID_ARGUMENT),
        (StateError("c1 is not running"), Code.FAILED_PRECONDITION),
    ],
)
def test_known_errors_map_to_their_codes(error: CarapaceError, code: Code) -> None:
    out = to_ttrpc_error(error)
    assert out.code == code
    assert out.message == str(error)


@pytest.mark.parametrize(
    "error",
    [
        HostError("no /dev/kvm"),
        HypervisorError("QEMU exited"),
        AgentError("agent refused"),
        CarapaceError("something"),
    ],
)
def test_other_errors_are_unknown(error: CarapaceError) -> None:
    out = to_ttrpc_error(error)
    assert out.code == Code.UNKNOWN
    assert str(error) in out.message
    assert type(error).__name__ in out.message


def test_delete_checks_the_pod_id_of_the_annotation(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A sandbox-id annotation of ``..`` must not make delete release the run root's
    parent (or any other directory); it is checked as start checks it."""
    victim = make_sandbox(run_dir, "victim", dead_pid())
    bundle = make_bundle(
        tmp_path, {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "../run/victim"}
    )
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    out, err = capsysbinary.readouterr()
    assert b"pod id '../run/victim' is not valid" in err
    assert api.DeleteResponse.FromString(out).exit_status == 137
    assert (victim / STATE_FILE).exists() and run_dir.exists()


def test_delete_with_a_rootfs_outside_the_bundle_unmounts_nothing_there(
    tmp_path: Path, run_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = make_bundle(tmp_path)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"]["path"] = "/"
    (bundle / "config.json").write_text(json.dumps(spec))
    assert cmd_delete(delete_args(tmp_path, "c1", bundle)) == 0
    out, err = capsysbinary.readouterr()
    assert b"outside the bundle" in err
    assert api.DeleteResponse.FromString(out).exit_status == 137
    assert os.path.ismount("/")


# --- start: the shim's socket (issue 14, item 13) ------------------------------------------


def test_start_makes_a_0600_socket_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sock_dir = tmp_path / "s"
    seen: dict[str, Any] = {}

    class Spawned:
        def __init__(self, argv: list[str], **kw: Any) -> None:
            seen["argv"] = argv
            path = seen["sock"]
            seen["mode"] = os.stat(path).st_mode  # as the daemon finds it
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)  # listening already

    monkeypatch.setattr(shim_main, "SOCKET_DIR", str(sock_dir))
    monkeypatch.setattr(
        shim_main, "socket_path", lambda *a: seen.setdefault("sock", str(sock_dir / "p.sock"))
    )
    monkeypatch.setattr(shim_main, "_read_stdin", lambda: b"")
    monkeypatch.setattr(subprocess, "Popen", Spawned)
    bundle = make_bundle(tmp_path)
    args = ShimArgs(
        namespace="default", address=str(tmp_path / "c.sock"), id="p", bundle=str(bundle)
    )
    old = os.umask(0)
    try:
        assert shim_main.cmd_start(args) == 0
    finally:
        os.umask(old)
    assert "argv" in seen
    assert oct(seen["mode"] & 0o777) == oct(0o600)
    assert capsys.readouterr().out == f"unix://{sock_dir / 'p.sock'}"
