"""Parsing and checking vCPU and memory amounts (carapace.sizing)."""

from __future__ import annotations

import pytest

from carapace.errors import InvalidArgument
from carapace.sizing import (
    GUEST_MAX_MEMORY,
    GUEST_MIN_MEMORY,
    GiB,
    MiB,
    check_vcpus,
    check_vm_memory,
    format_size,
    parse_cpus,
    parse_size,
    vcpus_for,
)


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


@pytest.mark.parametrize(
    ("value", "expected"), [("1", 1.0), ("0.5", 0.5), ("1.5", 1.5), (2, 2.0), (0.25, 0.25)]
)
def test_parse_cpus(value: str | float, expected: float) -> None:
    assert parse_cpus(value) == expected


def test_parse_cpus_rejects_non_numbers() -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_cpus("abc", what="--cpus")
    msg = str(exc.value)
    assert "--cpus" in msg and "'abc'" in msg and "accepted" in msg


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf", 0, -0.5])
def test_parse_cpus_rejects_non_positive_or_non_finite(value: str | float) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_cpus(value)
    assert repr(value) in str(exc.value)
    assert "positive" in str(exc.value)


@pytest.mark.parametrize(
    ("cpus", "vcpus"), [(0.1, 1), (0.5, 1), (1, 1), (1.0, 1), (1.5, 2), (2, 2), (2.01, 3), (8, 8)]
)
def test_vcpus_for(cpus: float, vcpus: int) -> None:
    assert vcpus_for(cpus) == vcpus


def test_check_vm_memory_bounds() -> None:
    assert check_vm_memory(GUEST_MIN_MEMORY) == 256
    assert check_vm_memory(GUEST_MAX_MEMORY) == 256 * 1024
    assert check_vm_memory(1 * GiB) == 1024
    # a size that is not a whole number of MiB rounds up
    assert check_vm_memory(GUEST_MIN_MEMORY + 1) == 257


@pytest.mark.parametrize(
    ("nbytes", "shown"),
    [
        (GUEST_MIN_MEMORY - MiB, "255M"),
        (GUEST_MIN_MEMORY - 1, str(GUEST_MIN_MEMORY - 1) + "B"),
        (GUEST_MAX_MEMORY + GiB, "257G"),
        (64 * MiB, "64M"),
    ],
)
def test_check_vm_memory_out_of_range(nbytes: int, shown: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_vm_memory(nbytes, what="--memory")
    msg = str(exc.value)
    assert msg.startswith(f"--memory: {shown} is out of range")
    assert "256M to 256G" in msg


def test_format_size() -> None:
    assert format_size(2 * GiB) == "2G"
    assert format_size(1536 * MiB) == "1536M"
    assert format_size(3 * 1024) == "3K"
    assert format_size(1000) == "1000B"


def test_check_vcpus() -> None:
    assert check_vcpus(4, host_cpus=4) == 4
    assert check_vcpus(0.5, host_cpus=1) == 1
    assert check_vcpus(1.5, host_cpus=2) == 2
    with pytest.raises(InvalidArgument) as exc:
        check_vcpus(5, host_cpus=4, what="--cpus")
    msg = str(exc.value)
    assert "--cpus: 5 is more than the host's 4 usable CPUs" in msg
    assert "at most 4" in msg
    with pytest.raises(InvalidArgument):
        check_vcpus(4.5, host_cpus=4)
