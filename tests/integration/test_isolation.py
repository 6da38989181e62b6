"""Isolation of the pod's share, with real VMs: guest root (a container with every
capability and every device allowed, as a container that escaped to guest root is)
cannot make a device node on the host, cannot write a read-only volume even after
remounting it read-write in the guest, and the file servers (QEMU's 9p, virtiofsd)
see the share's tree read-only: only the rootfs and volume leaves are theirs to write.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import carapace
from carapace import linux
from carapace.config import load_config
from carapace.oci.bundle import Spec
from carapace.oci.spec import default_spec
from carapace.sandbox import ProcessIO
from carapace.storage.virtiofsd import daemons_of

#: Every capability a container can have (a privileged container's set).
ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP",
]  # fmt: skip


@dataclasses.dataclass
class Pod:
    sb: carapace.Sandbox
    rw: Path  # a host directory bound read-write at /rw
    ro: Path  # a host directory bound read-only (rro) at /ro, with a tmpfs submount at sub/

    def root_sh(self, script: str) -> tuple[int, str]:
        """``sh -c script`` as guest root with every capability and device."""
        spec = default_spec(["sh", "-c", script])
        spec["process"]["capabilities"] = {
            k: ALL_CAPS for k in ("bounding", "effective", "permitted")
        }
        spec["process"]["noNewPrivileges"] = False
        spec["linux"].pop("maskedPaths", None)
        spec["linux"].pop("readonlyPaths", None)
        spec["linux"].setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
        spec["mounts"] += [
            {"destination": "/rw", "type": "bind", "source": str(self.rw), "options": ["rbind"]},
            {
                "destination": "/ro",
                "type": "bind",
                "source": str(self.ro),
                "options": ["rbind", "rro"],  # recursive: sub/ read-only too
            },
        ]
        out: list[bytes] = []
        io = ProcessIO(stdout=out.append, stderr=out.append)
        code = self.sb.call_async(lambda s: s.run(spec=Spec.from_dict(spec), io=io))
        return code, b"".join(out).decode(errors="replace")


@pytest.fixture(scope="module", params=["virtio-fs", "virtio-9p"])
def pod(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    base = tmp_path_factory.mktemp(f"isolation-{request.param}")
    rw, ro = base / "rw", base / "ro"
    (ro / "sub").mkdir(parents=True)
    rw.mkdir()
    (ro / "f").write_text("host\n")
    linux.mount("tmpfs", str(ro / "sub"), "tmpfs", 0, "size=1m")
    (ro / "sub" / "g").write_text("host\n")
    config = load_config()
    config.hypervisor.shared_fs = request.param
    try:
        with carapace.Sandbox(cpus=1, memory="1G", config=config) as sb:
            yield Pod(sb, rw, ro)
    finally:
        linux.umount(str(ro / "sub"), lazy=True)


def device_nodes(d: Path) -> list[str]:
    return [
        str(p)
        for p in d.rglob("*")
        if stat.S_ISBLK(p.lstat().st_mode) or stat.S_ISCHR(p.lstat().st_mode)
    ]


def test_guest_root_cannot_make_a_device_node_on_the_host(pod: Pod) -> None:
    code, out = pod.root_sh("mknod /rw/sda b 8 0; echo blk=$?; mknod /rw/mem c 1 1; echo chr=$?")
    assert code == 0, out
    assert device_nodes(pod.rw) == [], out
    # the refusal is the file server's (no CAP_MKNOD), not the guest's
    assert "blk=1" in out and "chr=1" in out, out


def test_a_read_only_volume_stays_read_only_after_a_remount_in_the_guest(pod: Pod) -> None:
    script = (
        "mount -o remount,rw,bind /ro; echo remount=$?; "
        "echo guest > /ro/f; echo top=$?; echo guest > /ro/new; echo new=$?; "
        "mount -o remount,rw,bind /ro/sub; echo guest > /ro/sub/g; echo sub=$?"
    )
    code, out = pod.root_sh(script)
    assert code == 0, out
    # guest root may remount its own view, but the host's mount is read-only below it
    assert "top=1" in out and "new=1" in out and "sub=1" in out, out
    assert "Read-only file system" in out, out
    assert (pod.ro / "f").read_text() == "host\n" and not (pod.ro / "new").exists()
    assert (pod.ro / "sub" / "g").read_text() == "host\n"


def test_the_file_servers_see_the_share_tree_read_only(pod: Pod) -> None:
    """Only the leaves (a rootfs, a volume) are the guest's to write; the tree the host
    walks (shared/, shared/<container>/, .../volumes/) cannot be renamed or planted."""
    run_dir = pod.sb.run_dir
    view = run_dir / "shared"
    mounts = {m for m, _ in linux.mount_table()}
    assert str(view) in mounts and str(run_dir / "mounts") in mounts
    for attempt in (
        lambda: (view / "planted").write_text("x"),
        lambda: (view / "planted").symlink_to("/etc"),
        lambda: (view / "planted").mkdir(),
    ):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.strerror == "Read-only file system"
    if pod.sb.call_async(lambda s: _shared_fs(s)) == "virtio-fs":
        # the daemon's namespaced child serves the view as its root: read-only there
        roots = {pid: _root_options(pid) for pid in daemons_of(view)}
        assert any("ro" in opts for opts in roots.values()), roots


def _root_options(pid: int) -> set[str]:
    """The mount options of ``/`` in a process's mount namespace."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return set(fields[5].split(","))
    return set()


async def _shared_fs(s: Any) -> str:
    return str(s.plan.shared_fs)


def test_nothing_is_left_in_the_host_dirs(pod: Pod) -> None:
    assert device_nodes(pod.rw) == []
    assert sorted(os.listdir(pod.ro)) == ["f", "sub"]
