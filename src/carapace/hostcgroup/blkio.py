"""Block I/O limits of a sandbox: the ``blkio_cgroup`` annotation (openEuler's
``com.github.containers.virtcontainers.blkio_cgroup``), device resolution, and the
cgroup file lines that apply them on v1 (blkio) and v2 (io).

The annotation's value is the JSON of Kata/openEuler's ``BlkioCgroup``::

    {"blkiocgroup": [
       {"path": "/dev/sda", "limits": [{"type": "throttle_read_bps", "value": 400}, ...]},
       {"limits": [{"type": "blkio_weight", "value": 78}]}]}

An item with a ``path`` limits that block device (throttles, or a per-device weight);
an item without one holds weights for the whole cgroup. Limits the host cannot apply
(no weight file: the host's I/O schedulers have no proportional weight) are not
dropped silently: they come back in ``BlkioResult.unapplied`` with the reason.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from carapace.errors import SHOWN_LIMIT, InvalidArgument, shown
from carapace.protocols.contract import BLKIO_CGROUP

from .files import Version

BLKIO_CGROUP_ANNOTATION = BLKIO_CGROUP
#: Where the devices an item may name live (nothing else on the host is looked at).
DEV_ROOT = "/dev"

THROTTLE_TYPES = (
    "throttle_read_bps",
    "throttle_write_bps",
    "throttle_read_iops",
    "throttle_write_iops",
)
WEIGHT_TYPES = ("blkio_weight", "blkio_leaf_weight")
LIMIT_TYPES = THROTTLE_TYPES + WEIGHT_TYPES
#: Accepted weight ranges: blkio_weight as CFQ/BFQ take it, leaf weights are CFQ's only.
WEIGHT_RANGE = {"blkio_weight": (1, 1000), "blkio_leaf_weight": (10, 1000)}
UINT64_MAX = 2**64 - 1

#: v1 throttle file and v2 io.max key per throttle type.
_V1_THROTTLE_FILE = {
    "throttle_read_bps": "blkio.throttle.read_bps_device",
    "throttle_write_bps": "blkio.throttle.write_bps_device",
    "throttle_read_iops": "blkio.throttle.read_iops_device",
    "throttle_write_iops": "blkio.throttle.write_iops_device",
}
_V2_IO_MAX_KEY = {
    "throttle_read_bps": "rbps",
    "throttle_write_bps": "wbps",
    "throttle_read_iops": "riops",
    "throttle_write_iops": "wiops",
}


@dataclass(frozen=True)
class BlkioLimit:
    type: str
    value: int


@dataclass(frozen=True)
class BlkioItem:
    """One entry of the annotation: a device path (None: the whole cgroup) and its limits."""

    path: str | None
    limits: tuple[BlkioLimit, ...]


@dataclass(frozen=True)
class Device:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class ResolvedBlkioItem:
    """A BlkioItem whose path was resolved to the block device's major:minor."""

    path: str | None
    device: Device | None
    limits: tuple[BlkioLimit, ...]


@dataclass(frozen=True)
class BlkioWrite:
    """One write to a cgroup file (the kernel takes one device line per write)."""

    file: str
    line: str


@dataclass(frozen=True)
class UnappliedLimit:
    """A limit the host cannot apply, and why (for the caller to log as a warning)."""

    path: str | None
    type: str
    value: int
    reason: str

    def __str__(self) -> str:
        where = self.path or "the whole cgroup"
        return f"{self.type}={self.value} for {where} not applied: {self.reason}"


