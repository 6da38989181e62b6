"""carapace-agent: PID 1 of the pod VM.

It sets up the guest (mounts, modules, cgroup v2), then serves the agent API over
ttrpc on a virtio-serial port (guest/server.py). Containers are created with crun;
their stdio is relayed through ReadStdout/ReadStderr/WriteStdin calls. Stdlib +
protobuf only.

The verbs live by what they act on: guest/sandbox.py (the pod VM), containers.py,
processes.py and stdio.py; guest/pod.py holds the state they share.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

from carapace.guest import ALL_MODULES_PARAM, sysinit
from carapace.guest.server import Agent, guard

log = logging.getLogger("carapace.agent")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "component": "agent",
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main(init_started: float | None = None) -> None:
    """Run the agent; ``init_started``: the guest's monotonic clock (seconds since
    boot) when /init began, before it imported the agent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    cmdline = ""
    if os.getpid() == 1:
        started = time.monotonic()
        sysinit.early_init()
        with open("/proc/cmdline") as f:
            cmdline = f.read()
        if ALL_MODULES_PARAM in cmdline.split():
            sysinit.need_all_modules()
        # the boot's own timeline (the guest clock starts with the kernel)
        log.info(
            "guest up: /init at %.2fs after boot, agent imported at %.2fs, early init "
            "done at %.2fs",
            started if init_started is None else init_started,
            started,
            time.monotonic(),
        )
        if "carapace.probe=1" in cmdline.split():
            print("CARAPACE-PROBE-OK", flush=True)  # the host's accelerator probe
            sysinit.power_off()
    agent = Agent()
    if "carapace.hostile=" in cmdline:
        arm_hostile(agent, cmdline)
    try:
        asyncio.run(agent.serve())
    except BaseException:
        log.exception("agent exited")
        if os.getpid() == 1:
            sysinit.power_off()
        raise


def arm_hostile(agent: Agent, cmdline: str) -> None:
    """The test double of a hostile agent (guest/hostile.py), when the kernel command
    line PID 1 booted with asks for it; only tests set that parameter."""
    from carapace.guest.hostile import Hostile, modes_of

    modes = modes_of(cmdline)
    if modes:
        guarded = {name: (req, guard(name, h)) for name, req, h in agent.methods}
        Hostile(modes).arm(agent.server, guarded)


if __name__ == "__main__":
    main()
