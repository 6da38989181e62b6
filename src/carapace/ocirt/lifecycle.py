"""runc's lifecycle verbs over the pod's sandbox service: create, start, run, state,
kill, delete (see ``carapace.ocirt`` for the whole picture)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.empty_pb2 import Empty

from carapace import linux
from carapace.errors import AlreadyExists, CarapaceError, InvalidArgument, NotFound, StateError
from carapace.hostinfo import is_host_namespace
from carapace.oci import Bundle
from carapace.oci.bundle import write_config
from carapace.ocirt import holder as holders
from carapace.ocirt import service
from carapace.ocirt.bundlespec import (
    check_hooks,
    holder_namespaces,
    hook_state,
    pod_of,
    runc_state,
    service_spec,
)
from carapace.ocirt.hooks import run_hooks
from carapace.ocirt.layout import ContainerState, Root, pid_alive, rfc3339
from carapace.protocols.containerd import shim_pb2 as api
from carapace.protocols.containerd import task_types_pb2 as tt
from carapace.resources import check_namespaces
from carapace.sandbox.plan import check_id
from carapace.ttrpc import Code

log = logging.getLogger("carapace.ocirt")

STATUS_NAMES = {tt.CREATED: "created", tt.RUNNING: "running", tt.PAUSED: "paused"}
#: How long ``delete --force`` waits for a killed container to exit.
KILL_WAIT = 30.0
#: How long a status waits for the pod's service to answer.
STATE_WAIT = 30.0
#: The service's answers to State that mean the container is gone: it does not know
#: it, or the service ended under the call.
GONE_CODES = (Code.NOT_FOUND, Code.UNAVAILABLE)


@dataclass
class Globals:
    """runc's global flags, as carapace uses them."""

    root: Root
    config_path: str | None = None
    debug: bool = False

    def run_root(self, pod: str) -> str:
        return service.run_root_of(self.root, pod, self.config_path)


def write_pid_file(path: str, pid: int) -> None:
    """Atomically, as runc does (a reader never sees an empty file)."""
    target = Path(path).absolute()
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)