@dataclass
class BlkioResult:
    """What was written; the limits that could not be (with why); and warnings about
    limits that were written but have no effect (a weight for a device whose I/O
    scheduler is not the one reading it)."""

    applied: list[BlkioWrite] = field(default_factory=list)
    unapplied: list[UnappliedLimit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing


def _bad(annotation: str, what: str, seen: object, accepted: str) -> InvalidArgument:
    if isinstance(seen, str):
        text = shown(seen)
    else:
        try:
            text = json.dumps(seen)
        except (ValueError, RecursionError):
            text = shown(seen)
        if len(text) > SHOWN_LIMIT:
            text = f"{text[:SHOWN_LIMIT]}... ({len(text)} characters)"
    return InvalidArgument(f"annotation {annotation}: {what} {text}; {accepted}")


def _check_keys(annotation: str, where: str, obj: dict[str, Any], allowed: Collection[str]) -> None:
    for key in obj:
        if key not in allowed:
            raise _bad(
                annotation,
                f"unknown key in {where}:",
                key,
                f"accepted keys: {', '.join(repr(k) for k in allowed)}",
            )


def _limit(annotation: str, where: str, raw: object) -> BlkioLimit:
    if not isinstance(raw, dict):
        raise _bad(
            annotation, f"{where} is not an object:", raw, 'expected {"type": ..., "value": ...}'
        )
    _check_keys(annotation, where, raw, ("type", "value"))
    if "type" not in raw or "value" not in raw:
        raise _bad(
            annotation,
            f"{where} lacks 'type' or 'value':",
            raw,
            'expected {"type": ..., "value": ...}',
        )
    kind, value = raw["type"], raw["value"]
    if not isinstance(kind, str) or kind not in LIMIT_TYPES:
        raise _bad(
            annotation,
            f"{where} has an unknown type",
            kind,
            f"accepted types: {', '.join(LIMIT_TYPES)}",
        )
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT64_MAX:
        raise _bad(
            annotation,
            f"{where} ({kind}) has the value",
            value,
            "a non-negative integer is expected",
        )
    if kind in WEIGHT_RANGE:
        low, high = WEIGHT_RANGE[kind]
        if not low <= value <= high:
            raise _bad(
                annotation, f"{where} ({kind}) has the value", value, f"accepted: {low}..{high}"
            )
    return BlkioLimit(kind, value)


def parse_blkio_cgroup(text: str, annotation: str = BLKIO_CGROUP_ANNOTATION) -> list[BlkioItem]:
    """Parse the annotation's JSON strictly. Raises InvalidArgument naming the annotation,
    the value seen and what is accepted. Items naming the same device merge; a limit
    given twice for one device (or twice for the whole cgroup) is refused."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of 4301 digits
        raise InvalidArgument(
            f"annotation {annotation}: not valid JSON ({str(exc)[:120]}): {shown(text)}"
        ) from None
    if not isinstance(doc, dict):
        raise _bad(
            annotation, "the value is not a JSON object:", doc, 'expected {"blkiocgroup": [...]}'
        )
    _check_keys(annotation, "the top level", doc, ("blkiocgroup",))
    raw_items = doc.get("blkiocgroup", [])
    if not isinstance(raw_items, list):
        raise _bad(
            annotation, "'blkiocgroup' is not a list:", raw_items, "expected a list of items"
        )
    merged: dict[str | None, list[BlkioLimit]] = {}
    for i, raw in enumerate(raw_items):
        where = f"blkiocgroup[{i}]"
        if not isinstance(raw, dict):
            raise _bad(
                annotation,
                f"{where} is not an object:",
                raw,
                'expected {"path": ..., "limits": [...]}',
            )
        _check_keys(annotation, where, raw, ("path", "limits"))
        path = raw.get("path")
        if path is not None and (not isinstance(path, str) or not path.startswith("/dev/")):
            raise _bad(
                annotation,
                f"{where}.path is",
                path,
                "the path of a block device under /dev such as '/dev/vda' is expected",
            )
        raw_limits = raw.get("limits")
        if not isinstance(raw_limits, list) or not raw_limits:
            raise _bad(
                annotation,
                f"{where}.limits is",
                raw_limits,
                "a non-empty list of limits is expected",
            )
        limits = [_limit(annotation, f"{where}.limits[{j}]", r) for j, r in enumerate(raw_limits)]
        for lim in limits:
            if path is None and lim.type in THROTTLE_TYPES:
                raise _bad(
                    annotation,
                    f"{where} has no 'path' but sets",
                    lim.type,
                    "throttles apply to one device: give its 'path'; an item without "
                    "a path may hold only blkio_weight and blkio_leaf_weight",
                )
            seen = merged.setdefault(path, [])
            if any(s.type == lim.type for s in seen):
                target = path or "the whole cgroup"
                raise _bad(
                    annotation,
                    f"{lim.type} is given twice for {target}, in",
                    where,
                    "give each limit once",
                )
            seen.append(lim)
    return [BlkioItem(path, tuple(limits)) for path, limits in merged.items()]


# ------------------------------------------------------------------ device resolution


def _not_a_device(annotation: str, path: str) -> InvalidArgument:
    # one message for every refusal: it must not tell what the host has at a path
    # (whether it exists, its type or mode) beyond "not a block device under /dev"
    return InvalidArgument(
        f"annotation {annotation}: {shown(path)} is not a block device under /dev; "
        "accepted: the path of a whole-disk block device under /dev such as /dev/vda "
        "(a symlink under /dev to one, such as /dev/disk/by-id/..., too)"
    )


def resolve_devices(
    items: Iterable[BlkioItem],
    annotation: str = BLKIO_CGROUP_ANNOTATION,
    sys_root: str = "/sys",
    dev_root: str = DEV_ROOT,
) -> list[ResolvedBlkioItem]:
    """Turn each item's path into its block device's major:minor. The path, and where
    its symlinks lead, must lie under ``dev_root`` (/dev) and be a block device: the
    annotation comes from the pod, so the host's other files are never looked at and
    any refusal says only that (never whether the path exists, nor its mode). A
    partition (the kernel throttles whole disks only) is refused naming its device."""
    root = os.path.normpath(dev_root)
    real_root = os.path.realpath(root)
    out = []
    for item in items:
        if item.path is None:
            out.append(ResolvedBlkioItem(None, None, item.limits))
            continue
        path = item.path
        if "\x00" in path or not os.path.normpath(path).startswith(root + "/"):
            raise _not_a_device(annotation, path)
        real = os.path.realpath(os.path.normpath(path))
        if not real.startswith(real_root + "/"):
            raise _not_a_device(annotation, path)
        try:
            st = os.stat(real)
        except (OSError, ValueError):
            raise _not_a_device(annotation, path) from None
        if not stat.S_ISBLK(st.st_mode):
            raise _not_a_device(annotation, path)
        dev = Device(os.major(st.st_rdev), os.minor(st.st_rdev))
        if os.path.exists(os.path.join(sys_root, "dev", "block", str(dev), "partition")):
            raise InvalidArgument(
                f"annotation {annotation}: {shown(path)} ({dev}) is a partition; the kernel "
                "limits I/O of whole disks only: name the disk it belongs to"
            )
        out.append(ResolvedBlkioItem(path, dev, item.limits))
    return out


# ------------------------------------------------------------------- file lines


def v2_io_weight(blkio_weight: int) -> int:
    """blkio weight (CFQ scale, default 500) → io.weight (1..10000, default 100), as
    systemd converts BlockIOWeight to IOWeight: proportional to the defaults."""
    return max(1, min(10000, blkio_weight * 100 // 500))


def _unapplied(item: ResolvedBlkioItem, lim: BlkioLimit, reason: str) -> UnappliedLimit:
    return UnappliedLimit(item.path, lim.type, lim.value, reason)


def active_schedulers(sys_root: str = "/sys") -> dict[str, str]:
    """Each block device's ("major:minor") active I/O scheduler, from sysfs."""
    found: dict[str, str] = {}
    base = os.path.join(sys_root, "block")
    try:
        names = os.listdir(base)
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(base, name, "dev")) as f:
                dev = f.read().strip()
            with open(os.path.join(base, name, "queue", "scheduler")) as f:
                text = f.read()
        except OSError:
            continue
        found[dev] = parse_scheduler(text)
    return found


