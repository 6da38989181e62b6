"""Parsing and checking vCPU and memory amounts (carapace.sizing)."""

from __future__ import annotations

import pytest

from carapace.errors import InvalidArgument
from carapace.sizing import GiB, MiB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1073741824", 1073741824),
        ("0", 0),
        ("512m", 512 * MiB),
        ("512M", 512 * MiB),
        ("4G", 4 * GiB),
        ("4g", 4 * GiB),
        ("1.5g", 3 * GiB // 2),
        ("512MiB", 512 * MiB),
        ("512mb", 512 * MiB),
        ("2k", 2048),
        ("1t", 1 << 40),
        ("100b", 100),
        (" 64M ", 64 * MiB),
    ],
)
def test_parse_size_docker_forms(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_int_is_bytes() -> None:
    assert parse_size(4096) == 4096
    with pytest.raises(InvalidArgument, match="-5 is negative"):
        parse_size(-5)


@pytest.mark.parametrize("text", ["", "abc", "-1", "12x", "1.5.2g", "g", "12 gigs", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_size(text, what="--memory")
    msg = str(exc.value)
    assert msg.startswith("--memory: ")
    assert repr(text) in msg  # the value seen
    assert "accepted" in msg and "512m" in msg  # and what would be accepted


def test_parse_size_rejects_bool() -> None:
    with pytest.raises(InvalidArgument):
        parse_size(True)


def test_format_size() -> None:
    assert format_size(2 * GiB) == "2G"
    assert format_size(1536 * MiB) == "1536M"
    assert format_size(3 * 1024) == "3K"
    assert format_size(1000) == "1000B"
