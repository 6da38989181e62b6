"""What becomes of each mount of a container's spec in a pod VM (pure: facts in, a
plan out).

A VM cannot see the host's paths, so every bind of a host path is either shared into
the guest through the pod's share, made by the guest itself (memory-backed volumes),
or refused with an error naming it. Nothing is dropped:

- **guest mounts** (proc, sysfs, tmpfs, devpts, mqueue, cgroup): made by crun in the
  guest as the spec says;
- **shared binds**: a host directory or regular file, bound into the share
  (``<shared>/<container>/volumes/<n>``, nodev and nosuid) and bound from there in the
  guest. Read-only as runc does it: ``ro`` makes the bind read-only and leaves the
  mounts below it (``rbind``) with their own flags (CRI's non-recursive read-only);
  ``rro`` makes them read-only too. Where a writable mount lies below a read-only
  bind, the host's mounts enforce it and the guest's bind stays writable, since the
  guest sees the volume as one filesystem. Propagation as kubelet asks: ``rprivate``
  (mountPropagation None, and the default) never shows a mount the host makes later
  under the source; ``rslave`` (HostToContainer) does, through the share;
  ``rshared`` (Bidirectional) is refused: a mount made in the VM cannot reach the
  host;
- **ephemeral**: a bind of a host tmpfs that the engine made as the pod's memory
  (CRI's and Docker's ``/dev/shm``, kubelet's emptyDir ``medium: Memory``) becomes a
  tmpfs in the guest of the same size, one per pod and source, shared by the pod's
  containers that bind it. What the host writes into that tmpfs is not seen;
- **refused**: what would hand the guest the host itself (``/``, ``/proc``, ``/sys``,
  ``/dev``, carapace's own directories and their parents), what cannot cross a VM
  boundary (device nodes, sockets, FIFOs), a propagation the share cannot honour, a
  mount type the guest cannot make.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from carapace import linux
from carapace.errors import InvalidArgument
from carapace.oci.bundle import Mount
from carapace.protocols import contract

#: Mount types crun makes in the guest without a host path.
GUEST_MOUNT_TYPES = ("proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2")
#: Propagation options the share honours: private (a host mount made later under a
#: volume is not seen) and slave (it is, through the share). A mount made in the guest
#: never reaches the host: the guest has its own mount table.
PROPAGATION_SUPPORTED = ("private", "rprivate", "slave", "rslave")
#: Propagation options under which a volume follows the host's later mounts.
FOLLOWS_HOST = ("slave", "rslave")
#: Kubernetes' names of the propagation options (for error messages).
KUBERNETES_PROPAGATION = {
    "rprivate": "None",
    "rslave": "HostToContainer",
    "rshared": "Bidirectional",
    "shared": "Bidirectional",
}
#: Recursive read-only (runc's ``rro``): every mount below the bind read-only too.
RECURSIVE_READONLY = "rro"
PROPAGATION_OPTIONS = (
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
)
#: Host trees a volume may not be, nor lie in.
FORBIDDEN_TREES = ("/proc", "/sys", "/dev")
#: Options of a bind that are for the host's mount call, not for the guest's.
HOST_ONLY_OPTIONS = frozenset({"bind", "rbind", "ro", RECURSIVE_READONLY, *PROPAGATION_OPTIONS})
#: kubelet's directory of a pod's emptyDir volumes.
EMPTY_DIR_MARK = "/volumes/kubernetes.io~empty-dir/"


@dataclass(frozen=True)
class SourceFacts:
    """What the host says about a bind's source."""

    path: str  # the source with symlinks resolved
    kind: str  # "dir", "file", "missing", "device", "socket", "fifo", "other"
    on_tmpfs: bool = False
    size_bytes: int = 0  # the filesystem's size (a tmpfs's size= limit)
    mode: int = 0o755  # the directory's permission bits
    has_submounts: bool = False  # a mount lies below the source


