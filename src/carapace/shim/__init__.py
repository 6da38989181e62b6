"""containerd shim v2 for carapace: one shim process (and one VM) per pod."""
