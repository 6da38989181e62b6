"""Choosing the accelerator by probing, never by the existence of /dev/kvm alone.

KVM is used when /dev/kvm opens, the KVM module is not PVM-only (kvm_pvm runs only
specially built guest kernels) and a probe guest actually boots under it. Otherwise
TCG. The verdict is cached per (QEMU binary, guest kernel, host kernel) and can be
overridden by configuration.toml's [hypervisor] accel.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

from carapace.hypervisor.base import BASE_KERNEL_PARAMS, AccelChoice

PROBE_MARKER = "CARAPACE-PROBE-OK"
PROBE_TIMEOUT = 30.0


def kvm_precheck(dev: str = "/dev/kvm", sysmodule: str = "/sys/module") -> str | None:
    """Why KVM cannot be used, judged without booting anything; None if it may be."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        return f"cannot open {dev}: {e.strerror}"
    mods = set(os.listdir(sysmodule)) if os.path.isdir(sysmodule) else set()
    if "kvm_pvm" in mods and not ({"kvm_intel", "kvm_amd"} & mods):
        return (
            "KVM here is the PVM module (kvm_pvm), which runs only PVM-enabled guest "
            "kernels; a stock kernel cannot boot under it"
        )
    return None


def boot_probe(qemu: str, kernel: Path, initrd: Path, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Boot the guest image under KVM until the agent prints the probe marker.
    None on success, else why it failed."""
    with tempfile.TemporaryDirectory(prefix="carapace-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            qemu,
            "-machine",
            "q35,accel=kvm",
            "-cpu",
            "host",
            "-m",
            "512M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            BASE_KERNEL_PARAMS + " carapace.probe=1",
            "-serial",
            f"file:{console}",
        ]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            out = r.stderr.strip()
        except subprocess.TimeoutExpired:
            out = f"no guest output within {timeout:g}s"
        text = console.read_text(errors="replace") if console.exists() else ""
        if PROBE_MARKER in text:
            return None
        return f"a probe guest did not boot under KVM: {out.splitlines()[-1] if out else 'hung'}"


def _cache_key(qemu: str, kernel: Path) -> str:
    h = hashlib.sha256()
    for p in (qemu, str(kernel)):
        try:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(p.encode())
    h.update(platform.release().encode())
    return h.hexdigest()


def choose_accelerator(
    setting: str, qemu: str, kernel: Path, initrd: Path, cache_file: Path | None
) -> AccelChoice:
    """The accelerator to use given configuration's ``accel`` (auto|kvm|tcg)."""
    if setting in ("kvm", "tcg"):
        return AccelChoice(setting, f"set by configuration (accel = {setting!r})")
    key = _cache_key(qemu, kernel)
    if cache_file is not None:
        try:
            data = json.loads(cache_file.read_text())
            if data.get("key") == key:
                return AccelChoice(data["accel"], data["reason"], cached=True)
        except (OSError, ValueError, KeyError):
            pass
    why_not = kvm_precheck()
    if why_not is None:
        why_not = boot_probe(qemu, kernel, initrd)
    choice = (
        AccelChoice("kvm", "KVM opens and a probe guest booted under it")
        if why_not is None
        else AccelChoice("tcg", f"TCG (software emulation): {why_not}")
    )
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            data = asdict(choice)
            data.pop("cached")
            cache_file.write_text(json.dumps({"key": key, **data}) + "\n")
        except OSError:
            pass
    return choice