def probe_source(path: str) -> SourceFacts:
    """The host's facts about ``path`` (impure: stat, statfs and one read of the mount
    table)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return SourceFacts(real, "missing")
    m = st.st_mode
    kind = (
        "dir"
        if stat.S_ISDIR(m)
        else "file"
        if stat.S_ISREG(m)
        else "device"
        if stat.S_ISCHR(m) or stat.S_ISBLK(m)
        else "socket"
        if stat.S_ISSOCK(m)
        else "fifo"
        if stat.S_ISFIFO(m)
        else "other"
    )
    vfs = os.statvfs(real)
    table = linux.mount_table()
    return SourceFacts(
        real,
        kind,
        on_tmpfs=linux.fs_type_in(table, real) == "tmpfs",
        size_bytes=vfs.f_blocks * vfs.f_frsize,
        mode=stat.S_IMODE(m),
        has_submounts=kind == "dir" and any(p != real for p in linux.points_under(table, real)),
    )


@dataclass(frozen=True)
class SharedBind:
    """A host directory or file bound into the share for one container."""

    index: int
    source: str  # resolved
    is_dir: bool
    readonly: bool
    recursive: bool
    #: ``rro``: the mounts below the bind read-only too (``ro`` alone: the bind only)
    readonly_below: bool = False
    #: ``rslave``: a mount the host makes later under the source is seen
    follows_host: bool = False
    #: a mount lay below the source when it was shared
    has_submounts: bool = False

    @property
    def guest_readonly(self) -> bool:
        """Whether the guest's bind may be read-only too: only where nothing writable
        can be below it (the guest sees the volume as one filesystem)."""
        if not self.readonly or self.follows_host:
            return False
        return self.readonly_below or not self.recursive or not self.has_submounts

    def host_target(self, container_dir: str) -> str:
        return f"{container_dir}/volumes/{self.index}"


@dataclass(frozen=True)
class Ephemeral:
    """A tmpfs the guest makes once per pod for a memory-backed host volume."""

    key: str
    size_bytes: int
    mode: int

    @property
    def guest_path(self) -> str:
        return contract.guest_ephemeral_path(self.key)


@dataclass(frozen=True)
class MountPlan:
    """A container's mounts as the guest gets them, and what the host does first."""

    mounts: tuple[Mount, ...]
    binds: tuple[SharedBind, ...] = ()
    ephemeral: tuple[Ephemeral, ...] = ()


def _where(m: Mount) -> str:
    return f"mount at {m.destination} (source {m.source or '(none)'})"


def check_source(m: Mount, facts: SourceFacts, own_dirs: Iterable[str]) -> None:
    """Raise InvalidArgument unless ``facts`` (the resolved source of ``m``) may be
    shared with a guest."""
    path = facts.path
    if path == "/":
        raise InvalidArgument(
            f"{_where(m)}: the host's root directory cannot be shared with a pod VM; "
            "accepted: a directory or regular file below /"
        )
    for tree in FORBIDDEN_TREES:
        if linux.is_under(path, tree):
            raise InvalidArgument(
                f"{_where(m)}: {path} is in the host's {tree}, which a pod VM may not "
                f"see; accepted: a directory or regular file outside {', '.join(FORBIDDEN_TREES)}"
            )
    for own in own_dirs:
        if linux.is_under(path, own) or linux.is_under(own, path):
            raise InvalidArgument(
                f"{_where(m)}: {path} holds or is in carapace's own {own} (other pods' "
                f"files); accepted: a directory or regular file outside {own}"
            )
    if facts.kind == "missing":
        raise InvalidArgument(
            f"{_where(m)}: the source does not exist; accepted: an existing directory or "
            "regular file"
        )
    if facts.kind not in ("dir", "file"):
        raise InvalidArgument(
            f"{_where(m)}: the source is a {facts.kind}, which cannot cross into a pod VM; "
            "accepted: a directory or regular file"
        )


def check_propagation(m: Mount) -> None:
    for o in m.options:
        if o in PROPAGATION_OPTIONS and o not in PROPAGATION_SUPPORTED:
            k8s = KUBERNETES_PROPAGATION.get(o)
            named = f" (Kubernetes mountPropagation {k8s})" if k8s else ""
            raise InvalidArgument(
                f"{_where(m)}: propagation {o!r}{named} cannot be honoured: a mount made "
                "in the pod VM cannot reach the host; accepted: rprivate (None), rslave "
                "(HostToContainer)"
            )
    if RECURSIVE_READONLY in m.options and any(o in FOLLOWS_HOST for o in m.options):
        raise InvalidArgument(
            f"{_where(m)}: recursive read-only ({RECURSIVE_READONLY!r}) with propagation "
            "'rslave': a mount the host makes later would be writable; accepted: "
            f"{RECURSIVE_READONLY!r} with rprivate, or 'ro' with rslave"
        )


def is_bind(m: Mount) -> bool:
    return m.type == "bind" or "bind" in m.options or "rbind" in m.options


def is_guest_source(source: str) -> bool:
    """A bind source that already is the guest's (carapace's own guest paths)."""
    return linux.is_under(source, contract.GUEST_STATE_DIR)


