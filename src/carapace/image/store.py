"""The guest image on disk: what a sandbox boots, read from the image directory.

An image directory holds ``vmlinux``, ``initrd.img``, the default container ``rootfs/``
and ``manifest.json`` (written last by the builder, with the size of each output).
Reading it needs nothing but the stdlib, so the sandbox and the CLI use this module
without the builder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
KERNEL = "vmlinux"
INITRD = "initrd.img"
ROOTFS = "rootfs"


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what the hypervisor boots."""

    kernel: Path
    initrd: Path
    rootfs: Path  # default container rootfs (busybox)
    manifest: dict[str, object]

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])


def current_image(image_dir: Path | str) -> GuestImage | None:
    """The image in ``image_dir``, if it is complete and its files match the manifest."""
    image_dir = Path(image_dir)
    try:
        manifest = json.loads((image_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    outputs = manifest.get("outputs", {})
    for name in (KERNEL, INITRD):
        path = image_dir / name
        meta = outputs.get(name)
        if not meta or not path.exists() or path.stat().st_size != meta.get("size"):
            return None
    if not (image_dir / ROOTFS / "bin" / "busybox").exists():
        return None
    return GuestImage(
        kernel=image_dir / KERNEL,
        initrd=image_dir / INITRD,
        rootfs=image_dir / ROOTFS,
        manifest=manifest,
    )
