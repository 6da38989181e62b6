"""Choosing the accelerator (carapace.hypervisor.qemu.accel), with no VM booted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carapace.hypervisor.qemu import accel
from carapace.hypervisor.qemu.accel import AccelChoice, choose_accelerator, kvm_precheck


def sysmodule(tmp_path: Path, *mods: str) -> str:
    d = tmp_path / "sys" / "module"
    d.mkdir(parents=True, exist_ok=True)
    for m in mods:
        (d / m).mkdir()
    return str(d)


@pytest.fixture
def dev(tmp_path: Path) -> str:
    """A path that opens O_RDWR, standing in for /dev/kvm."""
    p = tmp_path / "kvm"
    p.write_bytes(b"")
    return str(p)


def test_precheck_unopenable_device(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-kvm")
    reason = kvm_precheck(dev=missing, sysmodule=sysmodule(tmp_path, "kvm", "kvm_intel"))
    assert reason is not None
    assert f"cannot open {missing}" in reason
    assert "No such file" in reason


def test_precheck_directory_cannot_be_opened_rdwr(tmp_path: Path) -> None:
    reason = kvm_precheck(dev=str(tmp_path), sysmodule=sysmodule(tmp_path, "kvm_intel"))
    assert reason is not None and reason.startswith(f"cannot open {tmp_path}")


def test_precheck_pvm_only(tmp_path: Path, dev: str) -> None:
    reason = kvm_precheck(dev=dev, sysmodule=sysmodule(tmp_path, "kvm", "kvm_pvm"))
    assert reason is not None
    assert "PVM" in reason and "kvm_pvm" in reason


@pytest.mark.parametrize(
    "mods",
    [("kvm", "kvm_intel"), ("kvm", "kvm_amd"), ("kvm", "kvm_pvm", "kvm_intel"), ("kvm",), ()],
)
def test_precheck_ok(tmp_path: Path, dev: str, mods: tuple[str, ...]) -> None:
    assert kvm_precheck(dev=dev, sysmodule=sysmodule(tmp_path, *mods)) is None


def test_precheck_without_sysmodule(tmp_path: Path, dev: str) -> None:
    assert kvm_precheck(dev=dev, sysmodule=str(tmp_path / "absent")) is None


class Probes:
    """Stand-ins for kvm_precheck and boot_probe that count their calls."""

    def __init__(self, precheck: str | None = None, boot: str | None = None) -> None:
        self.precheck_result = precheck
        self.boot_result = boot
        self.prechecks = 0
        self.boots = 0

    def precheck(self, *args: object, **kw: object) -> str | None:
        self.prechecks += 1
        return self.precheck_result

    def boot(self, *args: object, **kw: object) -> str | None:
        self.boots += 1
        return self.boot_result


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, Path, Path]:
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_bytes(b"qemu")
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd")
    return str(qemu), kernel, initrd


def install(monkeypatch: pytest.MonkeyPatch, probes: Probes) -> None:
    monkeypatch.setattr(accel, "kvm_precheck", probes.precheck)
    monkeypatch.setattr(accel, "boot_probe", probes.boot)


@pytest.mark.parametrize("setting", ["kvm", "tcg"])
def test_setting_overrides_without_probing(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    files: tuple[str, Path, Path],
    setting: str,
) -> None:
    probes = Probes(precheck="should not be asked")
    install(monkeypatch, probes)
    cache = tmp_path / "cache" / "accel.json"
    choice = choose_accelerator(setting, *files, cache_file=cache)
    assert choice.accel == setting
    assert choice.cached is False
    assert "configuration" in choice.reason
    assert probes.prechecks == 0 and probes.boots == 0
    assert not cache.exists()


def test_auto_probes_and_caches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: tuple[str, Path, Path]
) -> None:
    probes = Probes()
    install(monkeypatch, probes)
    cache = tmp_path / "cache" / "accel.json"  # parent does not exist yet
    first = choose_accelerator("auto", *files, cache_file=cache)
    assert first.accel == "kvm"
    assert first.cached is False
    assert (probes.prechecks, probes.boots) == (1, 1)
    data = json.loads(cache.read_text())
    assert data["accel"] == "kvm"
    assert data["reason"] == first.reason
    assert "cached" not in data
    assert len(data["key"]) == 64

    second = choose_accelerator("auto", *files, cache_file=cache)
    assert second == AccelChoice(first.accel, first.reason, cached=True)
    assert (probes.prechecks, probes.boots) == (1, 1)


def test_auto_falls_back_to_tcg_when_precheck_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: tuple[str, Path, Path]
) -> None:
    probes = Probes(precheck="cannot open /dev/kvm: No such file or directory")
    install(monkeypatch, probes)
    cache = tmp_path / "accel.json"
    choice = choose_accelerator("auto", *files, cache_file=cache)
    assert choice.accel == "tcg"
    assert "cannot open /dev/kvm" in choice.reason
    assert probes.boots == 0  # no probe boot when the precheck already says no
    again = choose_accelerator("auto", *files, cache_file=cache)
    assert (again.accel, again.cached) == ("tcg", True)
    assert again.reason == choice.reason


def test_auto_falls_back_to_tcg_when_probe_guest_fails(
    monkeypatch: pytest.MonkeyPatch, files: tuple[str, Path, Path]
) -> None:
    probes = Probes(boot="a probe guest did not boot under KVM: hung")
    install(monkeypatch, probes)
    choice = choose_accelerator("auto", *files, cache_file=None)
    assert choice.accel == "tcg"
    assert "did not boot" in choice.reason
    assert (probes.prechecks, probes.boots) == (1, 1)


def test_cache_invalidated_when_kernel_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: tuple[str, Path, Path]
) -> None:
    probes = Probes()
    install(monkeypatch, probes)
    cache = tmp_path / "accel.json"
    qemu, kernel, initrd = files
    choose_accelerator("auto", qemu, kernel, initrd, cache_file=cache)
    kernel.write_bytes(b"a different kernel")
    probes.precheck_result = "now broken"
    choice = choose_accelerator("auto", qemu, kernel, initrd, cache_file=cache)
    assert (choice.accel, choice.cached) == ("tcg", False)
    assert probes.prechecks == 2


def test_corrupt_cache_is_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: tuple[str, Path, Path]
) -> None:
    probes = Probes()
    install(monkeypatch, probes)
    cache = tmp_path / "accel.json"
    cache.write_text("{not json")
    choice = choose_accelerator("auto", *files, cache_file=cache)
    assert (choice.accel, choice.cached) == ("kvm", False)
    assert json.loads(cache.read_text())["accel"] == "kvm"


def test_no_cache_file_probes_every_time(
    monkeypatch: pytest.MonkeyPatch, files: tuple[str, Path, Path]
) -> None:
    probes = Probes()
    install(monkeypatch, probes)
    choose_accelerator("auto", *files, cache_file=None)
    choose_accelerator("auto", *files, cache_file=None)
    assert probes.prechecks == 2
