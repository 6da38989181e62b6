"""Sandbox and container lifecycle on the host."""

from carapace.sandbox.plan import HostFacts, SandboxOptions, SandboxPlan
from carapace.sandbox.sandbox import Sandbox, SandboxParts
from carapace.sandbox.state import Runstate
from carapace.sandbox.stdio import ProcessIO

__all__ = [
    "HostFacts",
    "ProcessIO",
    "Runstate",
    "Sandbox",
    "SandboxOptions",
    "SandboxParts",
    "SandboxPlan",
]
