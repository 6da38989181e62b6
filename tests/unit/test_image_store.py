"""Reading the current guest image from an image directory (carapace.image.store)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from carapace.image import builder, store
from carapace.image.store import GuestImage, current_image


def make_image(d: Path, kernel: bytes = b"K" * 100, initrd: bytes = b"I" * 50) -> Path:
    (d / "vmlinux").write_bytes(kernel)
    (d / "initrd.img").write_bytes(initrd)
    (d / "rootfs" / "bin").mkdir(parents=True)
    (d / "rootfs" / "bin" / "busybox").write_bytes(b"\x7fELF")
    manifest = {
        "kernel_release": "6.1.0-test-amd64",
        "outputs": {"vmlinux": {"size": len(kernel)}, "initrd.img": {"size": len(initrd)}},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_a_complete_image(tmp_path: Path) -> None:
    img = current_image(make_image(tmp_path))
    assert img == GuestImage(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        rootfs=tmp_path / "rootfs",
        manifest=json.loads((tmp_path / "manifest.json").read_text()),
    )
    assert img.kernel_release == "6.1.0-test-amd64"
    assert current_image(str(tmp_path)) == img


def test_no_image_dir(tmp_path: Path) -> None:
    assert current_image(tmp_path / "absent") is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "manifest.json").write_text("{not json"),
        lambda d: (d / "manifest.json").unlink(),
        lambda d: (d / "initrd.img").write_bytes(b"short"),  # size differs from the manifest
        lambda d: (d / "vmlinux").unlink(),
        lambda d: (d / "rootfs" / "bin" / "busybox").unlink(),
        lambda d: (d / "manifest.json").write_text(json.dumps({"outputs": {}})),
        lambda d: (d / "manifest.json").write_text("[]"),
    ],
    ids=["bad-json", "no-manifest", "size", "no-kernel", "no-busybox", "no-outputs", "list"],
)
def test_an_incomplete_image_is_none(tmp_path: Path, damage: object) -> None:
    make_image(tmp_path)
    damage(tmp_path)  # type: ignore[operator]
    assert current_image(tmp_path) is None


def test_the_builder_reads_the_image_through_the_store(tmp_path: Path) -> None:
    make_image(tmp_path)
    assert builder.ImageBuilder(tmp_path).current() == current_image(tmp_path)
    assert builder.ImageBuilder(tmp_path).manifest_path == tmp_path / store.MANIFEST
    assert builder.GuestImage is GuestImage
    assert builder.ImageBuilder(tmp_path / "none").current() is None


def imported_after(statement: str) -> set[str]:
    """The carapace modules a fresh interpreter has loaded after ``statement``."""
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in r.stdout.split() if m.split(".")[0] == "carapace"}


def test_the_store_imports_nothing_of_carapace() -> None:
    assert imported_after("import carapace.image.store") == {
        "carapace",
        "carapace.image",
        "carapace.image.store",
    }


def test_the_builder_does_not_import_the_api() -> None:
    # `import carapace` for the package's path used to close the cycle
    # carapace -> api -> sandbox -> image.builder -> carapace
    loaded = imported_after("import carapace.image.builder")
    assert not {m for m in loaded if m.startswith(("carapace.api", "carapace.sandbox"))}
    assert "carapace.guest" in loaded  # for SHIPPED
    assert "carapace.guest.agent" not in loaded
