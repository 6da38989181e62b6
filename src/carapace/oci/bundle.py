"""The OCI spec at the edge: ``Bundle.load`` reads a bundle's ``config.json`` once and
validates what carapace reads from it; ``Spec`` is the typed, frozen view everything
past the edge uses (the shim, the sandbox, the CLI).

The whole document travels on to the guest (``Spec.to_dict``): the agent hands it to
crun, so a field carapace does not read is not lost on the way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from carapace.errors import InvalidArgument, NotFound
from carapace.oci.files import (
    CONFIG_FILE,
    annotations_of,
    field_error,
    object_field,
    read_config,
    resolve_root,
    string_field,
)
from carapace.protocols import contract
from carapace.sizing import ascii_int

#: The deepest nesting of objects and lists a spec may have: OCI's own is under 10;
#: a deeper document (a hostile one) would exhaust the recursion of whatever walks it.
MAX_DEPTH = 64


@dataclass(frozen=True)
class Namespace:
    """One entry of linux.namespaces: a type, and the path of one to join (or '')."""

    type: str
    path: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "path": self.path} if self.path else {"type": self.type}


@dataclass(frozen=True)
class Mount:
    """One entry of the spec's mounts."""

    destination: str
    type: str = ""
    source: str = ""
    options: tuple[str, ...] = ()

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or bool({"bind", "rbind"} & set(self.options))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"destination": self.destination}
        if self.type:
            out["type"] = self.type
        if self.source:
            out["source"] = self.source
        if self.options:
            out["options"] = list(self.options)
        return out


