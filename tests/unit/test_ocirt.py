"""The OCI runtime CLI's pure parts: runc's command lines as Docker and Podman write
them, the bundle rewriting for the pod's service, the state under --root."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from carapace.errors import InvalidArgument, NotFound, StateError
from carapace.oci import Spec
from carapace.ocirt import bundlespec, cli, lifecycle, verbs
from carapace.ocirt.layout import ContainerState, Root, rfc3339
from carapace.protocols import contract


def spec(**extra: Any) -> Spec:
    data: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/"},
        "root": {"path": "/var/lib/engine/rootfs"},
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network"},
                {"type": "ipc"},
                {"type": "uts", "path": "/proc/77/ns/uts"},
                {"type": "mount"},
            ]
        },
    }
    data.update(extra)
    return Spec.from_dict(data)


# -- command lines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        # Docker, through containerd's runc shim
        ["--root", "/run/d/runtime-carapace/moby", "--log", "/b/log.json", "--log-format",
         "json", "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "abc"],
        ["--root", "/r", "--log", "/b/log.json", "--log-format", "json", "exec", "--process",
         "/tmp/p.json", "--detach", "--pid-file", "/b/x.pid", "--console-socket", "/s", "abc"],
        ["--root", "/r", "kill", "--all", "abc", "9"],
        ["--root", "/r", "update", "--resources", "-", "abc"],
        ["--root", "/r", "ps", "--format", "json", "abc"],
        ["--root", "/r", "delete", "--force", "abc"],
        # Podman, through conmon
        ["create", "--bundle", "/b", "--pid-file", "/p", "--console-socket", "/s", "abc"],
        ["exec", "--pid-file", "/p", "--process", "/f", "--detach", "--tty",
         "--console-socket", "/s", "abc"],
        ["update", "--resources=/f", "abc"],
        ["--log-format=json", "--log", "/l", "kill", "abc", "SIGTERM"],
        ["--systemd-cgroup", "start", "abc"],
    ],
)  # fmt: skip
def test_the_engines_command_lines_parse(argv: list[str]) -> None:
    a = cli.build_parser().parse_args(argv)
    assert a.id == "abc"


def test_exec_takes_a_command_after_the_id() -> None:
    a = cli.build_parser().parse_args(["exec", "--tty", "abc", "sh", "-c", "echo hi"])
    assert (a.tty, cli._exec_args(a)) == (True, ["sh", "-c", "echo hi"])


def test_an_unknown_flag_is_an_error_naming_it() -> None:
    with pytest.raises(InvalidArgument, match="--frobnicate"):
        cli.build_parser().parse_args(["create", "--frobnicate", "abc"])


@pytest.mark.parametrize(
    ("text", "number"),
    [("9", 9), ("15", 15), ("KILL", 9), ("SIGKILL", 9), ("term", 15), ("SIGUSR1", 10)],
)
def test_signals_by_number_and_name(text: str, number: int) -> None:
    assert cli.parse_signal(text) == number


@pytest.mark.parametrize("text", ["0", "99", "SIGNOPE", "-9", "9x", "SIG_DFL", "Signals"])
def test_a_bad_signal_names_what_is_accepted(text: str) -> None:
    with pytest.raises(InvalidArgument, match="accepted: a number"):
        cli.parse_signal(text)


@pytest.mark.parametrize(
    ("argv", "runc"),
    [
        (["create", "--bundle", "b", "x"], True),
        (["--root", "/r", "run", "x"], True),
        (["--debug", "kill", "x", "9"], True),
        (["--config", "c.toml", "delete", "x"], True),
        (["--version"], True),
        (["checkpoint", "x"], True),
        (["run", "--", "echo"], False),
        (["--debug", "run", "--", "true"], False),
        (["--config", "c.toml", "run", "--", "true"], False),
        (["check"], False),
        (["guest", "build"], False),
        (["stats", "x"], False),
        ([], False),
    ],
)
def test_carapace_dispatches_runc_verbs_and_keeps_its_own(argv: list[str], runc: bool) -> None:
    assert cli.is_runc_call(argv) is runc


def test_errors_go_to_the_log_as_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.json"
    rc = cli.main(["--root", str(tmp_path / "r"), "--log", str(log), "--log-format", "json",
                   "kill", "nosuch", "9"])  # fmt: skip
    assert rc == 1
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["level"] == "error" and "does not exist" in line["msg"]
    assert "does not exist" in capsys.readouterr().err


def test_delete_force_of_an_unknown_container_succeeds(tmp_path: Path) -> None:
    assert cli.main(["--root", str(tmp_path / "r"), "delete", "--force", "nosuch"]) == 0
    assert cli.main(["--root", str(tmp_path / "r"), "delete", "nosuch"]) == 1


def test_checkpoint_is_refused_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["checkpoint", "x"]) == 1
    assert "checkpoints are not supported" in capsys.readouterr().err


def test_version_and_features(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert f"spec: {contract.OCI_VERSION}" in capsys.readouterr().out
    f = verbs.features()
    assert "createContainer" not in f["hooks"] and "prestart" in f["hooks"]


# -- the bundle the service gets --------------------------------------------------------------


def test_a_container_is_its_own_pod_unless_it_names_one() -> None:
    assert bundlespec.pod_of(spec(), "c1") == ("c1", False)
    member = spec(
        annotations={bundlespec.CRIO_CONTAINER_TYPE: "container", bundlespec.CRIO_SANDBOX_ID: "p"}
    )
    assert bundlespec.pod_of(member, "c1") == ("p", True)
    infra = spec(annotations={bundlespec.CRIO_CONTAINER_TYPE: "sandbox"})
    assert bundlespec.pod_of(infra, "c1") == ("c1", False)


def test_the_service_spec_of_a_pod_names_the_stand_ins_network() -> None:
    data = bundlespec.service_spec(spec(hooks={"prestart": []}), "c1", "c1", 4242)
    assert data["root"]["path"] == "rootfs"
    assert "hooks" not in data
    assert data["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "network", "path": "/proc/4242/ns/net"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    assert contract.CRI_SANDBOX_ID not in data["annotations"]


def test_the_service_spec_of_a_member_is_marked_with_cris_annotations() -> None:
    data = bundlespec.service_spec(spec(), "m1", "p1", 4242)
    assert data["annotations"][contract.CRI_SANDBOX_ID] == "p1"
    assert data["annotations"][contract.CRI_CONTAINER_TYPE] == "container"
    # the member's host paths stay for the service, which joins the pod's namespaces
    assert {"type": "uts", "path": "/proc/77/ns/uts"} in data["linux"]["namespaces"]


def test_the_stand_in_takes_the_network_ipc_and_uts_namespaces() -> None:
    assert bundlespec.holder_namespaces(spec()) == [
        ("net", ""),
        ("ipc", ""),
        ("uts", "/proc/77/ns/uts"),
    ]


@pytest.mark.parametrize(
    ("hooks", "error"),
    [
        ({"startContainer": [{"path": "/bin/x"}]}, "hooks.startContainer would run"),
        ({"createContainer": [{"path": "/bin/x"}]}, "hooks.createContainer would run"),
        ({"prestart": [{"path": "bin/x"}]}, "not absolute"),
        ({"prestart": [{"args": ["x"]}]}, "needs a path"),
        ({"prestart": [{"path": "/x", "timeout": 0}]}, "must be positive"),
        ({"prestart": [{"path": "/x", "args": "x"}]}, "args is not a list"),
        ({"onTuesday": []}, "unknown hook kind"),
        ({"prestart": {}}, "is not a list"),
    ],
)
def test_hooks_that_cannot_run_are_refused(hooks: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        bundlespec.check_hooks({"hooks": hooks}, "c1")


def test_host_hooks_are_kept_by_kind() -> None:
    hooks = {"prestart": [{"path": "/x"}], "poststop": [], "createRuntime": [{"path": "/y"}]}
    assert bundlespec.check_hooks({"hooks": hooks}, "c1") == {
        "prestart": [{"path": "/x"}],
        "createRuntime": [{"path": "/y"}],
    }


def test_runc_state_reports_pid_0_once_stopped() -> None:
    s = bundlespec.runc_state("c", "stopped", 99, "/b", "/r", "t", {"a": "b"})
    assert (s["pid"], s["status"], s["annotations"]) == (0, "stopped", {"a": "b"})
    assert bundlespec.runc_state("c", "running", 99, "/b", "/r", "t", {})["pid"] == 99
    with pytest.raises(ValueError, match="accepted"):
        bundlespec.runc_state("c", "dancing", 99, "/b", "/r", "t", {})


# -- update's resources ----------------------------------------------------------------------


def test_update_merges_flags_into_the_resources(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"cpu": {"shares": 512}}))
    flags = {name: None for name in verbs.UPDATE_FLAGS}
    flags |= {"memory": "512m", "cpu_quota": "50000", "cpuset_cpus": "0-1"}
    assert verbs.update_resources(str(f), flags) == {
        "cpu": {"shares": 512, "quota": 50000, "cpus": "0-1"},
        "memory": {"limit": 512 << 20},
    }


@pytest.mark.parametrize(("flag", "value"), [("memory", "lots"), ("cpu_quota", "1.5")])
def test_update_names_a_bad_flag_value(flag: str, value: str) -> None:
    flags: dict[str, Any] = {name: None for name in verbs.UPDATE_FLAGS} | {flag: value}
    with pytest.raises(InvalidArgument, match=f"--{flag.replace('_', '-')} '{value}'"):
        verbs.update_resources(None, flags)


# -- state under --root ---------------------------------------------------------------------------


def test_states_round_trip_and_bad_ones_are_refused(tmp_path: Path) -> None:
    root = Root(tmp_path)
    root.ensure()
    st = ContainerState(id="c1", pod="c1", bundle="/b", rootfs="/r", pid=5, created=rfc3339())
    root.container_dir("c1").mkdir()
    root.save(st)
    assert root.load("c1") == st
    assert root.container_ids() == ["c1"]
    with pytest.raises(NotFound, match="does not exist"):
        root.load("c2")
    for bad in ({"id": "../x"}, {"pid": "5"}, {"execs": {"e": "1"}}, {"pod": "a\n"}):
        (root.container_dir("c1") / "state.json").write_text(json.dumps(st.to_dict() | bad))
        with pytest.raises(InvalidArgument):
            root.load("c1")
    with pytest.raises(InvalidArgument, match="container id"):
        root.container_dir("../etc")


def test_signal_numbers_forwarded_by_the_stand_in_are_catchable() -> None:
    from carapace.ocirt.holder import FORWARDED

    assert signal.SIGKILL not in FORWARDED and signal.SIGSTOP not in FORWARDED


def test_hooks_outside_the_runc_command_line_are_refused_not_dropped() -> None:
    from carapace.sandbox.containers import check_no_hooks

    check_no_hooks(spec(hooks={"prestart": []}), "c1")
    with pytest.raises(InvalidArgument, match=r"hooks.poststop, hooks.prestart cannot run"):
        check_no_hooks(
            spec(hooks={"prestart": [{"path": "/x"}], "poststop": [{"path": "/y"}]}), "c1"
        )


def test_cgroup_v1_fields_left_unset_are_dropped_and_set_ones_refused() -> None:
    from carapace.resources import for_guest

    docker = {"memory": {"limit": 1 << 27, "kernel": 0, "kernelTCP": None}, "cpu": {
        "quota": 50000, "realtimeRuntime": 0, "realtimePeriod": 0}}  # fmt: skip
    assert for_guest(docker, "c1") == {"memory": {"limit": 1 << 27}, "cpu": {"quota": 50000}}
    assert docker["memory"]["kernel"] == 0  # the caller's document is left as it was
    with pytest.raises(InvalidArgument, match=r"linux.resources.memory.kernel 4096: a cgroup v1"):
        for_guest({"memory": {"kernel": 4096}}, "c1")


def test_a_service_that_does_not_answer_is_an_error_not_a_stopped_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container whose service is gone is stopped; one whose service does not answer
    State in time may well run: saying "stopped" made engines refuse to exec in it."""
    g = lifecycle.Globals(Root(tmp_path / "root"))
    sock = tmp_path / "service.sock"
    monkeypatch.setattr(g.root, "socket", lambda pod: sock)
    monkeypatch.setattr(lifecycle, "STATE_WAIT", 0.2)
    alive = os.getpid()  # the container's host process runs
    st = ContainerState(id="c1", pod="p1", bundle="/b", rootfs="/r", pid=alive, status="created")
    assert lifecycle.status_of(g, st) == "stopped"  # nobody listens: the service is gone
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(str(sock))
        stuck.listen(8)  # connections are queued, never answered
        with pytest.raises(StateError, match=r"c1: the pod's service at .* did not tell its state"):
            lifecycle.status_of(g, st)
