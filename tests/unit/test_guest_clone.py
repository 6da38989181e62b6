"""What a VM restored from a template asks of its agent first (carapace.guest.clone):
the reseed of the guest's CRNG from host bytes and the setting of its clock, checked
without a VM (the ioctls and the clock are the test's)."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import struct
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.guest.clone import (
    MAX_SEC,
    MAX_SEED,
    MIN_SEED,
    RNDADDENTROPY,
    RNDRESEEDCRNG,
    CloneService,
    check_seed,
    check_time,
    entropy_request,
)
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


# -- the ioctl request ----------------------------------------------------------------


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """Linux's _IOC (asm-generic/ioctl.h): dir << 30 | size << 16 | type << 8 | nr."""
    return direction << 30 | size << 16 | ord(kind) << 8 | nr


def test_the_ioctl_numbers_are_linux_randoms() -> None:
    # linux/random.h: RNDADDENTROPY _IOW('R', 0x03, int[2]); RNDRESEEDCRNG _IO('R', 0x07)
    assert _ioc(1, "R", 0x03, 2 * ctypes.sizeof(ctypes.c_int)) == RNDADDENTROPY
    assert _ioc(0, "R", 0x07, 0) == RNDRESEEDCRNG


class RandPoolInfo(ctypes.Structure):
    """struct rand_pool_info without its flexible array: entropy_count, buf_size."""

    _fields_ = [("entropy_count", ctypes.c_int), ("buf_size", ctypes.c_int)]


@pytest.mark.parametrize("n", [MIN_SEED, 64, 63, MAX_SEED])
def test_entropy_request_is_struct_rand_pool_info(n: int) -> None:
    data = os.urandom(n)
    req = entropy_request(data)
    head = RandPoolInfo.from_buffer_copy(req[: ctypes.sizeof(RandPoolInfo)])
    assert head.entropy_count == 8 * n  # bits credited: every host byte is random
    assert head.buf_size == n
    assert req[ctypes.sizeof(RandPoolInfo) :] == data
    assert len(req) == 8 + n
    assert struct.unpack_from("=ii", req) == (8 * n, n)


# -- bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [MIN_SEED, MIN_SEED + 1, 64, MAX_SEED])
def test_check_seed_accepts(n: int) -> None:
    check_seed(b"\x01" * n)


@pytest.mark.parametrize("n", [0, 1, MIN_SEED - 1, MAX_SEED + 1, 4096])
def test_check_seed_refuses_with_the_size_and_what_is_accepted(n: int) -> None:
    with pytest.raises(TtrpcError) as e:
        check_seed(b"\x01" * n)
    assert e.value.code == Code.INVALID_ARGUMENT
    assert e.value.message == (
        f"ReseedRandomDev: {n} bytes of seed; accepted: {MIN_SEED} to {MAX_SEED}"
    )


@pytest.mark.parametrize(
    ("sec", "usec", "ns"),
    [
        (0, 0, 0),
        (1, 5, 1_000_005_000),
        (1_764_186_715, 999_999, 1_764_186_715_999_999_000),
        (MAX_SEC, 999_999, MAX_SEC * 10**9 + 999_999_000),
    ],
)
def test_check_time_gives_nanoseconds(sec: int, usec: int, ns: int) -> None:
    assert check_time(sec, usec) == ns


@pytest.mark.parametrize(
    ("sec", "usec"),
    [(-1, 0), (MAX_SEC + 1, 0), (0, -1), (0, 1_000_000), (-(2**63), 0), (2**63 - 1, 0)],
)
def test_check_time_refuses_with_the_value_and_what_is_accepted(sec: int, usec: int) -> None:
    with pytest.raises(TtrpcError) as e:
        check_time(sec, usec)
    assert e.value.code == Code.INVALID_ARGUMENT
    msg = e.value.message
    assert f"sec={sec} usec={usec}" in msg
    assert f"accepted: sec 0 to {MAX_SEC}, usec 0 to 999999" in msg
    assert msg.startswith("SetGuestDateTime: ")


