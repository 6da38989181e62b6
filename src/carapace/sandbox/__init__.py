"""Sandbox and container lifecycle on the host.

The names below are loaded when first used (PEP 562): importing one module of the
package (the OCI runtime's verbs need ``plan``, the shim's start and delete ``state``)
does not import the Sandbox and everything it leans on."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from carapace.sandbox.plan import HostFacts, SandboxOptions, SandboxPlan
    from carapace.sandbox.sandbox import Sandbox, SandboxParts
    from carapace.sandbox.state import Runstate
    from carapace.sandbox.stdio import ProcessIO

#: Each exported name and the module of the package it comes from.
_EXPORTS = {
    "HostFacts": "plan",
    "SandboxOptions": "plan",
    "SandboxPlan": "plan",
    "Sandbox": "sandbox",
    "SandboxParts": "sandbox",
    "Runstate": "state",
    "ProcessIO": "stdio",
}

__all__ = [
    "HostFacts",
    "ProcessIO",
    "Runstate",
    "Sandbox",
    "SandboxOptions",
    "SandboxParts",
    "SandboxPlan",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
