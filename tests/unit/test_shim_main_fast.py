"""What the shim binary does for containerd's start and delete, which containerd runs
(and waits for) once per container: a pod whose shim serves it is left to that shim,
and the log lines carry milliseconds."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from carapace.errors import InvalidArgument
from carapace.protocols.containerd import shim_pb2 as api
from carapace.sandbox.state import Runstate, SandboxRecord
from carapace.shim.command import ShimArgs
from carapace.shim.daemon import logrus_time
from carapace.shim.main import SHIM_FILE, checked_pod_id, cmd_delete


def test_logrus_time_has_milliseconds_in_utc() -> None:
    assert logrus_time(1764186538.1239) == "2025-11-26T19:48:58.123Z"
    assert logrus_time(0.9999) == "1970-01-01T00:00:00.999Z"


def test_a_valid_pod_id_passes() -> None:
    assert checked_pod_id("a" * 64) == "a" * 64


@pytest.mark.parametrize("bad", ["", "../run/victim", "-x", "a" * 77])
def test_an_invalid_pod_id_says_what_is_accepted(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="is not valid; accepted: 1-76 characters"):
        checked_pod_id(bad)


def test_delete_leaves_a_pod_its_shim_serves_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Even a record naming a dead owner: the shim answering on the pod's socket is
    the one that releases the pod."""
    run = tmp_path / "run"
    (tmp_path / "carapace.toml").write_text(f'[runtime]\nrun_dir = "{run}"\n')
    monkeypatch.setenv("CARAPACE_CONFIG", str(tmp_path / "carapace.toml"))
    pod_dir = run / "p1"
    pod_dir.mkdir(parents=True)
    dead = os.fork()
    if dead == 0:  # pragma: no cover - the child
        os._exit(0)
    os.waitpid(dead, 0)
    SandboxRecord(id="p1", run_dir=str(pod_dir), state=Runstate.RUNNING, owner_pid=dead).save()
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.1.0", "process": {"args": ["sh"]}, "root": {"path": "rootfs"}}
    (bundle / "config.json").write_text(json.dumps(spec))
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))
        s.listen(1)
        (bundle / SHIM_FILE).write_text(json.dumps({"socket": str(sock), "config": None}))
        args = ShimArgs(
            namespace="default",
            address=str(tmp_path / "containerd.sock"),
            id="p1",
            bundle=str(bundle),
            action="delete",
        )
        assert cmd_delete(args) == 0
        assert sock.exists()
    assert pod_dir.exists()
    out, _ = capsysbinary.readouterr()
    assert api.DeleteResponse.FromString(out).exit_status == 137


def test_start_and_delete_leave_the_sandbox_package_unimported(tmp_path: Path) -> None:
    """Importing the shim's program costs what start and delete need, not the whole
    host side (the sandbox package, asyncio, logging, protobuf): a fresh interpreter
    tells."""
    import subprocess

    heavy = ("carapace.sandbox", "carapace.shim.service", "asyncio", "logging", "google")
    code = (
        f"import sys, carapace.shim.main; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_a_container_joining_its_pods_shim_answers_without_protobuf(tmp_path: Path) -> None:
    """containerd runs start for every container of a pod: one whose pod's shim
    serves answers the shim's address; its runtime options (the pod's, already in
    force) are not parsed, so garbage there is no error and protobuf stays unimported."""
    import subprocess

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {
        "ociVersion": "1.1.0",
        "process": {"args": ["sh"]},
        "root": {"path": "rootfs"},
        "annotations": {"io.kubernetes.cri.sandbox-id": "p" * 64},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    sock = tmp_path / "pod.sock"
    code = (
        "import sys, carapace.shim.main as m; from carapace.shim.command import ShimArgs; "
        f"m.socket_path = lambda *a: {str(sock)!r}; m._read_stdin = lambda: b'garbage'; "
        f"rc = m.cmd_start(ShimArgs(namespace='k8s.io', address='/c.sock', id='c1', "
        f"bundle={str(bundle)!r})); "
        "print(); print(rc, sorted(x for x in sys.modules if x.startswith('google')))"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))
        s.listen(4)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    address, status = r.stdout.splitlines()
    assert address == f"unix://{sock}"
    assert status == "0 []"
    assert json.loads((bundle / SHIM_FILE).read_text()) == {"socket": str(sock), "config": None}
    assert (bundle / "address").read_text() == f"unix://{sock}"
