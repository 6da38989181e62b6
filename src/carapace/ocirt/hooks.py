"""OCI hooks that run on the host, as runc runs them: the hook's path with its args
(args[0] is argv[0]) and env, the container's state as JSON on stdin, within its
timeout. A failing prestart/createRuntime/poststart hook fails the verb; a failing
poststop hook is reported and ignored (runc's rules)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from typing import Any

from carapace.errors import HostError

#: Seconds a hook without a timeout may take.
DEFAULT_TIMEOUT = 120
#: Bytes of a failing hook's output kept in the error.
OUTPUT_KEPT = 512


def run_hooks(kind: str, hooks: Mapping[str, Any], state: dict[str, Any]) -> None:
    """Run the hooks of ``kind`` in order; HostError names the first that failed."""
    data = json.dumps(state).encode()
    for i, hook in enumerate(hooks.get(kind) or []):
        argv = [str(a) for a in hook.get("args") or [hook["path"]]]
        env = {}
        for item in hook.get("env") or []:
            key, _, value = str(item).partition("=")
            env[key] = value
        timeout = hook.get("timeout") or DEFAULT_TIMEOUT
        what = f"{kind} hook #{i} ({hook['path']})"
        try:
            proc = subprocess.run(
                argv,
                executable=hook["path"],
                input=data,
                capture_output=True,
                env=env,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HostError(f"{what} timed out after {timeout}s") from None
        except OSError as e:
            raise HostError(f"{what}: {e.strerror}") from e
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise HostError(
                f"{what} exited with {proc.returncode}: {out[-OUTPUT_KEPT:] or '(no output)'}"
            )
