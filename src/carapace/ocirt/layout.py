"""Where the OCI runtime CLI keeps its state under ``--root`` (runc's layout, ours).

    <root>/<id>/state.json         the container (``ContainerState``)
    <root>/<id>/bundle/            the bundle the pod's service is given (config.json
                                   rewritten by ``ocirt.bundlespec``, rootfs bound in)
    <root>/<id>/stdin              a fifo the container's host process relays stdin to
    <root>/.lock/<id>              the container's lock (flock), removed with it
    <root>/pods/<pod>/pod.json     the pod's sandbox service (``PodState``)
    /run/carapace-shim/<hash>.sock its task API (containerd's, over ttrpc; ``socket``)
    <root>/pods/<pod>/service.log  its log

Everything is checked: ids by ``check_id`` before they become paths, state files are
read as data (types checked) and never trusted to name a path outside the root.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from carapace.errors import InvalidArgument, NotFound
from carapace.sandbox.plan import check_id
from carapace.shim.command import SOCKET_DIR, socket_path

DEFAULT_ROOT = "/run/carapace-oci"
STATE_FILE = "state.json"
POD_FILE = "pod.json"
PODS = "pods"
LOCKS = ".lock"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees the old document or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{what}: no {path}") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{what}: unreadable {path}: {e}") from e
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what}: {path} is not a JSON object")
    return data


def _typed(cls: type[Any], data: dict[str, Any], what: str) -> dict[str, Any]:
    """The fields of ``cls`` found in ``data``, each of its declared type."""
    kinds: dict[str, type | tuple[type, ...]] = {
        "str": str,
        "int": int,
        "float": (int, float),
        "bool": bool,
    }
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kind = kinds.get(str(f.type))
        wrong_bool = isinstance(value, bool) and kind is not bool
        if kind is not None and (not isinstance(value, kind) or wrong_bool):
            raise InvalidArgument(f"{what}: field {f.name} is {value!r}, not a {f.type}")
        out[f.name] = value
    return out


@dataclass
class ContainerState:
    """One container, as the CLI recorded it."""

    id: str
    pod: str
    bundle: str  # the engine's bundle
    rootfs: str
    created: str = ""  # RFC 3339
    pid: int = 0  # the container's host process (the pid file's)
    status: str = "creating"  # creating | created (later states come from the service)
    owner: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    #: exec id → its host process's pid (detached execs still running)
    execs: dict[str, int] = field(default_factory=dict)
    #: the spec's hooks that run on the host (poststart, poststop), as given
    hooks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str) -> ContainerState:
        values = _typed(cls, data, what)
        for key in ("id", "pod", "bundle", "rootfs"):
            if key not in values:
                raise InvalidArgument(f"{what}: no {key}")
        check_id(values["id"], f"{what}: id")
        check_id(values["pod"], f"{what}: pod")
        for key in ("annotations", "execs", "hooks"):
            if not isinstance(values.get(key, {}), dict):
                raise InvalidArgument(f"{what}: field {key} is not an object")
        execs = values.get("execs", {})
        if not all(isinstance(k, str) and type(v) is int for k, v in execs.items()):
            raise InvalidArgument(f"{what}: execs must map exec ids to pids")
        return cls(**values)


@dataclass
class PodState:
    """A pod's sandbox service."""

    id: str
    pid: int = 0  # the service's pid
    config: str = ""  # the carapace configuration file it was started with

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str) -> PodState:
        values = _typed(cls, data, what)
        if "id" not in values:
            raise InvalidArgument(f"{what}: no id")
        check_id(values["id"], f"{what}: id")
        return cls(**values)


class Root:
    """The state directory given by ``--root``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()

    def ensure(self) -> None:
        for d in (self.path, self.path / PODS, self.path / LOCKS, Path(SOCKET_DIR)):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)

    # -- containers -------------------------------------------------------------------

    def container_dir(self, cid: str) -> Path:
        return self.path / check_id(cid, "container id")

    def exists(self, cid: str) -> bool:
        return (self.container_dir(cid) / STATE_FILE).is_file()

    def load(self, cid: str) -> ContainerState:
        what = f"container {cid}"
        path = self.container_dir(cid) / STATE_FILE
        if not path.is_file():
            raise NotFound(f"container {cid} does not exist")
        state = ContainerState.from_dict(_read_json(path, what), what)
        if state.id != cid:
            raise InvalidArgument(f"{what}: {path} names container {state.id}")
        return state

    def save(self, state: ContainerState) -> None:
        _write_json(self.container_dir(state.id) / STATE_FILE, state.to_dict())

    def container_ids(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(
            p.name
            for p in self.path.iterdir()
            if p.name not in (PODS, LOCKS) and (p / STATE_FILE).is_file()
        )

    def lock(self, cid: str) -> contextlib.AbstractContextManager[None]:
        """The container's lock: verbs on one container take turns (runc's too)."""
        self.ensure()
        return _flock(self.path / LOCKS / check_id(cid, "container id"))

    def forget_lock(self, cid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / LOCKS / cid).unlink()

    # -- pods ---------------------------------------------------------------------------

    def pod_dir(self, pod: str) -> Path:
        return self.path / PODS / check_id(pod, "pod id")

    def socket(self, pod: str) -> Path:
        """The pod's service socket. Not under the root: a unix socket path has at most
        107 bytes, and an engine's root plus a 64-character pod id is longer; a hash
        of both names it in the shims' socket directory."""
        check_id(pod, "pod id")
        return Path(socket_path(str(self.path), "carapace-oci", pod))

    def load_pod(self, pod: str) -> PodState | None:
        path = self.pod_dir(pod) / POD_FILE
        if not path.is_file():
            return None
        what = f"pod {pod}"
        state = PodState.from_dict(_read_json(path, what), what)
        return state if state.id == pod else None

    def save_pod(self, state: PodState) -> None:
        _write_json(self.pod_dir(state.id) / POD_FILE, asdict(state))

    def pod_lock(self, pod: str) -> contextlib.AbstractContextManager[None]:
        """Starting and stopping a pod's service take turns."""
        self.ensure()
        return _flock(self.path / LOCKS / f"pod.{check_id(pod, 'pod id')}")

    def forget_pod_lock(self, pod: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / LOCKS / f"pod.{pod}").unlink()


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rfc3339(t: float | None = None) -> str:
    """A timestamp as runc's state prints it (UTC, nanoseconds)."""
    t = time.time() if t is None else t
    secs = int(t)
    nanos = int((t - secs) * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{nanos:09d}Z"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")
