"""What a VM restored from a template must do before anything else (Kata's
ReseedRandomDev and SetGuestDateTime): every clone starts with the template's memory,
so with its entropy pool, its CRNG state and its clock.

``ReseedRandomDev`` credits host bytes to the input pool (RNDADDENTROPY) and forces a
CRNG reseed (RNDRESEEDCRNG), which bumps the CRNG generation so that every per-CPU
CRNG rekeys before its next output: nothing a clone draws afterwards (its boot_id, read
lazily on first use, included) repeats another clone's. ``SetGuestDateTime`` sets
CLOCK_REALTIME to the host's time (CLOCK_MONOTONIC goes on from the template's).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time

from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError

log = logging.getLogger("carapace.agent")

#: ioctls of /dev/random (linux/random.h): _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
#: The host bytes a reseed takes.
MIN_SEED, MAX_SEED = 16, 512
#: The seconds SetGuestDateTime accepts (1970 to the year 9999).
MAX_SEC = 253402300799


def entropy_request(data: bytes) -> bytes:
    """struct rand_pool_info for RNDADDENTROPY: bits credited, length, the bytes."""
    return struct.pack("ii", len(data) * 8, len(data)) + data


def check_seed(data: bytes) -> None:
    if not MIN_SEED <= len(data) <= MAX_SEED:
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"ReseedRandomDev: {len(data)} bytes of seed; accepted: {MIN_SEED} to {MAX_SEED}",
        )


def check_time(sec: int, usec: int) -> int:
    """The time as nanoseconds since the epoch; raises on a value out of range."""
    if not 0 <= sec <= MAX_SEC or not 0 <= usec < 1_000_000:
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"SetGuestDateTime: sec={sec} usec={usec}; accepted: sec 0 to {MAX_SEC}, "
            "usec 0 to 999999",
        )
    return sec * 1_000_000_000 + usec * 1000


class CloneService:
    async def reseed_random_dev(self, req: pb.ReseedRandomDevRequest) -> pb.Empty:
        check_seed(req.data)
        fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, entropy_request(req.data))
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
        log.info("CRNG reseeded with %d host bytes", len(req.data))
        return pb.Empty()

    async def set_guest_date_time(self, req: pb.SetGuestDateTimeRequest) -> pb.Empty:
        ns = check_time(req.sec, req.usec)
        before = time.time_ns()
        time.clock_settime_ns(time.CLOCK_REALTIME, ns)
        log.info("clock set to the host's (moved by %.3f s)", (ns - before) / 1e9)
        return pb.Empty()
