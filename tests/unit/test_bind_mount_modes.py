"""``linux.bind_mount``'s read-only and propagation modes on real mounts (root; tmpfs
under pytest's tmp_path, all unmounted at the end)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from carapace import linux

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def options_of(target: Path) -> set[str]:
    """The per-mount options of the topmost mount at ``target``."""
    found = [
        set(fields[5].split(","))
        for fields in map(str.split, Path("/proc/self/mountinfo").read_text().splitlines())
        if linux.unescape_mountinfo(fields[4]) == str(target)
    ]
    assert found, f"nothing mounted at {target}"
    return found[-1]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """``src`` a shared tmpfs (as kubelet's volumes lie on shared mounts) with a tmpfs
    submount at ``src/sub``; ``share`` a shared mount and ``view`` its slave (the
    pod's share and the VM's view of it)."""
    for d in ("src", "share", "view"):
        (tmp_path / d).mkdir()

    def mount(*argv: str) -> None:
        subprocess.run(["mount", *argv], check=True)

    try:
        mount("-t", "tmpfs", "tmpfs", str(tmp_path / "src"))
        subprocess.run(["mount", "--make-shared", str(tmp_path / "src")], check=True)
        for d in ("sub", "late", "in"):
            (tmp_path / "src" / d).mkdir()
        mount("-t", "tmpfs", "tmpfs", str(tmp_path / "src" / "sub"))
        mount("--bind", str(tmp_path / "share"), str(tmp_path / "share"))
        subprocess.run(["mount", "--make-shared", str(tmp_path / "share")], check=True)
        mount("--bind", str(tmp_path / "share"), str(tmp_path / "view"))
        subprocess.run(["mount", "--make-slave", str(tmp_path / "view")], check=True)
        yield tmp_path
    finally:
        for p in ("view", "share", "src"):
            subprocess.run(["umount", "-R", "-l", str(tmp_path / p)], check=False)


def test_a_slave_bind_follows_the_hosts_later_mounts_and_a_private_one_does_not(
    tree: Path,
) -> None:
    src = tree / "src"
    linux.bind_mount(str(src), str(tree / "share" / "slave"), propagation=linux.MS_SLAVE)
    linux.bind_mount(str(src), str(tree / "share" / "private"), propagation=linux.MS_PRIVATE)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(src / "late")], check=True)
    (src / "late" / "f").write_text("late\n")
    # through the share into its view (what the VM's file server serves)
    assert (tree / "view" / "slave" / "late" / "f").read_text() == "late\n"
    assert not (tree / "view" / "private" / "late" / "f").exists()
    # a mount made in the share never reaches the host's source
    subprocess.run(
        ["mount", "-t", "tmpfs", "tmpfs", str(tree / "share" / "slave" / "in")], check=True
    )
    (tree / "share" / "slave" / "in" / "g").write_text("g\n")
    assert not (src / "in" / "g").exists()
    assert (tree / "view" / "slave" / "in" / "g").exists()


def test_ro_leaves_the_mounts_below_as_they_are_and_rro_does_not(tree: Path) -> None:
    src, share = tree / "src", tree / "share"
    linux.bind_mount(str(src), str(share / "ro"), readonly=True, readonly_below=False)
    linux.bind_mount(str(src), str(share / "rro"), readonly=True)
    for name, below in (("ro", "rw"), ("rro", "ro")):
        assert {"ro", "nosuid", "nodev"} <= options_of(share / name)
        assert {below, "nosuid", "nodev"} <= options_of(share / name / "sub")
        # the view's copies carry the same flags
        assert options_of(tree / "view" / name / "sub") >= {below}
    (share / "ro" / "sub" / "w").write_text("w\n")
    with pytest.raises(OSError, match="Read-only file system"):
        (share / "rro" / "sub" / "x").write_text("x\n")
    with pytest.raises(OSError, match="Read-only file system"):
        (share / "ro" / "x").write_text("x\n")
