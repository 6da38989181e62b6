"""carapace: a sandboxed container runtime."""

from __future__ import annotations

# (``typing`` only for the type checker, which reads this constant as True: every
# process that imports carapace, the shim binary containerd runs per container
# included, would pay for importing it)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from carapace.api import RunResult, Sandbox

__all__ = ["RunResult", "Sandbox", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that the guest (which has no host-only libraries) can import carapace.
    if name in ("Sandbox", "RunResult"):
        from carapace import api

        return getattr(api, name)
    raise AttributeError(f"module 'carapace' has no attribute {name!r}")