def test_max_sec_is_the_last_second_of_9999() -> None:
    assert time.gmtime(MAX_SEC)[:6] == (9999, 12, 31, 23, 59, 59)


def test_the_host_clock_split_as_the_client_sends_it_is_taken_back() -> None:
    now = time.time_ns()
    sec, usec = divmod(now // 1000, 1_000_000)  # AgentClient.set_guest_date_time
    assert check_time(sec, usec) == now // 1000 * 1000
    assert 0 <= now - check_time(sec, usec) < 1000


# -- the service ----------------------------------------------------------------------


class FakeDevice:
    """/dev/random as the service opens it and what it is asked: a real file (the
    test's) opened in its place, the ioctls recorded instead of made. Every other
    open and close goes on as usual."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
        self.opened: list[tuple[str, int]] = []
        self.fds: list[int] = []
        self.ioctls: list[tuple[int, bytes | None]] = []
        self.closed: list[int] = []
        real_open, real_close = os.open, os.close

        def fake_open(p: Any, flags: int, *a: Any, **kw: Any) -> int:
            if p != "/dev/random":
                return real_open(p, flags, *a, **kw)
            self.opened.append((p, flags))
            fd = real_open(path, os.O_WRONLY | os.O_CLOEXEC)
            self.fds.append(fd)
            return fd

        def fake_close(fd: int) -> None:
            if fd in self.fds:
                self.closed.append(fd)
            real_close(fd)

        def fake_ioctl(fd: int, request: int, arg: bytes | None = None) -> int:
            assert fd in self.fds, "an ioctl on another file than /dev/random"
            self.ioctls.append((request, arg))
            return 0

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "close", fake_close)
        monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)


def test_reseed_credits_the_bytes_then_reseeds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    fake = FakeDevice(monkeypatch, str(dev))
    seed = os.urandom(64)
    assert run(CloneService().reseed_random_dev(pb.ReseedRandomDevRequest(data=seed))) == (
        pb.Empty()
    )
    assert [p for p, _ in fake.opened] == ["/dev/random"]
    assert fake.opened[0][1] & os.O_ACCMODE == os.O_WRONLY
    assert fake.ioctls == [(RNDADDENTROPY, entropy_request(seed)), (RNDRESEEDCRNG, None)]
    assert fake.closed == fake.fds and len(fake.fds) == 1  # the device is closed again


def test_reseed_with_a_bad_seed_touches_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeDevice(monkeypatch, str(tmp_path / "random"))
    with pytest.raises(TtrpcError) as e:
        run(CloneService().reseed_random_dev(pb.ReseedRandomDevRequest(data=b"x")))
    assert e.value.code == Code.INVALID_ARGUMENT
    assert (fake.opened, fake.ioctls) == ([], [])


def test_reseed_closes_the_device_when_an_ioctl_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    fake = FakeDevice(monkeypatch, str(dev))

    def refuse(fd: int, request: int, arg: bytes | None = None) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    with pytest.raises(PermissionError):
        run(CloneService().reseed_random_dev(pb.ReseedRandomDevRequest(data=b"s" * 32)))
    assert fake.closed == fake.fds and len(fake.fds) == 1


def test_set_guest_date_time_sets_the_realtime_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(time, "clock_settime_ns", lambda c, ns: calls.append((c, ns)))
    req = pb.SetGuestDateTimeRequest(sec=1_764_186_715, usec=250_000)
    assert run(CloneService().set_guest_date_time(req)) == pb.Empty()
    assert calls == [(time.CLOCK_REALTIME, 1_764_186_715_250_000_000)]


def test_set_guest_date_time_refuses_a_bad_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(time, "clock_settime_ns", lambda c, ns: calls.append((c, ns)))
    with pytest.raises(TtrpcError, match="usec=1000000"):
        run(CloneService().set_guest_date_time(pb.SetGuestDateTimeRequest(sec=0, usec=10**6)))
    assert calls == []
