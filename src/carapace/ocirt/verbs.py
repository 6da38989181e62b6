"""runc's other verbs over the pod's sandbox service: exec, ps, pause, resume, update,
list, events, features, spec."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty

from carapace import __version__
from carapace.errors import CarapaceError, InvalidArgument, StateError
from carapace.oci import Bundle
from carapace.oci.bundle import write_config
from carapace.oci.files import CONFIG_FILE
from carapace.oci.spec import default_spec, parse_env
from carapace.ocirt import holder as holders
from carapace.ocirt import service
from carapace.ocirt.bundlespec import GUEST_HOOKS, HOST_HOOKS
from carapace.ocirt.layout import pid_alive
from carapace.ocirt.lifecycle import (
    Globals,
    send_console,
    state,
    status_of,
    write_pid_file,
)
from carapace.protocols import contract
from carapace.protocols.containerd import metrics_pb2
from carapace.protocols.containerd import shim_pb2 as api

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


# -- exec ---------------------------------------------------------------------------------


def exec_process(
    g: Globals,
    cid: str,
    process: dict[str, Any],
    detach: bool,
    pid_file: str | None,
    console_socket: str | None,
) -> int:
    """runc exec: run ``process`` in the running container. Detached, a host process
    stands for it (its pid in the pid file) and this returns 0; in the foreground this
    process stands for it and returns its exit status."""
    st = g.root.load(cid)
    status = status_of(g, st)
    if status != "running":
        raise StateError(f"cannot exec in a container that is {status}: {cid}")
    terminal = bool(process.get("terminal"))
    if terminal and not console_socket:
        raise InvalidArgument(
            f"exec in {cid}: a terminal needs --console-socket; accepted: --console-socket "
            "PATH with --tty"
        )
    exec_id = secrets.token_hex(8)
    sock = g.root.socket(st.pod)
    cdir = g.root.container_dir(cid)
    master = slave = -1
    holder: holders.Holder | None = None
    stdio: holders.StdioPlan | None = None
    try:
        if terminal:
            master, slave = os.openpty()
            holders.make_raw(slave)
        if detach:
            holder = holders.fork([], slave)
        stand_in = holder.pid if holder is not None else os.getpid()
        stdio = holders.StdioPlan.make(stand_in, slave, str(cdir / f"io.{exec_id}."))
        stdin, stdout, stderr = stdio.paths
        req = api.ExecProcessRequest(
            id=cid,
            exec_id=exec_id,
            terminal=terminal,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            spec=AnyPb(type_url=PROCESS_URL, value=json.dumps(process).encode()),
        )
        service.call(sock, "Exec", req, Empty)
        try:
            service.call(
                sock, "Start", api.StartRequest(id=cid, exec_id=exec_id), api.StartResponse
            )
        except BaseException:
            with contextlib.suppress(CarapaceError):
                service.call(
                    sock, "Delete", api.DeleteRequest(id=cid, exec_id=exec_id), api.DeleteResponse
                )
            raise
        if console_socket:
            send_console(console_socket, master)
        if pid_file:
            write_pid_file(pid_file, stand_in)
        if holder is not None:
            with g.root.lock(cid):
                current = g.root.load(cid)
                current.execs = {k: v for k, v in current.execs.items() if pid_alive(v)}
                current.execs[exec_id] = holder.pid
                g.root.save(current)
            holder.go(str(sock), cid, exec_id, stdio)
            return 0
        return holders.stand_in(stdio, str(sock), cid, exec_id)
    except BaseException:
        if holder is not None:
            holder.abort()
        if stdio is not None:
            stdio.remove()
        raise
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)


def exec_spec(
    g: Globals,
    cid: str,
    process_file: str | None,
    args: list[str],
    tty: bool,
    cwd: str | None,
    env: list[str],
    user: str | None,
    no_new_privs: bool,
) -> dict[str, Any]:
    """The process of ``exec``: ``--process FILE`` (``-`` for stdin), else the
    container's own process with the command line's args and overrides."""
    if process_file:
        try:
            text = os.read(0, 1 << 20) if process_file == "-" else Path(process_file).read_bytes()
            process = json.loads(text)
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"--process {process_file}: cannot read a process: {e}") from e
        if not isinstance(process, dict) or not isinstance(process.get("args"), list):
            raise InvalidArgument(f"--process {process_file}: not a process object with args")
        return process
    if not args:
        raise InvalidArgument("exec: no command given; accepted: --process FILE or a command")
    process = Bundle.load(g.root.container_dir(cid) / "bundle", check_rootfs=False).spec.process
    process["args"] = list(args)
    process["terminal"] = tty
    if cwd:
        process["cwd"] = cwd
    if env:
        process["env"] = list(process.get("env") or []) + parse_env(env)
    if user:
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise InvalidArgument(f"--user {user!r}; accepted: UID[:GID] (numbers)")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if no_new_privs:
        process["noNewPrivileges"] = True
    return process


# -- ps, pause, resume, update ------------------------------------------------------------


def ps(g: Globals, cid: str) -> list[int]:
    """The host processes standing for the container's processes (its own and its
    running execs'): the processes themselves live in the pod's VM."""
    st = g.root.load(cid)
    return [pid for pid in [st.pid, *st.execs.values()] if pid_alive(pid)]


def ps_table(pids: list[int]) -> str:
    if not pids:
        return "UID          PID    PPID  C STIME TTY          TIME CMD\n"
    proc = subprocess.run(
        ["ps", "-f", "-p", ",".join(map(str, pids))], capture_output=True, text=True, check=False
    )
    return proc.stdout


def pause(g: Globals, cid: str, resume: bool) -> None:
    st = g.root.load(cid)
    method = "Resume" if resume else "Pause"
    req: Any = api.ResumeRequest(id=cid) if resume else api.PauseRequest(id=cid)
    service.call(g.root.socket(st.pod), method, req, Empty)


#: runc update's flags → (linux.resources section, field, parse)
UPDATE_FLAGS: dict[str, tuple[str, str]] = {
    "cpu_period": ("cpu", "period"),
    "cpu_quota": ("cpu", "quota"),
    "cpu_share": ("cpu", "shares"),
    "cpuset_cpus": ("cpu", "cpus"),
    "cpuset_mems": ("cpu", "mems"),
    "memory": ("memory", "limit"),
    "memory_reservation": ("memory", "reservation"),
    "memory_swap": ("memory", "swap"),
    "pids_limit": ("pids", "limit"),
    "blkio_weight": ("blockIO", "weight"),
}


def update_resources(resources_arg: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """linux.resources from ``--resources FILE|-`` and runc's single-value flags."""
    resources: dict[str, Any] = {}
    if resources_arg:
        try:
            text = os.read(0, 1 << 20) if resources_arg == "-" else Path(resources_arg).read_bytes()
            resources = json.loads(text or b"{}")
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"--resources {resources_arg}: cannot read resources: {e}") from e
        if not isinstance(resources, dict):
            raise InvalidArgument(f"--resources {resources_arg}: not a JSON object")
    for name, value in flags.items():
        if value is None:
            continue
        section, key = UPDATE_FLAGS[name]
        if key not in ("cpus", "mems"):
            value = _size(value, name) if section == "memory" else _int(value, name)
        resources.setdefault(section, {})[key] = value
    return resources


