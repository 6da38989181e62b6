"""The guest's console on the host (issue 14, item 9): capped whatever the guest writes,
its tail read from the end; the sockets carapace makes for QEMU are 0600 (item 13)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from pathlib import Path

from carapace.hypervisor.base import TAIL_BYTES, TAIL_LINE, VMSpec, tail
from carapace.hypervisor.console import CONSOLE_LOG_MAX, ConsoleLog, console_tail, older
from carapace.hypervisor.qemu.channels import Channels


def total_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, older(path)) if p.exists())


def test_the_log_stays_under_its_cap_and_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path)
    line = b"line %08d of a guest that writes as much as it likes\n"
    n = 0
    for _ in range(50 * 16):  # 50 MiB in 64 KiB chunks
        chunk = b"".join(line % (n + i) for i in range(1200))
        n += 1200
        log.write(chunk[: 64 << 10])
        assert total_size(path) <= CONSOLE_LOG_MAX
    log.write(b"the end\n")
    log.close()
    assert log.total >= 50 << 20
    assert console_tail(path, 2).splitlines()[-1] == "the end"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_tail_spanning_both_halves(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, cap=64)
    for i in range(10):
        log.write(f"l{i:02d}\n".encode())  # 4 bytes a line: 8 lines a half
    log.close()
    assert path.read_text() == "l08\nl09\n"
    assert console_tail(path, 4) == "l06\nl07\nl08\nl09"
    assert total_size(path) <= 64


def test_tail_reads_from_the_end_of_a_huge_file(tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB (sparse) the old tail() read in full
        f.seek(0, os.SEEK_END)
        f.write(b"\n" + b"x" * (3 * TAIL_LINE) + b"\nsecond to last\nlast\n")
    started = time.monotonic()
    out = tail(big, 3)
    assert time.monotonic() - started < 1
    lines = out.splitlines()
    assert lines[-2:] == ["second to last", "last"]
    assert len(lines[0]) <= TAIL_LINE + 10 and lines[0].endswith("[...]")
    assert len(out) < TAIL_BYTES


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail(tmp_path / "nothing", 5) == ""
    assert console_tail(tmp_path / "nothing", 5) == ""


def test_the_pump_copies_a_socket_into_the_capped_log(tmp_path: Path) -> None:
    async def go() -> None:
        path = tmp_path / "console.log"
        qemu_end, host_end = socket.socketpair()
        qemu_end.setblocking(False)
        log = ConsoleLog(path, cap=1 << 16)
        pump = asyncio.ensure_future(log.pump(host_end))
        data = b"".join(b"%06d\n" % i for i in range(100_000))
        await asyncio.get_running_loop().sock_sendall(qemu_end, data)
        qemu_end.close()  # QEMU exits
        await asyncio.wait_for(pump, 5)
        assert log.total == len(data)
        assert total_size(path) <= 1 << 16
        assert console_tail(path, 1) == "099999"

    asyncio.run(go())


def test_channels_are_0600_sockets_whatever_the_umask(tmp_path: Path) -> None:
    spec = VMSpec(
        name="s",
        run_dir=tmp_path,
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        vcpus=1,
        memory_mib=512,
        accel="tcg",
        shared_dir=tmp_path / "shared",
    )
    old = os.umask(0)
    try:
        channels = Channels.open(spec)
    finally:
        os.umask(old)
    try:
        for path in (spec.agent_socket, spec.qmp_socket):
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        fds = channels.fds
        assert len({fds.agent, fds.qmp, fds.console}) == 3
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(spec.agent_socket))  # listening already, before QEMU runs
    finally:
        channels.close()