def _check_depth(data: object, where: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH (walked without recursion)."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children: list[object] = []
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        if children and depth >= MAX_DEPTH:
            raise InvalidArgument(
                f"{where}: the document is nested more than {MAX_DEPTH} levels deep; "
                f"accepted: an OCI spec (nested at most {MAX_DEPTH} levels)"
            )
        stack.extend((c, depth + 1) for c in children)


def _namespaces(linux: Mapping[str, Any], where: str) -> tuple[Namespace, ...]:
    raw = linux.get("namespaces")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise field_error(where, "linux.namespaces", raw, "a list of {type, path} objects")
    out = []
    for i, ns in enumerate(raw):
        name = f"linux.namespaces[{i}]"
        if not isinstance(ns, dict):
            raise field_error(where, name, ns, "an object with a type and an optional path")
        kind = string_field(ns, "type", where, f"{name}.type")
        if not kind:
            raise field_error(where, f"{name}.type", ns.get("type"), "a namespace type such as pid")
        out.append(Namespace(kind, string_field(ns, "path", where, f"{name}.path")))
    return tuple(out)


def _mounts(data: Mapping[str, Any], where: str) -> tuple[Mount, ...]:
    raw = data.get("mounts")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise field_error(where, "mounts", raw, "a list of mount objects")
    out = []
    for i, m in enumerate(raw):
        name = f"mounts[{i}]"
        if not isinstance(m, dict):
            raise field_error(where, name, m, "an object with a destination")
        dest = string_field(m, "destination", where, f"{name}.destination")
        if not dest.startswith("/"):
            raise field_error(where, f"{name}.destination", dest, "an absolute path")
        options = m.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise field_error(where, f"{name}.options", options, "a list of strings")
        out.append(
            Mount(
                dest,
                string_field(m, "type", where, f"{name}.type"),
                string_field(m, "source", where, f"{name}.source"),
                tuple(options),
            )
        )
    return tuple(out)


def _files_limit(resources: Mapping[str, Any], where: str) -> int | None:
    files = resources.get("files")
    if files is None:
        return None
    name = "linux.resources.files.limit (--files-limit)"
    if not isinstance(files, dict):
        raise field_error(where, "linux.resources.files", files, "an object with a limit")
    raw = files.get("limit")
    if raw is None:
        return None
    n = ascii_int(raw)
    if n is None or n < 0:
        raise field_error(
            where, name, raw, "0 (fs.file-max / 400) or a positive number of open files"
        )
    return n


@dataclass(frozen=True)
class Spec:
    """A validated OCI runtime spec. Typed fields for what carapace reads; ``to_dict``
    gives the whole document (a copy) for the guest."""

    _data: Mapping[str, Any] = field(repr=False)
    annotations: Mapping[str, str]
    hostname: str
    root_path: str
    terminal: bool
    cgroups_path: str
    namespaces: tuple[Namespace, ...]
    #: linux.resources as the spec gives them (parsed by ``carapace.resources``).
    resources: Mapping[str, Any] | None
    #: linux.resources.files.limit (openEuler's ``--files-limit``), checked.
    files_limit: int | None
    mounts: tuple[Mount, ...] = ()

    @classmethod
    def from_dict(cls, data: object, where: str = "spec") -> Spec:
        """Validate ``data`` (a parsed config.json); wrong types raise InvalidArgument
        naming the field, the value and what is accepted."""
        if not isinstance(data, dict):
            raise field_error(where, "the document", type(data).__name__, "a JSON object")
        _check_depth(data, where)
        process = data.get("process")
        if not isinstance(process, dict):
            raise field_error(where, "process", process, "an object (the container's process)")
        terminal = process.get("terminal")
        if terminal is None:
            terminal = False
        if not isinstance(terminal, bool):
            raise field_error(where, "process.terminal", terminal, "true or false")
        root = object_field(data, "root", where, "root")
        linux = object_field(data, "linux", where, "linux")
        resources = linux.get("resources")
        if resources is not None and not isinstance(resources, dict):
            raise field_error(where, "linux.resources", resources, "a JSON object")
        data = copy.deepcopy(data)
        return cls(
            _data=data,
            annotations=annotations_of(data, where),
            hostname=string_field(data, "hostname", where, "hostname"),
            root_path=string_field(root, "path", where, "root.path") or "rootfs",
            terminal=terminal,
            cgroups_path=string_field(linux, "cgroupsPath", where, "linux.cgroupsPath"),
            namespaces=_namespaces(linux, where),
            resources=copy.deepcopy(resources),
            files_limit=_files_limit(resources or {}, where),
            mounts=_mounts(data, where),
        )

    def to_dict(self) -> dict[str, Any]:
        """The whole document (a deep copy), as the guest gets it."""
        return copy.deepcopy(dict(self._data))

    @property
    def process(self) -> dict[str, Any]:
        """A copy of the spec's process object."""
        return copy.deepcopy(dict(self._data["process"]))

    # -- derived specs -------------------------------------------------------------------

    def with_terminal(self, terminal: bool) -> Spec:
        data = self.to_dict()
        data["process"]["terminal"] = terminal
        return replace(self, _data=data, terminal=terminal)

    def with_args(self, args: list[str]) -> Spec:
        """The spec running ``args`` instead of its process's own."""
        data = self.to_dict()
        data["process"]["args"] = list(args)
        return replace(self, _data=data)

    def with_annotations(self, annotations: Mapping[str, str]) -> Spec:
        """The spec with ``annotations`` added to its own (theirs win)."""
        if not annotations:
            return self
        merged = {**self.annotations, **annotations}
        data = self.to_dict()
        data["annotations"] = dict(merged)
        return replace(self, _data=data, annotations=merged)

    def with_mounts(self, mounts: tuple[Mount, ...]) -> Spec:
        data = self.to_dict()
        data["mounts"] = [m.to_dict() for m in mounts]
        return replace(self, _data=data, mounts=mounts)

    def with_namespaces(self, namespaces: tuple[Namespace, ...]) -> Spec:
        data = self.to_dict()
        linux = data.get("linux") or {}
        linux["namespaces"] = [ns.to_dict() for ns in namespaces]
        data["linux"] = linux
        return replace(self, _data=data, namespaces=namespaces)

    # -- the pod a container belongs to (containerd CRI, CRI-O's spelling, dockershim) --

    @property
    def container_type(self) -> str:
        """'sandbox' (the pod's pause container), 'container' (a pod member) or ''
        (no type annotation: a container that is its own pod)."""
        a = self.annotations
        if contract.CRI_CONTAINER_TYPE in a:
            return "sandbox" if a[contract.CRI_CONTAINER_TYPE] == "sandbox" else "container"
        if contract.DOCKER_CONTAINER_TYPE in a:
            kind = a[contract.DOCKER_CONTAINER_TYPE]
            return "sandbox" if kind == "podsandbox" else "container"
        return ""

    def pod_id(self, container_id: str) -> str:
        """The pod (shim group) the container belongs to: the sandbox-id annotation, or
        the container itself when it is not part of a pod."""
        return contract.pod_id_of(self.annotations, container_id)

    def is_pod_sandbox(self, container_id: str) -> bool:
        """Whether this container makes the pod (CRI's pause container, or a container
        that is its own pod)."""
        kind = self.container_type
        if kind:
            return kind == "sandbox"
        return self.pod_id(container_id) == container_id

    @property
    def is_pause(self) -> bool:
        """Whether the engine marks this spec as a pod's pause container: a placeholder
        that stands for the pod, running nothing of the user's."""
        return self.container_type == "sandbox"


def write_config(bundle: Path, data: Mapping[str, Any]) -> Path:
    """Write a bundle's config.json (the spec a runtime derived for a service)."""
    path = bundle / CONFIG_FILE
    path.write_text(json.dumps(data))
    return path


@dataclass(frozen=True)
class Bundle:
    """An OCI bundle: its directory, its spec and its rootfs (resolved once)."""

    path: Path
    spec: Spec
    rootfs: Path

    @classmethod
    def load(
        cls, path: Path | str, *, check_rootfs: bool = True, rootfs_inside: bool = True
    ) -> Bundle:
        """Read ``config.json`` once and validate it. ``check_rootfs``: the rootfs must
        be a directory now (not so for a shim, which mounts it later);
        ``rootfs_inside``: see ``resolve_root``."""
        bundle = Path(path).absolute()
        spec = Spec.from_dict(read_config(bundle / CONFIG_FILE), f"bundle {bundle}")
        rootfs = resolve_root(bundle, spec.root_path, inside=rootfs_inside)
        if check_rootfs and not rootfs.is_dir():
            raise NotFound(f"bundle {bundle}: rootfs {rootfs} is not a directory")
        return cls(bundle, spec, rootfs)
