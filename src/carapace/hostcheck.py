"""What this host has and lacks for running pods (`carapace check` prints it).

Each probe returns a ``CheckResult``; ``host_checks`` runs them all for a
configuration. The probes take what they look at (a binary, a directory, a cgroup
root, a device path) as parameters, so they are tested on temporary trees.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from carapace.config import Config
from carapace.errors import HostError
from carapace.hostcgroup import DEFAULT_ROOT, detect
from carapace.hypervisor import choose_accelerator, kvm_precheck
from carapace.image.store import GuestImage, current_image

TUN_DEVICE = Path("/dev/net/tun")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    #: A pod cannot run without it: the verdict (``ready``) counts only these.
    required: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["required"]
        return out


def ready(results: Sequence[CheckResult]) -> bool:
    """Whether the host can run pods: every required check passed."""
    return all(r.ok for r in results if r.required)


def qemu_check(binary: str) -> CheckResult:
    """The hypervisor binary exists; its version."""
    if not Path(binary).exists():
        return CheckResult(
            "qemu", False, f"{binary} missing (apt-get install qemu-system-x86)", required=True
        )
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        return CheckResult("qemu", False, f"{binary}: cannot run it: {e}", required=True)
    version = out.splitlines()[0] if out else "?"
    return CheckResult("qemu", True, f"{binary}: {version}", required=True)


def image_checks(image: GuestImage | None, image_dir: Path) -> list[CheckResult]:
    """The guest image is built, and carries crun."""
    if image is None:
        detail = f"not built in {image_dir} (carapace guest build)"
        return [CheckResult("guest image", False, detail, required=True)]
    size = image.initrd.stat().st_size / 2**20
    built = f"kernel {image.kernel_release}, initramfs {size:.1f} MiB in {image_dir}"
    inputs = image.manifest.get("inputs", {})
    packages = inputs.get("packages", {}) if isinstance(inputs, dict) else {}
    crun = packages.get("crun") if isinstance(packages, dict) else None
    return [
        CheckResult("guest image", True, built, required=True),
        CheckResult("crun in image", bool(crun), f"crun {crun}" if crun else "missing", True),
    ]


def accelerator_check(
    cfg: Config,
    qemu_ok: bool,
    image: GuestImage | None,
    precheck: Callable[[], str | None] = kvm_precheck,
) -> CheckResult:
    """The accelerator pods run under and why: by configuration or by a probe boot of
    the guest image (cached); without QEMU or an image, what can be told without one."""
    hv = cfg.hypervisor
    if qemu_ok and image is not None:
        cache = Path(cfg.runtime.state_dir) / "accel.json"
        choice = choose_accelerator(hv.accel, hv.path, image.kernel, image.initrd, cache)
        cached = " (cached probe)" if choice.cached else ""
        return CheckResult("accelerator", True, f"{choice.accel}: {choice.reason}{cached}")
    why = precheck()
    detail = "kvm may work (not probed: no image)" if why is None else f"tcg: {why}"
    return CheckResult("accelerator", True, detail)


def cgroup_check(root: str = DEFAULT_ROOT) -> CheckResult:
    """The host's cgroup version, as the host cgroup driver detects it."""
    try:
        version = detect(root)
    except HostError as e:
        return CheckResult("cgroups", False, str(e))
    return CheckResult("cgroups", True, f"host cgroup {version}")


def tun_check(device: Path = TUN_DEVICE) -> CheckResult:
    present = device.exists()
    return CheckResult("tun", present, f"{device} {'present' if present else 'missing'}")


def shared_fs_check(cfg: Config) -> CheckResult:
    """The pod share's filesystem, and its daemon when it is virtio-fs."""
    hv = cfg.hypervisor
    if hv.shared_fs != "virtio-fs":
        return CheckResult("shared fs", True, f"{hv.shared_fs} (QEMU's own server)", True)
    if not os.access(hv.virtiofsd, os.X_OK):
        detail = f"virtio-fs: {hv.virtiofsd} missing (apt-get install qemu-system-common)"
        return CheckResult("shared fs", False, detail, required=True)
    return CheckResult("shared fs", True, f"virtio-fs: {hv.virtiofsd}", required=True)


def host_checks(cfg: Config) -> list[CheckResult]:
    """Every check, in the order `carapace check` prints them."""
    qemu = qemu_check(cfg.hypervisor.path)
    image = current_image(cfg.image_dir)
    return [
        qemu,
        *image_checks(image, cfg.image_dir),
        accelerator_check(cfg, qemu.ok, image),
        shared_fs_check(cfg),
        cgroup_check(),
        tun_check(),
    ]