def send_console(console_socket: str, master: int) -> None:
    """Hand the pty master to whoever listens on ``--console-socket`` (runc's way:
    one message carrying one descriptor)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(console_socket)
            socket.send_fds(s, [b"/dev/ptmx"], [master])
        except OSError as e:
            raise InvalidArgument(
                f"--console-socket {console_socket}: cannot send the terminal: {e.strerror}"
            ) from e


def status_of(g: Globals, st: ContainerState) -> str:
    """runc's status of the container: the service's, and stopped once its host
    process is gone (that is what the engine waits on) or the service does not know
    it or is gone. A service that does not answer is an error, not a status: a
    container said to be stopped while it runs misleads the engine."""
    if st.status == "creating":
        return "creating"
    if not pid_alive(st.pid):
        return "stopped"
    sock = g.root.socket(st.pod)
    try:
        resp = service.call(
            sock, "State", api.StateRequest(id=st.id), api.StateResponse, STATE_WAIT
        )
    except service.ServiceError as e:
        if e.code in GONE_CODES:
            return "stopped"
        raise StateError(
            f"container {st.id}: the pod's service at {sock} did not tell its state: {e}"
        ) from e
    except NotFound:  # nothing listens: the service ended, the pod's VM with it
        return "stopped"
    return STATUS_NAMES.get(resp.status, "stopped")


def _remove_container_dir(g: Globals, cid: str) -> None:
    cdir = g.root.container_dir(cid)
    for m in reversed(linux.mounts_under(str(cdir))):
        with contextlib.suppress(OSError):
            linux.umount(m, lazy=True)
    if linux.mounts_under(str(cdir)):
        raise StateError(f"container {cid}: {cdir} still has mounts; left in place")
    shutil.rmtree(cdir, ignore_errors=True)


# -- create ---------------------------------------------------------------------------


def create(
    g: Globals,
    cid: str,
    bundle_path: str,
    pid_file: str | None,
    console_socket: str | None,
    preserve_fds: int = 0,
) -> holders.Holder:
    """runc create: the container exists (its pod's VM up) and its host process waits
    for ``start``. Returns the host process's handle (its pid is in the pid file)."""
    check_id(cid, "container id")
    if preserve_fds:
        raise InvalidArgument(
            f"--preserve-fds {preserve_fds}: descriptors cannot be passed into a pod VM; "
            "accepted: 0"
        )
    bundle = Bundle.load(bundle_path, check_rootfs=True, rootfs_inside=False)
    spec = bundle.spec
    pod, member = pod_of(spec, cid)
    check_id(pod, f"container {cid}: pod id")
    check_namespaces(spec.namespaces, cid, is_host_namespace)
    hooks = check_hooks(spec.to_dict(), cid)
    if spec.terminal and not console_socket:
        raise InvalidArgument(
            f"container {cid}: process.terminal is true but no --console-socket was given; "
            "accepted: --console-socket PATH with a terminal"
        )
    g.root.ensure()
    with g.root.lock(cid):
        cdir = g.root.container_dir(cid)
        try:
            cdir.mkdir(mode=0o700)
        except FileExistsError:
            raise AlreadyExists(f"container with id exists: {cid}") from None
        state = ContainerState(
            id=cid,
            pod=pod,
            bundle=str(bundle.path),
            rootfs=str(bundle.rootfs),
            annotations=dict(spec.annotations),
            hooks={k: v for k, v in hooks.items() if k in ("poststart", "poststop")},
        )
        g.root.save(state)
        master = slave = -1
        holder: holders.Holder | None = None
        started_pod = False
        try:
            sock = g.root.socket(pod)
            if member and not service.connectable(sock):
                raise NotFound(
                    f"container {cid}: its pod {pod} has no sandbox service under {g.root.path} "
                    "(create the pod's infra container first)"
                )
            if spec.terminal:
                master, slave = os.openpty()
                holders.make_raw(slave)
            holder = holders.fork(holder_namespaces(spec), slave)
            sbundle = cdir / "bundle"
            (sbundle / "rootfs").mkdir(parents=True)
            sdata = service_spec(spec, cid, pod, holder.pid)
            write_config(sbundle, sdata)
            hstate = hook_state(cid, "created", holder.pid, str(bundle.path), spec.annotations)
            run_hooks("prestart", hooks, hstate)
            run_hooks("createRuntime", hooks, {**hstate, "status": "creating"})
            if not member:
                started_pod = _start_pod(g, pod)
            stdio = holders.StdioPlan.make(holder.pid, slave, str(cdir / "io."))
            stdin, stdout, stderr = stdio.paths
            req = api.CreateTaskRequest(
                id=cid,
                bundle=str(sbundle),
                terminal=spec.terminal,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
            )
            req.rootfs.add(type="bind", source=str(bundle.rootfs), options=["rbind"])
            service.call(sock, "Create", req, api.CreateTaskResponse)
            if console_socket:
                send_console(console_socket, master)
            if pid_file:
                write_pid_file(pid_file, holder.pid)
            state.pid = holder.pid
            state.status = "created"
            state.created = rfc3339()
            g.root.save(state)
            holder.go(str(sock), cid, "", stdio)
            return holder
        except BaseException:
            if holder is not None:
                holder.abort()
            if started_pod:
                service.stop(g.root, pod, g.run_root(pod))
            _remove_container_dir(g, cid)
            g.root.forget_lock(cid)
            raise
        finally:
            for fd in (master, slave):
                if fd >= 0:
                    os.close(fd)


def _start_pod(g: Globals, pod: str) -> bool:
    """Start the pod's service (a stale one's leftovers released first)."""
    with g.root.pod_lock(pod):
        if service.connectable(g.root.socket(pod)):
            raise AlreadyExists(f"pod {pod} has a sandbox service already")
        if g.root.pod_dir(pod).exists():
            service.release_sandbox(pod, g.run_root(pod))
            service.remove_pod_dir(g.root, pod)
        service.start(g.root, pod, g.config_path, g.debug)
    return True


# -- start, run -------------------------------------------------------------------------


def start(g: Globals, cid: str) -> None:
    with g.root.lock(cid):
        st = g.root.load(cid)
        if st.status != "created" or not pid_alive(st.pid):
            status = "stopped" if st.status == "created" else st.status
            raise StateError(f"cannot start a container that has {status}: {cid}")
        # the service knows whether it started already, and says why it cannot
        service.call(g.root.socket(st.pod), "Start", api.StartRequest(id=cid), api.StartResponse)
    try:
        run_hooks("poststart", st.hooks, _hook_state(st, "running"))
    except CarapaceError as e:
        log.warning("container %s: %s", cid, e)


def _hook_state(st: ContainerState, status: str) -> dict[str, Any]:
    return hook_state(st.id, status, st.pid, st.bundle, st.annotations)


def run(
    g: Globals,
    cid: str,
    bundle_path: str,
    pid_file: str | None,
    console_socket: str | None,
    detach: bool,
    keep: bool,
    preserve_fds: int = 0,
) -> int:
    """runc run: create and start; in the foreground, wait and delete (unless
    ``keep``), exiting with the container's status."""
    holder = create(g, cid, bundle_path, pid_file, console_socket, preserve_fds)
    try:
        start(g, cid)
    except BaseException:
        with contextlib.suppress(CarapaceError):
            delete(g, cid, force=True)
        raise
    if detach:
        return 0
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    for sig in forwarded:
        signal.signal(sig, lambda s, _f: os.kill(holder.pid, s))
    _, wstatus = os.waitpid(holder.pid, 0)
    for sig in forwarded:
        signal.signal(sig, signal.SIG_DFL)
    status = os.waitstatus_to_exitcode(wstatus)
    status = 128 - status if status < 0 else status
    if not keep:
        delete(g, cid, force=True)
    return status


# -- state, kill, delete --------------------------------------------------------------------


def state(g: Globals, cid: str) -> dict[str, Any]:
    st = g.root.load(cid)
    return runc_state(
        cid,
        status_of(g, st),
        st.pid,
        st.bundle,
        st.rootfs,
        st.created,
        st.annotations,
        st.owner,
    )


def kill(g: Globals, cid: str, sig: int, all_processes: bool) -> None:
    st = g.root.load(cid)
    if status_of(g, st) == "stopped":
        raise StateError("container not running")
    service.call(
        g.root.socket(st.pod),
        "Kill",
        api.KillRequest(id=cid, signal=sig, all=all_processes),
        Empty,
    )


def delete(g: Globals, cid: str, force: bool) -> None:
    """runc delete: the container is removed from its pod (and the pod's VM stopped
    with its last container); ``force`` kills it first. Nothing of it stays."""
    check_id(cid, "container id")
    with g.root.lock(cid):
        if not g.root.exists(cid):
            if force:
                g.root.forget_lock(cid)
                return
            raise NotFound(f"container {cid} does not exist")
        st = g.root.load(cid)
        try:
            status = status_of(g, st)
        except StateError:
            if not force:
                raise
            status = "unknown"  # killed below all the same
        if status in ("running", "paused") and not force:
            raise StateError(f"cannot delete container {cid} that is not stopped: {status}")
        sock = g.root.socket(st.pod)
        if status != "stopped" or pid_alive(st.pid):
            with contextlib.suppress(CarapaceError):
                service.call(
                    sock, "Kill", api.KillRequest(id=cid, signal=signal.SIGKILL, all=True), Empty
                )
            with contextlib.suppress(CarapaceError):
                service.call(
                    sock, "Wait", api.WaitRequest(id=cid), api.WaitResponse, timeout=KILL_WAIT
                )
        with contextlib.suppress(CarapaceError):
            service.call(sock, "Delete", api.DeleteRequest(id=cid), api.DeleteResponse, 120)
        _end_processes([st.pid, *st.execs.values()])
        try:
            run_hooks("poststop", st.hooks, _hook_state(st, "stopped"))
        except CarapaceError as e:
            log.warning("container %s: %s", cid, e)
        _remove_container_dir(g, cid)
        g.root.forget_lock(cid)
    others = [c for c in g.root.container_ids() if _pod_of_state(g, c) == st.pod]
    if not others:
        with g.root.pod_lock(st.pod):
            service.stop(g.root, st.pod, g.run_root(st.pod))


def _pod_of_state(g: Globals, cid: str) -> str:
    try:
        return g.root.load(cid).pod
    except CarapaceError:
        return ""


def _end_processes(pids: list[int]) -> None:
    """The host processes of a deleted container must not outlive it."""
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
