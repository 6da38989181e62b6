"""Saving a VM's device state and restoring it (what VM templates are made of): QMP
``migrate`` to a file with ``x-ignore-shared`` (the RAM is in a shared file already),
and the wait for a VM started with ``-incoming`` to have loaded it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qemu.qmp import ExecuteError

from carapace.errors import HypervisorError
from carapace.hypervisor.base import tail

if TYPE_CHECKING:
    from carapace.hypervisor.qemu.vm import QemuVM


async def migration_status(vm: QemuVM) -> dict[str, object]:
    info = await vm.qmp_execute("query-migrate")
    if not isinstance(info, dict):
        raise HypervisorError(f"VM {vm.spec.name}: query-migrate answered {info!r}")
    return info


async def wait_migration(vm: QemuVM, what: str, timeout: float) -> None:
    """Wait until the migration is completed; raise with QEMU's reason if it failed,
    QEMU exited or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await migration_status(vm)
        except (ExecuteError, OSError, EOFError) as e:
            raise HypervisorError(
                f"VM {vm.spec.name}: {what}: QEMU stopped answering ({e}): "
                f"{tail(vm.spec.qemu_log, 5) or '(no output)'}"
            ) from e
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise HypervisorError(
                f"VM {vm.spec.name}: {what} {status}: "
                f"{info.get('error-desc') or tail(vm.spec.qemu_log, 5) or '(no reason)'}"
            )
        if time.monotonic() >= deadline:
            raise HypervisorError(
                f"VM {vm.spec.name}: {what} not completed in {timeout:g}s (status {status})"
            )
        await asyncio.sleep(0.02)


async def save_state(vm: QemuVM, path: Path, timeout: float) -> None:
    """Save the VM's device state to ``path`` (its RAM is in the shared
    ``memory_file`` already: ``x-ignore-shared``); the VM stops once it is saved."""
    if vm.spec.memory_file is None or not vm.spec.memory_file_shared:
        raise HypervisorError(
            f"VM {vm.spec.name}: only a VM whose RAM is a shared file can be saved"
        )
    await ignore_shared(vm)
    await send_fd(vm, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    await vm.qmp_or_error("migrate", {"uri": f"fd:{STATE_FD}"})
    await wait_migration(vm, "saving the state", timeout)


async def restore(vm: QemuVM, path: Path, timeout: float) -> None:
    """Load ``path`` into a VM started with ``-incoming defer`` and wait until done."""
    await ignore_shared(vm)
    await send_fd(vm, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    await vm.qmp_or_error("migrate-incoming", {"uri": f"fd:{STATE_FD}"})
    await wait_migration(vm, "restoring the template's state", timeout)


#: The name QEMU knows the state file's fd by.
STATE_FD = "state"


async def ignore_shared(vm: QemuVM) -> None:
    """RAM in a shared file is not part of the stream (both ends must say so)."""
    cap = {"capability": "x-ignore-shared", "state": True}
    await vm.qmp_or_error("migrate-set-capabilities", {"capabilities": [cap]})


async def send_fd(vm: QemuVM, fd: int) -> None:
    """Hand ``fd`` to QEMU as ``STATE_FD`` (and close carapace's copy)."""
    try:
        qmp = await vm.qmp_connect()
        qmp.send_fd_scm(fd)
        await vm.qmp_or_error("getfd", {"fdname": STATE_FD})
    finally:
        os.close(fd)
