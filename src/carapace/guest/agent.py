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

from carapace.guest import sysinit
from carapace.guest.server import Agent

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


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if os.getpid() == 1:
        started = time.monotonic()
        sysinit.early_init()
        log.info(
            "guest up: agent started at %.2fs after boot, early init took %.2fs",
            started,
            time.monotonic() - started,
        )
        with open("/proc/cmdline") as f:
            if "carapace.probe=1" in f.read().split():
                print("CARAPACE-PROBE-OK", flush=True)  # the host's accelerator probe
                sysinit.power_off()
    try:
        asyncio.run(Agent().serve())
    except BaseException:
        log.exception("agent exited")
        if os.getpid() == 1:
            sysinit.power_off()
        raise


if __name__ == "__main__":
    main()
