"""``containerd-shim-carapace-v2``: the binary containerd runs for runtime
``io.containerd.carapace.v2``.

    shim [flags] start    print the pod's shim socket address (starting the shim)
    shim [flags] delete   clean up after a shim that died; print a DeleteResponse
    shim [flags]          (the daemon ``start`` spawns) serve the task API
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

from carapace.errors import CarapaceError, InvalidArgument, NotFound
from carapace.oci.files import (
    CONFIG_FILE,
    annotations_of,
    object_field,
    read_config,
    resolve_root,
    string_field,
)
from carapace.protocols.contract import ID_RE, pod_id_of
from carapace.shim.command import (
    LISTEN_FD_ENV,
    SOCKET_DIR,
    ShimArgs,
    connectable,
    parse_args,
    socket_path,
)

TYPE_CHECKING = False  # read as True by the type checker; typing is not imported
if TYPE_CHECKING:
    from typing import Any

# containerd runs this program for every container's start and delete, and waits for
# it (a pod's StopPodSandbox waits for a delete per container): those actions import
# only what they need, each where it is needed; the serving daemon (carapace.shim.daemon)
# imports the rest. A container joining its pod's running shim reads its bundle and
# answers; protobuf is imported only to start a pod's shim and to answer a delete.

#: What ``start`` leaves in each bundle for ``delete``: the socket and configuration.
SHIM_FILE = "carapace-shim.json"
#: Exit status ``delete`` reports for a task whose shim died (as runc's shim: SIGKILL).
DEAD_SHIM_STATUS = 128 + 9  # SIGKILL (the signal module is not imported for a constant)


class BundleView:
    """What start and delete read of a bundle: the container's pod and its rootfs (not
    required to exist yet). The whole spec is checked by the serving shim's Create."""

    def __init__(self, container_id: str, annotations: dict[str, str], rootfs: Path) -> None:
        self.pod = pod_id_of(annotations, container_id)
        self.rootfs = rootfs


def read_bundle(bundle: Path, container_id: str) -> BundleView | None:
    """``bundle``'s view, or None when it has no config.json (then the container is its
    own pod). Its annotations and root.path are checked as ``carapace.oci.Bundle`` does,
    in the same words; the rootfs must lie in the bundle."""
    try:
        config = read_config(bundle / CONFIG_FILE)
    except NotFound:
        return None
    where = f"bundle {bundle.absolute()}"
    if not isinstance(config, dict):
        raise InvalidArgument(f"{where}: {CONFIG_FILE} is not a JSON object")
    root = string_field(object_field(config, "root", where, "root"), "path", where, "root.path")
    rootfs = resolve_root(bundle.absolute(), root or "rootfs", inside=True)
    return BundleView(container_id, annotations_of(config, where), rootfs)


def config_path_from_options(data: bytes) -> str | None:
    """The configuration file named by the runtime options containerd wrote on stdin
    (a marshalled ``Any`` of ``runtimeoptions.v1.Options``), if any."""
    if not data:
        return None
    from google.protobuf.any_pb2 import Any as AnyPb
    from google.protobuf.message import DecodeError

    from carapace.shim.params import config_path_of

    any_opts = AnyPb()
    try:
        any_opts.ParseFromString(data)
    except DecodeError as e:
        raise InvalidArgument(f"cannot parse the runtime options on stdin: {e}") from e
    return config_path_of(any_opts)


def _read_stdin() -> bytes:
    try:
        if os.isatty(0):
            return b""
        return sys.stdin.buffer.read()
    except (OSError, ValueError):
        return b""


def _announce(bundle: Path, sock: str, config_path: str | None) -> int:
    address = f"unix://{sock}"
    (bundle / "address").write_text(address)
    (bundle / SHIM_FILE).write_text(json.dumps({"socket": sock, "config": config_path}) + "\n")
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0


