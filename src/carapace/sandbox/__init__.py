"""Sandbox and container lifecycle on the host."""

from carapace.sandbox.sandbox import ProcessIO, Sandbox, SandboxOptions

__all__ = ["ProcessIO", "Sandbox", "SandboxOptions"]
