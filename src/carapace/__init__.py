"""carapace: a sandboxed container runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carapace.api import RunResult, Sandbox

__all__ = ["RunResult", "Sandbox", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that the guest (which has no host-only libraries) can import carapace.
    if name in ("Sandbox", "RunResult"):
        from carapace import api

        return getattr(api, name)
    raise AttributeError(f"module 'carapace' has no attribute {name!r}")
