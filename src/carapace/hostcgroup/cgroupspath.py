"""OCI ``linux.cgroupsPath`` in its two forms, turned into a path in a hierarchy.

- cgroupfs form: ``/kubepods/pod1/container1`` (absolute: from the hierarchy's root)
  or ``kubepods/pod1`` (relative: the OCI spec leaves its base to the runtime; runc
  takes the runtime's own cgroup). Cleaned lexically as runc's ``utils.CleanPath``
  does: ``..`` never climbs above the root.
- systemd form: ``slice:prefix:name``, expanded as runc's systemd driver lays the
  unit out when it computes the path itself: the slice through ``ExpandSlice``
  (``a-b-c.slice`` → ``/a.slice/a-b.slice/a-b-c.slice``, ``-.slice`` → ``/``, an
  empty slice → ``system.slice``) and the unit ``<prefix>-<name>.scope`` (a name
  ending in ``.slice`` is taken as it is).

Pure functions, no file system access.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

from carapace.errors import InvalidArgument
from carapace.protocols import contract

SLICE_SUFFIX = ".slice"
#: runc's slice when the systemd form leaves it empty (rootful).
DEFAULT_SLICE = "system.slice"


@dataclass(frozen=True)
class CgroupsPath:
    """A parsed cgroupsPath. ``path`` is cleaned; absolute ones start with '/'."""

    form: Literal["cgroupfs", "systemd"]
    path: str

    @property
    def absolute(self) -> bool:
        return self.path.startswith("/")

    def relative_to_root(self) -> str:
        """The path below a hierarchy's root, without a leading '/' ("" is the root).
        A relative cgroupsPath has no root of its own: join it with a base first."""
        if not self.absolute:
            raise InvalidArgument(
                f"cgroupsPath {self.path!r} is relative: it names a cgroup below the "
                "runtime's own, join it with that base (CgroupsPath.under) first"
            )
        return self.path.lstrip("/")

    def under(self, base: str) -> CgroupsPath:
        """A relative path placed below ``base`` (an absolute cgroup path such as the
        one /proc/self/cgroup shows); an absolute path is returned unchanged."""
        if self.absolute:
            return self
        if not base.startswith("/"):
            raise InvalidArgument(f"cgroup base {base!r} must be absolute (start with '/')")
        return CgroupsPath(self.form, clean_path(posixpath.join(base, self.path)))

    def parent(self) -> CgroupsPath:
        """The enclosing cgroup (Kata: ``podCgroup = Parent(container.CgroupsPath)``)."""
        head = posixpath.dirname(self.path)
        if head == "" and not self.absolute:
            raise InvalidArgument(f"cgroupsPath {self.path!r} has no parent to name")
        return CgroupsPath(self.form, head)


def clean_path(path: str) -> str:
    """runc's utils.CleanPath: lexical clean; a relative path cannot escape with '..'."""
    if path == "":
        return ""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if not cleaned.startswith("/"):
        cleaned = posixpath.relpath(posixpath.normpath("/" + cleaned), "/")
    return cleaned


def expand_slice(slice_name: str) -> str:
    """runc's systemd ExpandSlice.

    ``test-a-b.slice`` → ``/test.slice/test-a.slice/test-a-b.slice``."""
    bad = InvalidArgument(
        f"invalid systemd slice name {slice_name!r}: expected names like 'system.slice' "
        "or 'kubepods-besteffort.slice' (ending in '.slice', no '/', no empty "
        "'-'-separated part), or '-.slice' for the root"
    )
    if len(slice_name) < len(SLICE_SUFFIX) or not slice_name.endswith(SLICE_SUFFIX):
        raise bad
    if "/" in slice_name:
        raise bad
    stem = slice_name[: -len(SLICE_SUFFIX)]
    if stem == "-":
        return "/"
    path = ""
    prefix = ""
    for component in stem.split("-"):
        if component == "":
            raise bad
        path += "/" + prefix + component + SLICE_SUFFIX
        prefix += component + "-"
    return path


def unit_name(prefix: str, name: str) -> str:
    """runc's getUnitName: a scope ``<prefix>-<name>.scope`` unless ``name`` is a slice."""
    if name.endswith(SLICE_SUFFIX):
        return name
    return f"{prefix}-{name}.scope"


def parse_cgroups_path(value: str) -> CgroupsPath:
    """Parse an OCI linux.cgroupsPath. A value with ':' must be ``slice:prefix:name``."""
    if ":" not in value:
        if "\x00" in value or "\n" in value:
            raise InvalidArgument(f"cgroupsPath {value!r} contains a NUL or newline character")
        return CgroupsPath("cgroupfs", clean_path(value))
    parts = value.split(":")
    if len(parts) != 3:
        raise InvalidArgument(
            f"cgroupsPath {value!r} is neither a cgroupfs path ('/kubepods/pod1/ctr', "
            "no ':') nor the systemd form 'slice:prefix:name' (exactly three ':'-separated parts)"
        )
    slice_name, prefix, name = parts
    if name == "" or "/" in name or "/" in prefix:
        raise InvalidArgument(
            f"cgroupsPath {value!r}: in the systemd form 'slice:prefix:name' the name must "
            "be non-empty and neither prefix nor name may contain '/'"
        )
    parent = expand_slice(slice_name or DEFAULT_SLICE)
    return CgroupsPath("systemd", posixpath.join(parent, unit_name(prefix, name)))


#: Names the sandbox cgroup may take below the pod cgroup (ours, and Kata's for tools
#: that look for it).
SANDBOX_CGROUP_PREFIXES = contract.SANDBOX_CGROUP_PREFIXES
#: Where a sandbox's cgroup goes when its sandbox container names no cgroupsPath.
DEFAULT_SANDBOX_PARENT = "carapace"


def sandbox_cgroup_path(
    cgroups_path: str | None, sandbox_id: str, prefix: str = SANDBOX_CGROUP_PREFIXES[0]
) -> str:
    """The sandbox's host cgroup, relative to a hierarchy's root: Kata's
    ``<podCgroup>/<prefix><id>`` with ``podCgroup = parent(cgroupsPath)`` of the pod's
    sandbox container (a relative cgroupsPath counts from the root), or
    ``carapace/<id>`` when there is no cgroupsPath."""
    if prefix not in SANDBOX_CGROUP_PREFIXES:
        raise InvalidArgument(
            f"sandbox cgroup prefix {prefix!r}; accepted: {', '.join(SANDBOX_CGROUP_PREFIXES)}"
        )
    if not cgroups_path:
        return f"{DEFAULT_SANDBOX_PARENT}/{sandbox_id}"
    pod = parse_cgroups_path(cgroups_path).under("/").parent()
    return posixpath.join(pod.relative_to_root(), f"{prefix}{sandbox_id}")


def pod_cgroup_path(cgroups_path: str | None, sandbox_id: str) -> str:
    """The pod cgroup, relative to a hierarchy's root: the parent of the sandbox
    container's cgroupsPath, or carapace/pod-<id> when there is none."""
    if not cgroups_path:
        return f"{DEFAULT_SANDBOX_PARENT}/pod-{sandbox_id}"
    return parse_cgroups_path(cgroups_path).under("/").parent().relative_to_root()


def own_parents(path: str) -> int:
    """How many leading components of a cgroup path are carapace's own directory
    (``carapace/...``): 1 or 0 (see CgroupDriver.create)."""
    return 1 if path.split("/", 1)[0] == DEFAULT_SANDBOX_PARENT and "/" in path else 0
