"""Host probing for `carapace check` (carapace.hostcheck), on temporary trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carapace.config import load_config
from carapace.hostcheck import (
    CheckResult,
    accelerator_check,
    cgroup_check,
    image_checks,
    qemu_check,
    ready,
    tun_check,
)
from carapace.image.store import GuestImage


def fake_qemu(tmp_path: Path, version: str = "QEMU emulator version 7.2.11") -> Path:
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text(f"#!/bin/sh\necho '{version}'\necho 'Copyright (c) 2003-2022'\n")
    binary.chmod(0o755)
    return binary


def guest_image(tmp_path: Path, packages: object = None) -> GuestImage:
    (tmp_path / "vmlinux").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"\0" * (3 * 2**20 // 2))  # 1.5 MiB
    manifest: dict[str, object] = {"kernel_release": "6.1.0-28-amd64"}
    if packages is not None:
        manifest["inputs"] = {"packages": packages}
    return GuestImage(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        rootfs=tmp_path / "rootfs",
        manifest=manifest,
    )


# --- qemu ---------------------------------------------------------------------------------


def test_qemu_present_with_its_version(tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path)
    r = qemu_check(str(binary))
    assert r == CheckResult("qemu", True, f"{binary}: QEMU emulator version 7.2.11", True)


def test_qemu_missing_says_how_to_get_it(tmp_path: Path) -> None:
    r = qemu_check(str(tmp_path / "nope"))
    assert (r.name, r.ok, r.required) == ("qemu", False, True)
    assert str(tmp_path / "nope") in r.detail and "apt-get install qemu-system-x86" in r.detail


def test_qemu_that_cannot_run(tmp_path: Path) -> None:
    binary = tmp_path / "qemu"
    binary.write_text("not a program")  # not executable
    r = qemu_check(str(binary))
    assert not r.ok and "cannot run" in r.detail


def test_qemu_printing_nothing(tmp_path: Path) -> None:
    binary = tmp_path / "qemu"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert qemu_check(str(binary)).detail == f"{binary}: ?"


# --- the guest image ------------------------------------------------------------------------


def test_image_with_crun(tmp_path: Path) -> None:
    rows = image_checks(guest_image(tmp_path, {"crun": "1.8.1-1+deb12u1"}), tmp_path)
    assert rows == [
        CheckResult(
            "guest image",
            True,
            f"kernel 6.1.0-28-amd64, initramfs 1.5 MiB in {tmp_path}",
            True,
        ),
        CheckResult("crun in image", True, "crun 1.8.1-1+deb12u1", True),
    ]


@pytest.mark.parametrize("packages", [None, {}, {"busybox": "1"}, ["crun"]])
def test_image_without_crun(tmp_path: Path, packages: object) -> None:
    rows = image_checks(guest_image(tmp_path, packages), tmp_path)
    assert [r.ok for r in rows] == [True, False]
    assert rows[1] == CheckResult("crun in image", False, "missing", True)


def test_no_image(tmp_path: Path) -> None:
    rows = image_checks(None, tmp_path)
    assert rows == [
        CheckResult("guest image", False, f"not built in {tmp_path} (carapace guest build)", True)
    ]


# --- the accelerator ---------------------------------------------------------------------------


def config_with(tmp_path: Path, accel: str) -> Path:
    path = tmp_path / "carapace.toml"
    path.write_text(
        f'[hypervisor]\naccel = "{accel}"\n[runtime]\nstate_dir = "{tmp_path / "state"}"\n'
    )
    return path


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_accelerator_set_by_configuration(tmp_path: Path, accel: str) -> None:
    cfg = load_config(config_with(tmp_path, accel))
    r = accelerator_check(cfg, True, guest_image(tmp_path), precheck=lambda: "unused")
    assert r.ok and not r.required
    assert r.detail.startswith(f"{accel}: ") and "configuration" in r.detail


def test_accelerator_without_qemu(tmp_path: Path) -> None:
    """No QEMU to probe with: what can be told without booting."""
    cfg = load_config(config_with(tmp_path, "auto"))
    image = guest_image(tmp_path)
    r = accelerator_check(cfg, False, image, precheck=lambda: "cannot open /dev/kvm: EACCES")
    assert r == CheckResult("accelerator", True, "tcg: cannot open /dev/kvm: EACCES")


def test_accelerator_without_an_image(tmp_path: Path) -> None:
    cfg = load_config(config_with(tmp_path, "auto"))
    assert accelerator_check(cfg, True, None, precheck=lambda: None).detail == (
        "kvm may work (not probed: no image)"
    )
    r = accelerator_check(cfg, True, None, precheck=lambda: "KVM here is the PVM module")
    assert r.detail == "tcg: KVM here is the PVM module"


# --- cgroups and tun ---------------------------------------------------------------------------


def test_cgroup_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert cgroup_check(str(tmp_path)) == CheckResult("cgroups", True, "host cgroup v2")


def test_cgroup_v1(tmp_path: Path) -> None:
    for controller in ("cpu,cpuacct", "memory"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "cgroup.procs").write_text("")
    (tmp_path / "unified").mkdir()  # the empty cgroup2 mount of a hybrid host
    (tmp_path / "unified" / "cgroup.procs").write_text("")
    assert cgroup_check(str(tmp_path)) == CheckResult("cgroups", True, "host cgroup v1")


def test_no_cgroupfs(tmp_path: Path) -> None:
    r = cgroup_check(str(tmp_path))
    assert not r.ok and not r.required
    assert str(tmp_path) in r.detail and "cgroupfs mounted" in r.detail


def test_tun(tmp_path: Path) -> None:
    device = tmp_path / "tun"
    assert tun_check(device) == CheckResult("tun", False, f"{device} missing")
    device.write_text("")
    assert tun_check(device) == CheckResult("tun", True, f"{device} present")


# --- the verdict --------------------------------------------------------------------------------


def test_ready_counts_only_required_checks() -> None:
    required = CheckResult("qemu", True, "", True)
    optional_no = CheckResult("tun", False, "")
    assert ready([required, optional_no]) is True
    assert ready([required, CheckResult("guest image", False, "", True)]) is False
    assert ready([]) is True


def test_the_json_form_is_what_check_always_printed() -> None:
    out = CheckResult("qemu", True, "x", True).to_dict()
    assert out == {"name": "qemu", "ok": True, "detail": "x"}
    json.dumps(out)


def test_real_host_checks_run(tmp_path: Path) -> None:
    """Every probe on this host, with a configuration pointing at nothing built."""
    from carapace.hostcheck import host_checks

    path = tmp_path / "carapace.toml"
    path.write_text(
        f'[hypervisor]\npath = "{tmp_path / "no-qemu"}"\nimage_dir = "{tmp_path / "img"}"\n'
    )
    results = host_checks(load_config(path))
    assert [r.name for r in results] == [
        "qemu",
        "guest image",
        "accelerator",
        "shared fs",
        "cgroups",
        "tun",
    ]
    assert not ready(results)
    assert not results[0].ok and not results[1].ok


def test_shared_fs_needs_virtiofsd_only_for_virtio_fs(tmp_path: Path) -> None:
    from carapace.config import Config
    from carapace.hostcheck import shared_fs_check

    cfg = Config()
    cfg.hypervisor.virtiofsd = str(tmp_path / "virtiofsd")
    missing = shared_fs_check(cfg)
    assert not missing.ok and missing.required and "qemu-system-common" in missing.detail
    (tmp_path / "virtiofsd").write_text("#!/bin/sh\n")
    (tmp_path / "virtiofsd").chmod(0o755)
    assert shared_fs_check(cfg).ok
    cfg.hypervisor.shared_fs = "virtio-9p"
    cfg.hypervisor.virtiofsd = "/nonexistent"
    assert shared_fs_check(cfg).ok