def _self() -> list[str]:
    """How the daemon runs this program: by its script (so ``ps`` and containerd's
    tools see ``containerd-shim-carapace-v2``), else as a module."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script).startswith("containerd-shim-") and os.path.isfile(script):
        return [script]
    return ["-m", "carapace.shim"]


def cmd_start(args: ShimArgs) -> int:
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    loaded = read_bundle(bundle, args.id)
    pod = checked_pod_id(loaded.pod if loaded is not None else args.id)
    options = _read_stdin()
    sock = socket_path(args.address, args.namespace, pod)
    if connectable(sock):
        # the pod's shim runs already, with the pod's configuration (one runtime handler
        # per pod): this container joins it; its options are not parsed (the pod's
        # sandbox container, whose start made the shim, records the configuration)
        return _announce(bundle, sock, None)
    config_path = config_path_from_options(options) or os.environ.get("CARAPACE_CONFIG")
    if pod != args.id:
        raise InvalidArgument(
            f"container {args.id}: the shim of its pod {pod} is not running (no {sock})"
        )
    os.makedirs(SOCKET_DIR, mode=0o711, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)  # stale: nobody answers on it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(sock)
        os.chmod(sock, 0o600)  # before it listens: only root connects, whatever the umask
        listener.listen(128)
        env = dict(os.environ)
        env[LISTEN_FD_ENV] = str(listener.fileno())
        if config_path:
            env["CARAPACE_CONFIG"] = config_path
        argv = [sys.executable, *_self(), "-namespace", args.namespace]
        argv += ["-id", pod, "-address", args.address, "-socket", sock]
        if args.debug:
            argv.append("-debug")
        import subprocess

        subprocess.Popen(
            argv,
            cwd=bundle,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(listener.fileno(),),
            start_new_session=True,
        )
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(sock)
        raise
    finally:
        listener.close()
    return _announce(bundle, sock, config_path)


def checked_pod_id(pod: str) -> str:
    """``pod`` if it is a valid pod id (``ID_RE``), else InvalidArgument saying what is
    accepted (``check_id``'s words; the sandbox package is imported only then)."""
    if isinstance(pod, str) and ID_RE.fullmatch(pod):
        return pod
    from carapace.sandbox.plan import check_id

    return check_id(pod, "pod id")


def release_dead_owners_pod(pod: str, config_path: str | None) -> None:
    """Release the VM, mounts and run dir of ``pod`` if the process that made it is
    gone (what is wrong is said on stderr)."""
    from carapace.config import load_config

    config = load_config(config_path)
    run_dir = Path(config.runtime.run_dir) / pod
    if not run_dir.exists():
        return  # released already (by its shim, as it should be)
    from carapace.sandbox.state import STATE_FILE, SandboxRecord, pid_alive, release

    rec: SandboxRecord | None = None
    if (run_dir / STATE_FILE).exists():
        try:
            rec = SandboxRecord.load(run_dir)
        except (OSError, ValueError, TypeError) as e:
            print(f"carapace shim delete: unreadable {run_dir / STATE_FILE}: {e}", file=sys.stderr)
    if rec is not None and not pid_alive(rec.owner_pid):
        problems = release(rec, config.runtime.run_dir)
        if problems:
            print(f"carapace shim delete: {'; '.join(problems)}", file=sys.stderr)


def cmd_delete(args: ShimArgs) -> int:
    """Clean up what a dead shim left for this container: the rootfs mount in the
    bundle, and the pod's VM, mounts and run dir if the pod's shim is gone."""
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    try:
        loaded = read_bundle(bundle, args.id)
    except InvalidArgument as e:  # clean up what can be found without it
        print(f"carapace shim delete: {e}", file=sys.stderr)
        loaded = None
    pod = loaded.pod if loaded is not None else args.id
    try:
        checked_pod_id(pod)  # from an annotation: checked here as in start
    except InvalidArgument as e:
        print(f"carapace shim delete: {e}", file=sys.stderr)
        pod = ""
    rootfs = loaded.rootfs if loaded is not None else bundle / "rootfs"
    from carapace import linux

    with contextlib.suppress(OSError):
        while linux.is_mountpoint(str(rootfs)):
            linux.umount(str(rootfs), lazy=True)
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((bundle / SHIM_FILE).read_text())
    sock = meta.get("socket") or (pod and socket_path(args.address, args.namespace, pod))
    # a pod whose shim still answers is that shim's to clean up (it owns the VM and the
    # run dir): only a dead shim's leftovers are released here
    if not (sock and connectable(sock)):
        if pod:
            release_dead_owners_pod(pod, meta.get("config") or None)
        if sock and os.path.exists(sock):
            with contextlib.suppress(OSError):
                os.unlink(sock)
    from carapace.protocols.containerd import shim_pb2 as api

    resp = api.DeleteResponse(exit_status=DEAD_SHIM_STATUS)
    resp.exited_at.GetCurrentTime()
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.version:
            from carapace import __version__

            print(f"containerd-shim-carapace-v2 {__version__}")
            return 0
        if args.action == "start":
            return cmd_start(args)
        if args.action == "delete":
            return cmd_delete(args)
        if LISTEN_FD_ENV not in os.environ:
            raise InvalidArgument(
                "no action given; accepted: start, delete (the serving mode is started by start)"
            )
        import asyncio

        from carapace.shim.daemon import serve

        return asyncio.run(serve(args))
    except CarapaceError as e:
        print(f"containerd-shim-carapace-v2: {e}", file=sys.stderr)
        return 1
