"""The host's processes as the tests look at them: (pid, argv) from /proc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def processes() -> Iterator[tuple[int, list[bytes]]]:
    """Every process still having a command line (not a zombie), with its argv."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0]:
            yield int(entry.name), argv


def is_carapace_shim(argv: list[bytes]) -> bool:
    """A containerd-shim-carapace-v2 process (run as a script: argv[1] is the script)."""
    return any(a.endswith((b"containerd-shim-carapace-v2", b"carapace.shim")) for a in argv[:3])


def qemu_of(sandbox_id: str) -> list[int]:
    """QEMU processes of one carapace sandbox (its -name carries the id)."""
    name = f"carapace-{sandbox_id},".encode()
    return [
        pid
        for pid, argv in processes()
        if b"-name" in argv and any(a.startswith(name) for a in argv)
    ]
