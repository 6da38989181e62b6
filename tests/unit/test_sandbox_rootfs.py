"""Sharing into the guest (carapace.sandbox.rootfs): the pod files an engine binds
(/etc/hosts, /etc/resolv.conf, /etc/hostname) are copied into the share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carapace.errors import InvalidArgument
from carapace.oci.bundle import Mount, Spec
from carapace.oci.spec import default_spec
from carapace.sandbox.rootfs import RootfsShare
from carapace.sandbox.state import SandboxRecord


class NoMounts:
    def bind_mount(self, source: str, target: str, readonly: bool = False) -> None:
        pass

    def umount(self, target: str, lazy: bool = False) -> None:
        pass

    def is_mountpoint(self, path: str) -> bool:
        return False


@pytest.fixture
def share(tmp_path: Path) -> RootfsShare:
    (tmp_path / "run").mkdir()
    s = RootfsShare(
        tmp_path / "run" / "shared", SandboxRecord("p", str(tmp_path / "run")), NoMounts()
    )
    s.create()
    return s


def test_pod_files_are_copied_and_bound_from_the_share(tmp_path: Path, share: RootfsShare) -> None:
    (tmp_path / "resolv.conf").write_text("nameserver 10.96.0.10\nsearch default.svc\n")
    (tmp_path / "hosts").write_text("10.88.0.5 web\n")
    data = default_spec(["true"])
    data["mounts"] += [
        {
            "destination": "/etc/resolv.conf",
            "type": "bind",
            "source": str(tmp_path / "resolv.conf"),
            "options": ["rbind", "rprivate", "ro"],
        },
        {
            "destination": "/etc/hosts",
            "type": "bind",
            "source": str(tmp_path / "hosts"),
            "options": ["rbind", "rprivate", "rw"],
        },
        {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind"]},
    ]
    spec = Spec.from_dict(data)
    out = share.share_pod_files("c1", spec.mounts)
    by_dest = {m.destination: m for m in out}
    assert by_dest["/etc/resolv.conf"] == Mount(
        "/etc/resolv.conf",
        "bind",
        "/run/carapace/shared/c1/files/resolv.conf",
        ("rbind", "rprivate", "ro"),
    )
    assert by_dest["/etc/hosts"].source == "/run/carapace/shared/c1/files/hosts"
    assert by_dest["/data"].source == str(tmp_path)  # not a pod file: left as it was
    copied = share.shared_dir / "c1" / "files" / "resolv.conf"
    assert copied.read_text() == "nameserver 10.96.0.10\nsearch default.svc\n"
    assert spec.with_mounts(out).to_dict()["mounts"][-3]["source"].startswith("/run/carapace/")
    share.unshare("c1")
    assert not (share.shared_dir / "c1").exists()


def test_a_symlink_or_a_directory_is_refused(tmp_path: Path, share: RootfsShare) -> None:
    os.symlink("/etc/shadow", tmp_path / "evil")
    for source in (tmp_path / "evil", tmp_path):
        with pytest.raises(InvalidArgument, match="/etc/hosts"):
            share.share_pod_files("c1", (Mount("/etc/hosts", "bind", str(source), ("rbind",)),))


def test_mounts_are_typed_at_the_edge() -> None:
    data = default_spec(["true"])
    data["mounts"].append({"destination": "relative", "type": "bind"})
    with pytest.raises(InvalidArgument, match=r"mounts\[\d+\]\.destination"):
        Spec.from_dict(data)
    data["mounts"][-1] = {"destination": "/x", "options": "ro"}
    with pytest.raises(InvalidArgument, match=r"options"):
        Spec.from_dict(data)
