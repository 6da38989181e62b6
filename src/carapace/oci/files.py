"""A bundle's files before the spec's typed view: config.json read and parsed, the
first checks of its fields (in the words every check uses), and where its rootfs lies.
Standard library only, unlike ``carapace.oci.bundle``: the shim binary's start and
delete, which containerd runs once per container, read a bundle with these alone."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from carapace.errors import InvalidArgument, NotFound, shown

# (``typing`` only for the type checker, which reads this constant as True: importing
# it would cost each shim start and delete a tenth of their time)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CONFIG_FILE = "config.json"


def field_error(where: str, name: str, value: object, expected: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: {name} is {shown(value)}; accepted: {expected}")


def object_field(data: Mapping[str, Any], key: str, where: str, name: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise field_error(where, name, value, "a JSON object")
    return value


def string_field(data: Mapping[str, Any], key: str, where: str, name: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise field_error(where, name, value, "a string")
    return value


def annotations_of(data: Mapping[str, Any], where: str) -> dict[str, str]:
    raw = object_field(data, "annotations", where, "annotations")
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise field_error(where, f"annotations[{shown(k)}]", v, "a string")
    return dict(raw)


def read_config(path: Path) -> object:
    """The one place a config.json is read and parsed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"bundle {path.parent}: no {CONFIG_FILE}; an OCI bundle needs one") from None
    except OSError as e:
        raise InvalidArgument(f"bundle {path.parent}: cannot read {CONFIG_FILE}: {e}") from e
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # also an int of 4301 digits, deep nesting
        raise InvalidArgument(
            f"bundle {path.parent}: {CONFIG_FILE} is not valid JSON: {str(e)[:200]}"
        ) from e


#: Host trees a rootfs may never be (nor lie in).
FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")


def resolve_root(bundle: Path, root_path: str, *, inside: bool = True) -> Path:
    """The rootfs of a bundle, symlinks resolved. ``inside`` (containerd's shims,
    which mount and unmount it): it must lie in the bundle, as runc's shim requires.
    Otherwise (a runtime CLI: Podman writes an absolute path to its storage) it may be
    elsewhere, but never ``/`` nor in /proc, /sys or /dev."""
    real_bundle = os.path.realpath(bundle)
    try:
        resolved = os.path.realpath(os.path.join(real_bundle, root_path))
    except OSError as e:
        raise InvalidArgument(
            f"bundle {bundle}: root.path {root_path!r} cannot be resolved ({e.strerror}); "
            "accepted: a directory inside the bundle (e.g. rootfs)"
        ) from None
    if inside:
        if resolved == real_bundle or os.path.commonpath([resolved, real_bundle]) != real_bundle:
            raise InvalidArgument(
                f"bundle {bundle}: root.path {root_path!r} resolves to {resolved}, outside the "
                "bundle; accepted: a directory inside the bundle (e.g. rootfs)"
            )
        return Path(resolved)
    if resolved == "/" or any(
        resolved == t or resolved.startswith(t + "/") for t in FORBIDDEN_ROOTS
    ):
        raise InvalidArgument(
            f"bundle {bundle}: root.path {root_path!r} resolves to {resolved}; accepted: a "
            "directory other than / and outside /proc, /sys, /dev"
        )
    return Path(resolved)
