"""Container processes through the async Sandbox: signals, exec, terminals, and a VM
that fails to boot."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from carapace.config import load_config
from carapace.errors import HypervisorError, InvalidArgument
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec, process_spec
from carapace.sandbox import ProcessIO, Sandbox, SandboxOptions

from .conftest import RUN_ROOT, qemu_pids


async def _lifecycle() -> None:
    sb = Sandbox(load_config(), SandboxOptions(memory="1G"))
    await sb.start()
    try:
        rootfs = sb.image().rootfs
        # a long-running container, killed with SIGKILL from the host: 137
        await sb.create_container("sleeper", Spec.from_dict(default_spec(["sleep", "300"])), rootfs)
        await sb.start_container("sleeper")
        # exec into it while it runs
        out: list[bytes] = []
        code = await sb.exec(
            "sleeper",
            "e1",
            process_spec(["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; exit 7"]),
            ProcessIO(stdout=out.append),
        )
        assert (code, b"".join(out)) == (7, b"sleep 300 ")
        await sb.kill("sleeper", signal.SIGKILL)
        assert await sb.wait("sleeper") == 137
        await sb.remove_container("sleeper")
        assert not (sb.shared_dir / "sleeper").exists()

        # a terminal: the process sees a tty and the size the host sets
        tty_out: list[bytes] = []
        resized = asyncio.Event()

        tasks = []

        def on_started(resize):  # type: ignore[no-untyped-def]
            async def go() -> None:
                await resize(33, 101)
                resized.set()

            tasks.append(asyncio.ensure_future(go()))

        code = await sb.run(
            ["sh", "-c", "sleep 1; tty; stty size"],
            terminal=True,
            io=ProcessIO(stdout=tty_out.append, on_started=on_started),
        )
        text = b"".join(tty_out).decode()
        assert code == 0 and resized.is_set()
        assert "/dev/pts/" in text and "33 101" in text, text
    finally:
        await sb.destroy()
    assert not sb.run_dir.exists()


def test_kill_exec_and_terminal() -> None:
    asyncio.run(_lifecycle())


def test_vm_that_fails_to_boot(tmp_path: Path) -> None:
    cfg = load_config()
    bad = tmp_path / "corrupt-initrd.img"
    bad.write_bytes(b"this is not an initramfs\n" * 1000)
    cfg.hypervisor.initrd = str(bad)
    cfg.hypervisor.boot_timeout = 60
    before = qemu_pids()
    sb = Sandbox(cfg, SandboxOptions(memory="1G"))
    with pytest.raises(HypervisorError) as exc:
        asyncio.run(sb.start())
    msg = str(exc.value)
    assert "failed to boot" in msg and "Console log tail" in msg
    assert "Kernel panic" in msg or "VFS" in msg or "initramfs" in msg.lower(), msg
    assert not (RUN_ROOT / sb.id).exists()
    assert not (qemu_pids() - before)


def test_bad_sizes_are_refused_before_anything_starts() -> None:
    before = set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()
    with pytest.raises(InvalidArgument, match="100M"):
        Sandbox(load_config(), SandboxOptions(memory="100M"))
    with pytest.raises(InvalidArgument, match="'x'"):
        Sandbox(load_config(), SandboxOptions(cpus="x"))
    assert (set(RUN_ROOT.iterdir()) if RUN_ROOT.exists() else set()) == before
