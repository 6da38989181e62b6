"""The default OCI spec (carapace.oci.spec); bundle loading is in test_oci_bundle.py."""

from __future__ import annotations

import json

import pytest

from carapace.errors import InvalidArgument
from carapace.oci.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    default_spec,
    parse_env,
    process_spec,
)


def test_process_spec_args_and_defaults() -> None:
    args = ["sh", "-c", "echo hi"]
    p = process_spec(args)
    assert p["args"] == ["sh", "-c", "echo hi"]
    assert p["args"] is not args  # a copy: the caller's list is not shared
    assert p["cwd"] == "/"
    assert p["terminal"] is False
    assert p["env"] == [DEFAULT_PATH, "TERM=dumb"]
    assert p["user"] == {"uid": 0, "gid": 0}
    assert p["noNewPrivileges"] is True
    for kind in ("bounding", "effective", "permitted"):
        assert p["capabilities"][kind] == DEFAULT_CAPABILITIES
    assert "CAP_SYS_ADMIN" not in DEFAULT_CAPABILITIES


def test_process_spec_env_cwd_terminal() -> None:
    p = process_spec(["top"], env=["A=1", "B=", "C=x=y"], cwd="/work", terminal=True)
    assert p["terminal"] is True
    assert p["env"] == [DEFAULT_PATH, "TERM=xterm", "A=1", "B=", "C=x=y"]
    assert p["cwd"] == "/work"


def test_process_spec_terminal_sets_term() -> None:
    assert "TERM=xterm" in process_spec(["sh"], terminal=True)["env"]
    assert "TERM=xterm" not in process_spec(["sh"], terminal=False)["env"]
    assert "TERM=dumb" in process_spec(["sh"], terminal=False)["env"]


@pytest.mark.parametrize("bad", ["FOO", "=bar", "=", "A B=c", ""])
def test_env_parse_errors(bad: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        process_spec(["sh"], env=["OK=1", bad])
    msg = str(exc.value)
    assert repr(bad) in msg
    assert "KEY=VALUE" in msg


def test_parse_env_returns_valid_items() -> None:
    assert parse_env(["A=1", "PATH=/bin"]) == ["A=1", "PATH=/bin"]
    assert parse_env([]) == []


@pytest.mark.parametrize("cwd", ["tmp", "./x", "", "~/x"])
def test_relative_workdir_rejected(cwd: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        process_spec(["sh"], cwd=cwd)
    assert repr(cwd) in str(exc.value)
    assert "absolute" in str(exc.value)


def test_empty_command_rejected() -> None:
    with pytest.raises(InvalidArgument, match="no command given"):
        process_spec([])
    with pytest.raises(InvalidArgument, match="no command given"):
        default_spec([])


def test_default_spec() -> None:
    spec = default_spec(["echo", "hi"], env=["X=1"], cwd="/tmp", hostname="box")
    assert spec["ociVersion"] == "1.0.2"
    assert spec["process"] == process_spec(["echo", "hi"], env=["X=1"], cwd="/tmp")
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    assert spec["hostname"] == "box"
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests[:2] == ["/proc", "/dev"]
    assert {"/dev/pts", "/dev/shm", "/sys", "/tmp"} <= set(dests)
    assert len(dests) == len(set(dests))
    # a mount is made only after its parent
    for i, d in enumerate(dests):
        for parent in dests[i + 1 :]:
            assert not d.startswith(parent.rstrip("/") + "/"), (d, parent)
    ns = [n["type"] for n in spec["linux"]["namespaces"]]
    assert set(ns) == {"pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert "/proc/sys" in spec["linux"]["readonlyPaths"]
    json.dumps(spec)  # serialisable as config.json


def test_default_spec_terminal() -> None:
    spec = default_spec(["sh"], terminal=True)
    assert spec["process"]["terminal"] is True
    assert "TERM=xterm" in spec["process"]["env"]


def test_default_spec_capability_lists_are_independent() -> None:
    caps = default_spec(["sh"])["process"]["capabilities"]
    caps["bounding"].append("CAP_SYS_ADMIN")
    assert "CAP_SYS_ADMIN" not in DEFAULT_CAPABILITIES
    assert "CAP_SYS_ADMIN" not in default_spec(["sh"])["process"]["capabilities"]["bounding"]
