"""Sizes: parsing docker-style sizes and writing them back (pure functions). The
resource policy that uses them is carapace.resources."""

from __future__ import annotations

import re

from carapace.errors import InvalidArgument

MiB = 1 << 20
GiB = 1 << 30

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
