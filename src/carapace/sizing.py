"""Sizes: parsing docker-style sizes and writing them back (pure functions). The
resource policy that uses them is carapace.resources."""

from __future__ import annotations

import re

from carapace.errors import InvalidArgument, shown

MiB = 1 << 20
GiB = 1 << 30
#: The largest size parsed (bytes): what a signed 64-bit count holds (8 EiB), far above
#: anything a VM or a cgroup takes; beyond it a value is refused, not rounded.
MAX_SIZE = (1 << 63) - 1

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
#: ASCII digits only (``\d`` would take other scripts' digits), at most 24 before the
#: point and 18 after it: more cannot be a size below MAX_SIZE or change one.
_SIZE_RE = re.compile(
    r"\s*([0-9]{1,24})(?:\.([0-9]{1,18}))?\s*([bkmgt]?)(?:i?b)?\s*", re.IGNORECASE | re.ASCII
)
_ACCEPTED = (
    "accepted: a number of bytes or a number with a unit b, k, m, g, t (e.g. 512m, 2G, "
    "1073741824), at most 8 EiB"
)


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes from a docker-style size: 1073741824, 512m, 512M, 4G, 1.5g, 512MiB.
    A bare number is bytes. Anything else (another type, other digits, a size above
    MAX_SIZE) raises InvalidArgument naming ``what`` and the value."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgument(f"{what}: {value} is negative; give a size like 512M or 2G")
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise InvalidArgument(f"{what}: {shown(value)} is not a size; {_ACCEPTED}")
        whole, fraction, unit = m.groups()
        scale = _UNITS[unit.lower()]
        n = int(whole) * scale
        if fraction:
            n += int(fraction) * scale // 10 ** len(fraction)
    else:
        raise InvalidArgument(
            f"{what}: {shown(value)} is a {type(value).__name__}, not a size; {_ACCEPTED}"
        )
    if n > MAX_SIZE:
        raise InvalidArgument(f"{what}: {shown(value)} is too large; {_ACCEPTED}")
    return n


def ascii_int(raw: object, digits: int = 20) -> int | None:
    """An integer from a string of ASCII digits with an optional sign and at most
    ``digits`` digits (``int()`` would also take other scripts' digits and thousands of
    them); an int as it is; None for anything else (a bool, a float, other text)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    body = text[1:] if text[:1] in "+-" else text
    if not body.isascii() or not body.isdigit() or len(body) > digits:
        return None
    return int(text)


def format_size(n: int) -> str:
    for unit, size in (("G", GiB), ("M", MiB), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
