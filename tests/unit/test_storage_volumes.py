"""What becomes of each spec mount in a pod VM (carapace.storage.volumes, pure)."""

from __future__ import annotations

import pytest

from carapace.errors import InvalidArgument
from carapace.oci.bundle import Mount
from carapace.protocols import contract
from carapace.storage.volumes import (
    SourceFacts,
    guest_mounts,
    parse_volume,
    plan_mounts,
    volume_mounts,
)

OWN = ("/run/carapace", "/var/lib/carapace")
TREE: dict[str, SourceFacts] = {
    "/srv/data": SourceFacts("/srv/data", "dir"),
    "/srv/file": SourceFacts("/srv/file", "file"),
    "/link": SourceFacts("/", "dir"),  # a symlink to /
    "/dev/sda": SourceFacts("/dev/sda", "device"),
    "/srv/sock": SourceFacts("/srv/sock", "socket"),
    "/srv/fifo": SourceFacts("/srv/fifo", "fifo"),
    "/srv/dev": SourceFacts("/srv/dev", "device"),
    "/k/pods/u/volumes/kubernetes.io~empty-dir/mem": SourceFacts(
        "/k/pods/u/volumes/kubernetes.io~empty-dir/mem", "dir", True, 16 << 20, 0o777
    ),
    "/k/pods/u/volumes/kubernetes.io~empty-dir/disk": SourceFacts(
        "/k/pods/u/volumes/kubernetes.io~empty-dir/disk", "dir", False, 1 << 30, 0o777
    ),
    "/k/pods/u/volumes/kubernetes.io~secret/s": SourceFacts(
        "/k/pods/u/volumes/kubernetes.io~secret/s", "dir", True, 1 << 20, 0o755
    ),
    "/run/shm": SourceFacts("/run/shm", "dir", True, 64 << 20, 0o1777),
}


def probe(path: str) -> SourceFacts:
    return TREE.get(path, SourceFacts(path, "missing" if "missing" in path else "dir"))


def plan(*mounts: Mount):  # type: ignore[no-untyped-def]
    return plan_mounts(mounts, probe, OWN)


def bind(source: str, dest: str = "/x", *options: str) -> Mount:
    return Mount(dest, "bind", source, ("rbind", *options))


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("/", "host's root directory"),
        ("/link", "host's root directory"),
        ("/proc", "host's /proc"),
        ("/proc/1/root", "host's /proc"),
        ("/sys/fs/cgroup", "host's /sys"),
        ("/dev", "host's /dev"),
        ("/dev/sda", "host's /dev"),
        ("/run/carapace", "carapace's own"),
        ("/run/carapace/abc/shared", "carapace's own"),
        ("/run", "holds or is in carapace's own /run/carapace"),
        ("/var/lib", "holds or is in carapace's own /var/lib/carapace"),
        ("/srv/missing", "does not exist"),
        ("/srv/sock", "is a socket"),
        ("/srv/fifo", "is a fifo"),
        ("/srv/dev", "is a device"),
    ],
)
def test_refused_sources_name_the_mount(source: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        plan(bind(source, "/data"))
    assert f"mount at /data (source {source})" in str(e.value)
    assert why in str(e.value) and "accepted:" in str(e.value)


@pytest.mark.parametrize("prop", ["shared", "rshared", "unbindable", "runbindable"])
def test_propagation_the_share_cannot_honour_is_refused(prop: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        plan(bind("/srv/data", "/d", prop))
    msg = str(e.value)
    assert msg.startswith(f"mount at /d (source /srv/data): propagation '{prop}'"), msg
    assert "cannot reach the host; accepted: rprivate (None), rslave (HostToContainer)" in msg
    assert ("(Kubernetes mountPropagation Bidirectional)" in msg) == prop.endswith("shared")


@pytest.mark.parametrize("prop", ["slave", "rslave"])
def test_slave_propagation_follows_the_host(prop: str) -> None:
    p = plan(bind("/srv/data", "/d", prop, "ro"))
    (b,) = p.binds
    assert (b.follows_host, b.readonly, b.readonly_below) == (True, True, False)
    # a mount the host makes later may be writable: the host enforces ro, not the guest
    assert p.mounts == (Mount("/d", "bind", "", ("rbind",)),)


def test_recursive_readonly_with_slave_propagation_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"'rro'.*'rslave'.*accepted: 'rro' with rprivate"):
        plan(bind("/srv/data", "/d", "rslave", "rro"))


def test_slave_propagation_on_a_memory_volume_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"memory-backed volume.*accepted: rprivate \(None\)"):
        plan(bind("/k/pods/u/volumes/kubernetes.io~empty-dir/mem", "/d", "rslave"))