def _int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"--{flag.replace('_', '-')} {value!r}: not an integer") from None


def _size(value: str, flag: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = value.strip().lower().removesuffix("b")
    mult = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(number) * mult
    except ValueError:
        raise InvalidArgument(
            f"--{flag.replace('_', '-')} {value!r}: not a size; accepted: e.g. 512m, 1g, -1"
        ) from None


def update(g: Globals, cid: str, resources: dict[str, Any]) -> None:
    st = g.root.load(cid)
    req = api.UpdateTaskRequest(
        id=cid, resources=AnyPb(type_url=RESOURCES_URL, value=json.dumps(resources).encode())
    )
    service.call(g.root.socket(st.pod), "Update", req, Empty)


# -- list, events --------------------------------------------------------------------------


def list_states(g: Globals) -> list[dict[str, Any]]:
    out = []
    for cid in g.root.container_ids():
        with contextlib.suppress(CarapaceError):
            out.append(state(g, cid))
    return out


def list_table(states: list[dict[str, Any]]) -> str:
    rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
    rows += [
        (s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"] or "root")
        for s in states
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join(
        "   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows
    )


def stats_event(g: Globals, cid: str) -> dict[str, Any]:
    """One ``events --stats`` document: the container's cgroup figures from the guest."""
    st = g.root.load(cid)
    resp = service.call(g.root.socket(st.pod), "Stats", api.StatsRequest(id=cid), api.StatsResponse)
    metrics = metrics_pb2.Metrics()
    metrics.ParseFromString(resp.stats.value)
    data = json_format.MessageToDict(metrics, preserving_proto_field_name=True)
    return {"type": "stats", "id": cid, "data": data}


def events(g: Globals, cid: str, once: bool, interval: float, write: Any) -> None:
    while True:
        write(json.dumps(stats_event(g, cid)) + "\n")
        if once:
            return
        time.sleep(interval)


# -- features, spec ----------------------------------------------------------------------------


def features() -> dict[str, Any]:
    """What this runtime supports, in runc's ``features`` schema."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": contract.OCI_VERSION,
        "hooks": list(HOST_HOOKS),
        "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": {"v1": True, "v2": True, "systemd": False},
            "selinux": {"enabled": False},
            "apparmor": {"enabled": False},
        },
        "annotations": {
            "org.opencontainers.runc.version": __version__,
            "io.carapace.runtime": "pod VM (QEMU) per pod",
            "io.carapace.hooks.refused": ",".join(GUEST_HOOKS),
        },
    }


def write_spec(bundle: str | None) -> Path:
    """runc spec: a default config.json in the bundle (refusing to overwrite one)."""
    path = Path(bundle or ".") / CONFIG_FILE
    if path.exists():
        raise InvalidArgument(f"{path} exists already; remove it first")
    return write_config(path.parent, default_spec(["sh"], terminal=True))
