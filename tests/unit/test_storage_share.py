"""The pod's share (carapace.storage.share): each volume is recorded, then bound into
the container's part of the share from a file descriptor of its checked source; the
guest gets the share's paths; memory-backed volumes become guest tmpfs storages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carapace.errors import InvalidArgument
from carapace.linux import MS_PRIVATE, MS_SLAVE
from carapace.oci.bundle import Mount, Spec
from carapace.oci.spec import default_spec
from carapace.protocols import contract
from carapace.sandbox.state import SandboxRecord
from carapace.storage.share import PodShare, ephemeral_storage, shared_storage
from carapace.storage.volumes import Ephemeral, SourceFacts, probe_source


class FakeMounts:
    """Records the mount calls; checks each bind target exists and was recorded."""

    def __init__(self, record: SandboxRecord) -> None:
        self.record = record
        self.binds: list[tuple[str, str, bool, bool]] = []
        #: (target, readonly_below, propagation) of each bind
        self.bind_modes: list[tuple[str, bool, int]] = []
        self.shared: list[str] = []
        self.slaves: list[str] = []
        self.unmounted: list[str] = []

    def bind_mount(
        self,
        source: str,
        target: str,
        readonly: bool = False,
        recursive: bool = True,
        readonly_below: bool = True,
        propagation: int = 0,
    ) -> None:
        assert os.path.lexists(target), "the target is made before the bind"
        assert target in SandboxRecord.load(Path(self.record.run_dir)).mounts, "recorded first"
        self.binds.append((source, target, readonly, recursive))
        self.bind_modes.append((target, readonly_below, propagation))

    def make_shared(self, target: str) -> None:
        self.shared.append(target)

    def make_slave(self, target: str) -> None:
        self.slaves.append(target)

    def umount(self, target: str, lazy: bool = False) -> None:
        self.unmounted.append(target)

    def is_mountpoint(self, path: str) -> bool:
        return any(t == path for _, t, _, _ in self.binds) and path not in self.unmounted


@pytest.fixture
def share(tmp_path: Path) -> PodShare:
    run = tmp_path / "run"
    run.mkdir()
    record = SandboxRecord("p", str(run))
    record.save()
    s = PodShare(run / "shared", record, FakeMounts(record), (str(tmp_path / "own"),))
    s.create()
    s.mounts.binds.clear()  # type: ignore[attr-defined]
    s.mounts.bind_modes.clear()  # type: ignore[attr-defined]
    return s


def fakes(share: PodShare) -> FakeMounts:
    assert isinstance(share.mounts, FakeMounts)
    return share.mounts


def test_volumes_are_bound_into_the_share_and_the_guest_gets_their_paths(
    tmp_path: Path, share: PodShare
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("10.88.0.5 web\n")
    spec = default_spec(["true"])
    spec["mounts"] += [
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "ro"]},
        {
            "destination": "/etc/hosts",
            "type": "bind",
            "source": str(hosts),
            "options": ["bind", "rprivate", "rw"],
        },
        {
            "destination": "/late",
            "type": "bind",
            "source": str(data),
            "options": ["rbind", "rslave"],
        },
        {
            "destination": "/all-ro",
            "type": "bind",
            "source": str(data),
            "options": ["rbind", "rro"],
        },
    ]
    mounts, storages = share.share_volumes("c1", Spec.from_dict(spec).mounts)
    by_dest = {m.destination: m for m in mounts}
    assert by_dest["/data"] == Mount(
        "/data", "bind", "/run/carapace/shared/c1/volumes/0", ("rbind", "ro")
    )
    assert by_dest["/etc/hosts"] == Mount(
        "/etc/hosts", "bind", "/run/carapace/shared/c1/volumes/1", ("rbind", "rw")
    )
    assert by_dest["/late"].options == ("rbind",)
    assert by_dest["/all-ro"].options == ("rbind", "ro")
    assert by_dest["/proc"].type == "proc"  # guest mounts pass as they are
    assert storages == []
    binds = fakes(share).binds
    # made in the host's view; the VM's view gets them by propagation
    target0 = str(share.source_dir / "c1" / "volumes" / "0")
    target1 = str(share.source_dir / "c1" / "volumes" / "1")
    target2 = str(share.source_dir / "c1" / "volumes" / "2")
    target3 = str(share.source_dir / "c1" / "volumes" / "3")
    # bound through /proc/self/fd/N of the source opened without following symlinks
    assert [(t, ro, rec) for _, t, ro, rec in binds] == [
        (target0, True, True),
        (target1, False, False),
        (target2, False, True),
        (target3, True, True),
    ]
    # ro alone leaves the mounts below the bind as they are (runc's ro), rro does not;
    # a volume follows the host's later mounts only under rslave
    assert fakes(share).bind_modes == [
        (target0, False, MS_PRIVATE),
        (target1, False, MS_PRIVATE),
        (target2, False, MS_SLAVE),
        (target3, True, MS_PRIVATE),
    ]
    assert all(s.startswith("/proc/self/fd/") for s, _, _, _ in binds)
    assert Path(target0).is_dir() and Path(target1).is_file()
    views = [str(share.source_dir), str(share.shared_dir)]
    assert share.record.mounts == [*views, target0, target1, target2, target3]
    share.unshare("c1")
    assert fakes(share).unmounted == [target3, target2, target1, target0]
    assert share.record.mounts == views and not (share.source_dir / "c1").exists()


def test_a_refused_volume_makes_nothing(tmp_path: Path, share: PodShare) -> None:
    ok = tmp_path / "ok"
    ok.mkdir()
    mounts = (
        Mount("/ok", "bind", str(ok), ("rbind",)),
        Mount("/etc/x", "bind", "/etc/../proc/self", ("rbind",)),
    )
    with pytest.raises(InvalidArgument, match=r"mount at /etc/x \(source /etc/../proc/self\)"):
        share.share_volumes("c1", mounts)
    assert fakes(share).binds == [] and len(share.record.mounts) == 2  # the two views


def test_a_symlinked_source_is_checked_where_it_leads(tmp_path: Path, share: PodShare) -> None:
    os.symlink("/proc/1", tmp_path / "evil")
    with pytest.raises(InvalidArgument, match="/proc"):
        share.share_volumes("c1", (Mount("/x", "bind", str(tmp_path / "evil"), ("rbind",)),))


def test_memory_volumes_are_guest_tmpfs_shared_by_source(tmp_path: Path, share: PodShare) -> None:
    shm = tmp_path / "sandboxes" / "p" / "shm"
    shm.mkdir(parents=True)

    def probe(path: str) -> SourceFacts:
        facts = probe_source(path)
        return SourceFacts(facts.path, facts.kind, on_tmpfs=True, size_bytes=64 << 20, mode=0o1777)

    m = Mount("/dev/shm", "bind", str(shm), ("rbind", "rw"))
    mounts_a, storages_a = share.share_volumes("a", (m,), probe)
    mounts_b, storages_b = share.share_volumes("b", (m,), probe)
    assert mounts_a == mounts_b  # the same guest tmpfs for both containers
    assert mounts_a[0].source.startswith(contract.GUEST_EPHEMERAL_DIR + "/")
    assert storages_a == storages_b
    st = storages_a[0]
    assert (st.driver, st.fstype, st.mount_point) == (
        contract.EPHEMERAL_DRIVER,
        "tmpfs",
        mounts_a[0].source,
    )
    assert list(st.options) == ["mode=1777", "nodev", "nosuid", f"size={64 << 20}"]
    assert fakes(share).binds == []  # nothing bound on the host


def test_the_vm_sees_a_read_only_slave_of_the_hosts_view(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    record = SandboxRecord("p", str(run))
    record.save()
    mounts = FakeMounts(record)
    s = PodShare(run / "shared", record, mounts)
    s.create()
    source, view = str(run / "mounts"), str(run / "shared")
    assert s.source_dir == run / "mounts"
    assert mounts.binds == [(source, source, False, False), (source, view, True, False)]
    assert mounts.shared == [source] and mounts.slaves == [view]
    assert record.mounts == [source, view]
    s.close()
    assert mounts.unmounted == [view, source] and record.mounts == []


def test_shared_storage_per_filesystem() -> None:
    (vfs,) = shared_storage(contract.SHARED_FS_VIRTIOFS)
    assert (vfs.fstype, vfs.source, vfs.mount_point) == (
        "virtiofs",
        contract.SHARE_TAG,
        contract.GUEST_SHARED_DIR,
    )
    (p9,) = shared_storage(contract.SHARED_FS_9P)
    assert p9.fstype == "9p" and "trans=virtio" in p9.options
    st = ephemeral_storage(Ephemeral("k", 0, 0o777))
    assert list(st.options) == ["mode=777", "nodev", "nosuid"]  # no size: the guest's default


def test_mounts_are_typed_at_the_edge() -> None:
    data = default_spec(["true"])
    data["mounts"].append({"destination": "relative", "type": "bind"})
    with pytest.raises(InvalidArgument, match=r"mounts\[\d+\]\.destination"):
        Spec.from_dict(data)
    data["mounts"][-1] = {"destination": "/x", "options": "ro"}
    with pytest.raises(InvalidArgument, match=r"options"):
        Spec.from_dict(data)