def parse_scheduler(text: str) -> str:
    """The active scheduler of queue/scheduler ('none [mq-deadline] bfq' → 'mq-deadline')."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def _weight_scheduler(file: str) -> str | None:
    if "bfq" in file:
        return "bfq"
    if file.startswith("blkio.weight") or file.startswith("blkio.leaf_weight"):
        return "cfq"
    return None  # io.weight (iocost) does not depend on a scheduler


def weight_warnings(applied: Iterable[BlkioWrite], schedulers: Mapping[str, str]) -> list[str]:
    """Weights written to a scheduler's file that no device (or not the named device)
    runs: accepted by the kernel, but without effect until that scheduler is chosen."""
    warnings = []
    for w in applied:
        wanted = _weight_scheduler(w.file)
        if wanted is None:
            continue
        first = w.line.split()[0]
        if ":" in first:
            if schedulers.get(first) != wanted:
                warnings.append(
                    f"{w.file} '{w.line}' written, but device {first} uses the "
                    f"{schedulers.get(first, 'unknown')} I/O scheduler, not {wanted}: the "
                    "weight has no effect until it does"
                )
        elif wanted not in schedulers.values():
            shown = ", ".join(f"{d}={s}" for d, s in sorted(schedulers.items())) or "none seen"
            warnings.append(
                f"{w.file} '{w.line}' written, but no block device uses the {wanted} I/O "
                f"scheduler ({shown}): the weight has no effect until one does"
            )
    return warnings


def blkio_writes(
    version: Version,
    items: Sequence[ResolvedBlkioItem],
    existing: Collection[str],
    schedulers: Mapping[str, str] | None = None,
) -> BlkioResult:
    """Plan the writes applying ``items`` to a cgroup whose directory holds the files
    ``existing``. Weights go to whichever weight file exists (v1: blkio.bfq.weight, else
    blkio.weight; v2: io.bfq.weight unchanged, else io.weight converted by
    ``v2_io_weight``); a limit whose file does not exist is reported unapplied. With
    ``schedulers`` (device → active I/O scheduler), weights that would have no effect
    are reported in ``warnings``."""
    result = BlkioResult()
    for item in items:
        prefix = "" if item.device is None else f"{item.device} "
        io_max: list[str] = []
        for lim in item.limits:
            if lim.type in THROTTLE_TYPES:
                assert item.device is not None, "throttles always name a device (parser rule)"
                if version == "v1":
                    name = _V1_THROTTLE_FILE[lim.type]
                    if name in existing:
                        result.applied.append(BlkioWrite(name, f"{item.device} {lim.value}"))
                    else:
                        result.unapplied.append(
                            _unapplied(
                                item,
                                lim,
                                f"{name} does not exist (kernel without "
                                "CONFIG_BLK_DEV_THROTTLING?)",
                            )
                        )
                elif "io.max" in existing:
                    # 0 lifts a v1 throttle; on v2 that is 'max'.
                    io_max.append(f"{_V2_IO_MAX_KEY[lim.type]}={lim.value or 'max'}")
                else:
                    result.unapplied.append(
                        _unapplied(
                            item,
                            lim,
                            "io.max does not exist (the io controller is "
                            "not enabled for this cgroup)",
                        )
                    )
                continue
            device_suffix = "" if item.device is None else "_device"
            if lim.type == "blkio_leaf_weight":
                name = f"blkio.leaf_weight{device_suffix}"
                if version == "v1" and name in existing:
                    result.applied.append(BlkioWrite(name, f"{prefix}{lim.value}"))
                else:
                    why = (
                        "cgroup v2 has no leaf weight"
                        if version == "v2"
                        else f"{name} does not exist: only the CFQ I/O scheduler has leaf "
                        "weights, and this host does not offer it"
                    )
                    result.unapplied.append(_unapplied(item, lim, why))
                continue
            # blkio_weight
            if version == "v1":
                candidates = [f"blkio.bfq.weight{device_suffix}", f"blkio.weight{device_suffix}"]
                values = [lim.value, lim.value]
            else:
                candidates = ["io.bfq.weight", "io.weight"]
                values = [lim.value, v2_io_weight(lim.value)]
            for name, value in zip(candidates, values, strict=True):
                if name in existing:
                    if version == "v1":
                        line = f"{prefix}{value}"
                    else:
                        line = f"{item.device or 'default'} {value}"
                    result.applied.append(BlkioWrite(name, line))
                    break
            else:
                result.unapplied.append(
                    _unapplied(
                        item,
                        lim,
                        f"neither {' nor '.join(candidates)} exists: the host's I/O schedulers "
                        "have no proportional weight (BFQ or CFQ is needed)",
                    )
                )
        if io_max:
            result.applied.append(BlkioWrite("io.max", f"{item.device} {' '.join(io_max)}"))
    if schedulers is not None:
        result.warnings = weight_warnings(result.applied, schedulers)
    return result