def is_memory_volume(m: Mount, facts: SourceFacts) -> bool:
    """A host tmpfs that an engine made as pod memory: /dev/shm or an emptyDir."""
    if not (facts.on_tmpfs and facts.kind == "dir"):
        return False
    return m.destination.rstrip("/") == "/dev/shm" or EMPTY_DIR_MARK in facts.path + "/"


def ephemeral_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def plan_mounts(
    mounts: Iterable[Mount],
    probe: Callable[[str], SourceFacts],
    own_dirs: Iterable[str],
) -> MountPlan:
    """Decide every mount of a container (see the module's docstring); raises
    InvalidArgument naming the first mount that cannot be honoured."""
    own = tuple(own_dirs)
    out: list[Mount] = []
    binds: list[SharedBind] = []
    ephemeral: dict[str, Ephemeral] = {}
    for m in mounts:
        if not is_bind(m):
            if m.type not in GUEST_MOUNT_TYPES:
                raise InvalidArgument(
                    f"{_where(m)}: type {m.type or '(none)'!r} cannot be mounted in a pod "
                    f"VM; accepted: bind, {', '.join(GUEST_MOUNT_TYPES)}"
                )
            out.append(m)
            continue
        check_propagation(m)
        if not m.source.startswith("/"):
            raise InvalidArgument(
                f"{_where(m)}: a bind source must be an absolute host path; accepted: /PATH"
            )
        if is_guest_source(m.source) and not linux.is_under(m.source, contract.GUEST_EPHEMERAL_DIR):
            raise InvalidArgument(
                f"{_where(m)}: {contract.GUEST_STATE_DIR} is carapace's own; accepted: a "
                "host directory or regular file"
            )
        facts = probe(m.source)
        check_source(m, facts, own)
        guest_options = tuple(o for o in m.options if o not in HOST_ONLY_OPTIONS)
        readonly = "ro" in m.options or RECURSIVE_READONLY in m.options
        follows_host = any(o in FOLLOWS_HOST for o in m.options)
        if is_memory_volume(m, facts):
            if follows_host:
                raise InvalidArgument(
                    f"{_where(m)}: propagation 'rslave' (HostToContainer) on a "
                    "memory-backed volume: the pod VM has its own tmpfs for it and sees "
                    "no host mount; accepted: rprivate (None)"
                )
            if readonly:
                guest_options = ("ro", *guest_options)
            key = ephemeral_key(facts.path)
            eph = ephemeral.setdefault(key, Ephemeral(key, facts.size_bytes, facts.mode))
            out.append(Mount(m.destination, "bind", eph.guest_path, ("rbind", *guest_options)))
            continue
        bind = SharedBind(
            index=len(binds),
            source=facts.path,
            is_dir=facts.kind == "dir",
            readonly=readonly,
            recursive="bind" not in m.options,
            readonly_below=RECURSIVE_READONLY in m.options,
            follows_host=follows_host,
            has_submounts=facts.has_submounts,
        )
        binds.append(bind)
        if bind.guest_readonly:
            guest_options = ("ro", *guest_options)
        out.append(Mount(m.destination, "bind", "", ("rbind", *guest_options)))
    return MountPlan(tuple(out), tuple(binds), tuple(ephemeral.values()))


def guest_mounts(plan: MountPlan, container_id: str) -> tuple[Mount, ...]:
    """The plan's mounts with each shared bind's guest path filled in."""
    out: list[Mount] = []
    binds = iter(plan.binds)
    for m in plan.mounts:
        if m.type == "bind" and not m.source:
            b = next(binds)
            m = Mount(
                m.destination, "bind", contract.guest_volume_path(container_id, b.index), m.options
            )
        out.append(m)
    return tuple(out)


def parse_volume(text: str) -> Mount:
    """``HOST:GUEST[:ro|:rw]`` (``carapace run -v``) as a bind mount."""
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) != 2 or not all(p.startswith("/") for p in parts):
        raise InvalidArgument(
            f"volume {text!r}: accepted: HOST:GUEST[:ro|:rw] with absolute paths, e.g. "
            "/srv/data:/data:ro"
        )
    host, guest = parts
    # read-only is recursive here, as Docker's -v ...:ro is
    return Mount(guest, "bind", host, ("rbind", RECURSIVE_READONLY if mode == "ro" else mode))


def volume_mounts(volumes: Mapping[str, str]) -> tuple[Mount, ...]:
    """The Python API's ``volumes={host: "GUEST[:ro]"}`` as bind mounts."""
    return tuple(parse_volume(f"{host}:{guest}") for host, guest in volumes.items())