@pytest.mark.parametrize(
    ("options", "submounts", "below", "guest_ro"),
    [
        (("rbind", "ro"), False, False, True),  # nothing below: the guest may say ro too
        (("rbind", "ro"), True, False, False),  # a writable submount below: host enforces
        (("bind", "ro"), True, False, True),  # non-recursive bind: no submount carried
        (("rbind", "rro"), True, True, True),  # recursive read-only
        (("rbind", "rw"), True, False, False),
    ],
)
def test_read_only_as_runc_does_it(
    options: tuple[str, ...], submounts: bool, below: bool, guest_ro: bool
) -> None:
    facts = {"/srv/sub": SourceFacts("/srv/sub", "dir", has_submounts=submounts)}
    p = plan_mounts([Mount("/d", "bind", "/srv/sub", options)], facts.__getitem__, ())
    (b,) = p.binds
    assert (b.readonly_below, b.guest_readonly) == (below, guest_ro)
    assert ("ro" in p.mounts[0].options) == guest_ro
    assert "rro" not in p.mounts[0].options  # the guest's crun gets plain ro


def test_private_propagation_and_host_only_options_are_taken() -> None:
    p = plan(bind("/srv/data", "/d", "rprivate", "ro", "nosuid"))
    assert p.mounts == (Mount("/d", "bind", "", ("rbind", "ro", "nosuid")),)
    (b,) = p.binds
    assert (b.source, b.is_dir, b.readonly, b.recursive) == ("/srv/data", True, True, True)


@pytest.mark.parametrize("mtype", ["nfs", "overlay", "none", ""])
def test_mount_types_the_guest_cannot_make_are_refused(mtype: str) -> None:
    with pytest.raises(InvalidArgument, match="cannot be mounted in a pod VM; accepted: bind"):
        plan(Mount("/m", mtype, "server:/export", ()))


def test_guest_mounts_pass_and_binds_get_share_paths_in_order() -> None:
    p = plan(
        Mount("/proc", "proc", "proc", ()),
        bind("/srv/data", "/a"),
        Mount("/srv/file", "bind", "/srv/file", ("bind", "ro")),
        Mount("/tmp", "tmpfs", "tmpfs", ("size=1m",)),
    )
    out = guest_mounts(p, "c1")
    assert [m.source for m in out] == [
        "proc",
        contract.guest_volume_path("c1", 0),
        contract.guest_volume_path("c1", 1),
        "tmpfs",
    ]
    assert [(b.is_dir, b.recursive, b.readonly) for b in p.binds] == [
        (True, True, False),
        (False, False, True),
    ]


def test_memory_volumes_become_one_guest_tmpfs_per_source() -> None:
    mem = "/k/pods/u/volumes/kubernetes.io~empty-dir/mem"
    p = plan(bind(mem, "/a"), bind(mem, "/b", "ro"), bind("/run/shm", "/dev/shm"))
    assert p.binds == ()
    assert len(p.ephemeral) == 2
    by_size = {e.size_bytes: e for e in p.ephemeral}
    assert by_size[16 << 20].mode == 0o777 and by_size[64 << 20].mode == 0o1777
    assert p.mounts[0].source == p.mounts[1].source == by_size[16 << 20].guest_path
    assert p.mounts[1].options == ("rbind", "ro")


def test_disk_emptydir_secrets_and_tmpfs_elsewhere_are_shared() -> None:
    p = plan(
        bind("/k/pods/u/volumes/kubernetes.io~empty-dir/disk", "/cache"),
        bind("/k/pods/u/volumes/kubernetes.io~secret/s", "/secret", "ro"),
        bind("/run/shm", "/not-shm"),  # a tmpfs, but not the pod's memory
    )
    assert len(p.binds) == 3 and p.ephemeral == ()


def test_guest_paths_are_refused_as_sources() -> None:
    with pytest.raises(InvalidArgument, match="carapace's own"):
        plan(bind(contract.GUEST_SHARED_DIR + "/other/rootfs"))


@pytest.mark.parametrize(
    ("text", "mount"),
    [
        ("/srv:/data", Mount("/data", "bind", "/srv", ("rbind", "rw"))),
        ("/srv:/data:ro", Mount("/data", "bind", "/srv", ("rbind", "rro"))),
        ("/srv/f:/etc/f:rw", Mount("/etc/f", "bind", "/srv/f", ("rbind", "rw"))),
    ],
)
def test_parse_volume(text: str, mount: Mount) -> None:
    assert parse_volume(text) == mount


@pytest.mark.parametrize("text", ["/srv", "srv:/data", "/srv:data", "/a:/b:rx", "/a:/b:ro:x", ""])
def test_parse_volume_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"accepted: HOST:GUEST\[:ro\|:rw\]"):
        parse_volume(text)


def test_volume_mounts_from_the_python_api() -> None:
    assert volume_mounts({"/srv": "/data:ro", "/etc/app": "/etc/app"}) == (
        Mount("/data", "bind", "/srv", ("rbind", "rro")),
        Mount("/etc/app", "bind", "/etc/app", ("rbind", "rw")),
    )
