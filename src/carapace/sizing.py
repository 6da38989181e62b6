"""vCPU and memory arithmetic: parsing sizes and checking them (pure functions)."""

from __future__ import annotations

import math
import re

from carapace.errors import InvalidArgument

MiB = 1 << 20
GiB = 1 << 30

#: The smallest VM the guest (kernel + agent + crun) runs in.
GUEST_MIN_MEMORY = 256 * MiB
GUEST_MAX_MEMORY = 256 * GiB

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes from a docker-style size: 1073741824, 512m, 512M, 4G, 1.5g, 512MiB.
    A bare number is bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgument(f"{what}: {value} is negative; give a size like 512M or 2G")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise InvalidArgument(
            f"{what}: {value!r} is not a size; accepted: a number of bytes or a number "
            "with a unit b, k, m, g, t (e.g. 512m, 2G, 1073741824)"
        )
    number, unit = m.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(n: int) -> str:
    for unit, size in (("G", GiB), ("M", MiB), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def parse_cpus(value: str | float | int, what: str = "cpus") -> float:
    """A CPU count: a positive number, possibly fractional (0.5, 2, "1.5")."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"{what}: {value!r} is not a number; accepted: a positive number of CPUs such "
            "as 1, 2 or 0.5"
        ) from None
    if not math.isfinite(n) or n <= 0:
        raise InvalidArgument(f"{what}: {value!r} must be a positive number of CPUs (e.g. 1)")
    return n


def vcpus_for(cpus: float) -> int:
    """vCPUs to boot for a CPU amount: a fractional amount boots ceil(n)."""
    return max(1, math.ceil(cpus - 1e-9))


def check_vm_memory(nbytes: int, what: str = "memory") -> int:
    """The VM memory in MiB, checked against what the guest can run in."""
    if nbytes < GUEST_MIN_MEMORY or nbytes > GUEST_MAX_MEMORY:
        raise InvalidArgument(
            f"{what}: {format_size(nbytes)} is out of range; accepted: "
            f"{format_size(GUEST_MIN_MEMORY)} to {format_size(GUEST_MAX_MEMORY)}"
        )
    return math.ceil(nbytes / MiB)


def check_vcpus(cpus: float, host_cpus: int, what: str = "cpus") -> int:
    """vCPUs for ``cpus``, which may not exceed the CPUs the host can use."""
    if cpus > host_cpus:
        raise InvalidArgument(
            f"{what}: {cpus:g} is more than the host's {host_cpus} usable CPUs; "
            f"accepted: more than 0 and at most {host_cpus}"
        )
    return vcpus_for(cpus)
