"""How a pod's VM comes up, whatever started it (a boot, a template, a pool): the guest
files it boots, and the wait for its agent's first answer (or the VM's death)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from carapace.agent.client import AgentClient
from carapace.config import HypervisorConfig
from carapace.errors import HypervisorError, NotFound
from carapace.hypervisor import VM
from carapace.image.store import GuestImage


def guest_files(hv: HypervisorConfig, image: Callable[[], GuestImage]) -> tuple[Path, Path]:
    """The guest kernel and initrd: the configured ones, else the image's."""
    if hv.kernel and hv.initrd:
        kernel, initrd = Path(hv.kernel), Path(hv.initrd)
    else:
        img = image()
        kernel = Path(hv.kernel) if hv.kernel else img.kernel
        initrd = Path(hv.initrd) if hv.initrd else img.initrd
    for what, p in (("kernel", kernel), ("initrd", initrd)):
        if not p.is_file():
            raise NotFound(f"guest {what} {p} does not exist")
    return kernel, initrd


async def answering_agent(
    vm: VM,
    connect: Callable[[str], Awaitable[AgentClient]],
    keep: Callable[[AgentClient], None],
    timeout: float,
    sandbox_id: str,
) -> AgentClient:
    """Connect to the agent (given to ``keep`` at once: its owner closes it whatever
    happens next) and wait for it to answer, or raise why not: the VM died, the agent
    failed or did not answer within ``timeout``, with the console's last lines."""
    agent = await connect(str(vm.spec.agent_socket))
    keep(agent)
    check = asyncio.ensure_future(agent.check(timeout))
    exit_wait = asyncio.ensure_future(vm.wait())
    try:
        done, _ = await asyncio.wait(
            {check, exit_wait}, timeout=timeout + 1, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        exit_wait.cancel()
    if check in done and check.exception() is None:
        return agent
    check.cancel()
    console = vm.console_tail(15) or "(the console printed nothing)"
    if exit_wait in done or vm.exited():
        code = vm.returncode
        why = f"QEMU exited with status {'?' if code is None else code}"
    elif check.done() and check.exception() is not None:
        why = f"the agent failed: {check.exception()}"
    else:
        why = f"the agent did not answer within {timeout:g}s"
    raise HypervisorError(
        f"sandbox {sandbox_id}: the VM failed to boot ({why}). Console log tail:\n{console}"
    )
