"""carapace: a sandboxed container runtime."""
