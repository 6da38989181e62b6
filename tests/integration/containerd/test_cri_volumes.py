"""Volumes (issue 13) through containerd: CRI mounts as the kubelet passes them
(hostPath, emptyDir on disk and in memory, configmap and secret directories laid out
as the kubelet lays them out, the termination log), CRI's own pod files and /dev/shm,
``ctr run --mount``, refusals, and the fault paths (virtiofsd, QEMU or shim SIGKILLed)
followed by containerd's cleanup.

A VM boot costs seconds under TCG: the tests that only add containers share one
carapace pod (module fixture ``vpod``, with a DNSConfig); each removes the containers it
made (fixture ``made``), and the leak checks run after each test (this directory's and
tests/integration/conftest.py's: no QEMU, virtiofsd, shim, run dir or mount of
carapace's left). The fault and ``ctr run`` tests boot their own VMs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cri_api as api
import grpc
import pytest

from ..conftest import RUN_ROOT
from ..procs import qemu_of
from ..test_volumes import mounts_of, sha256, state_of, virtiofsd_of
from .conftest import CtrFn
from .rig import BUSYBOX_IMAGE, CARAPACE, ContainerdRig, CriClient
from .test_cri_network import (  # the module's leak check: relative to a shared pod
    Pod,
    assert_pod_gone,
    containerd_left_clean,  # noqa: F401
    shim_of,
    wait_for,
)

BIG = 8 << 20
EROFS = "Read-only file system"
DNS = api.DNSConfig(
    servers=["10.0.0.10"], searches=["ns1.svc.cluster.test", "svc.cluster.test"], options=[]
)
#: What the issue allows for a configmap update to reach a container.
UPDATE_WITHIN = 5.0
EXITED = api.ContainerState.CONTAINER_EXITED


# -- helpers ----------------------------------------------------------------------------------


def unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def host_mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of the host's mounts, in mount order."""
    with open("/proc/self/mounts") as f:
        return [
            (unescape(p[1]), p[2], set(p[3].split(",")))
            for p in (line.split() for line in f)
            if len(p) > 3
        ]


def share_of(pod_id: str, cid: str, source: Path) -> str:
    """The mount point in the pod's share (``<run dir>/shared/<cid>/volumes/<n>``) that
    is ``source`` bound for container ``cid`` (same device and inode)."""
    prefix = f"{RUN_ROOT / pod_id}/shared/{cid}/volumes/"
    want = os.stat(source)
    found = [
        target
        for target, _, _ in host_mounts()
        if target.startswith(prefix)
        and "/" not in target[len(prefix) :]
        and (os.stat(target).st_dev, os.stat(target).st_ino) == (want.st_dev, want.st_ino)
    ]
    assert len(found) == 1, (
        f"{source} bound {len(found)} times under {prefix}: {found}; "
        f"all mounts there: {[t for t, _, _ in host_mounts() if t.startswith(prefix)]}"
    )
    return found[0]


def mounts_at_or_under(target: str) -> list[tuple[str, str, set[str]]]:
    return [m for m in host_mounts() if m[0] == target or m[0].startswith(target + "/")]


def kubelet_volume(pod: Pod, base: Path, plugin: str, name: str) -> Path:
    """kubelet's directory of a pod's volume: .../pods/<uid>/volumes/<plugin>/<name>."""
    d = base / "pods" / str(pod.config.metadata.uid) / "volumes" / f"kubernetes.io~{plugin}" / name
    d.mkdir(parents=True)
    return d


def atomic_writer_dir(target: Path, files: dict[str, tuple[bytes, int]], stamp: str) -> None:
    """Lay out (or update) ``target`` as kubelet's AtomicWriter does: the files in a
    timestamped directory ``..<stamp>``, ``..data`` a symlink to it (swapped in by a
    rename), and each key a symlink to ``..data/<key>``; the old version removed."""
    old = os.readlink(target / "..data") if (target / "..data").is_symlink() else None
    version = target / f"..{stamp}"
    version.mkdir(mode=0o755)
    for key, (data, mode) in files.items():
        (version / key).write_bytes(data)
        os.chmod(version / key, mode)
    tmp = target / "..data_tmp"
    os.symlink(version.name, tmp)
    os.rename(tmp, target / "..data")
    for key in files:
        if not (target / key).is_symlink():
            os.symlink(f"..data/{key}", target / key)
    if old is not None:
        shutil.rmtree(target / old)


@contextlib.contextmanager
def host_tmpfs(path: Path, size: str) -> Iterator[Path]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


class Made:
    """Containers a test creates in a pod; all stopped and removed at its end."""

    def __init__(self, cri: CriClient) -> None:
        self.cri = cri
        self.ids: list[str] = []

    def create(self, pod: Pod, name: str, command: list[str], mounts: Sequence[Any] = ()) -> str:
        name = f"{name}-{uuid.uuid4().hex[:6]}"
        cid = self.cri.runtime.CreateContainer(
            api.CreateContainerRequest(
                pod_sandbox_id=pod.id,
                config=api.ContainerConfig(
                    metadata=api.ContainerMetadata(name=name),
                    image=api.ImageSpec(image=BUSYBOX_IMAGE),
                    command=command,
                    log_path=f"{pod.name}-{name}.log",
                    mounts=list(mounts),
                ),
                sandbox_config=pod.config,
            ),
            timeout=120,
        ).container_id
        self.ids.append(str(cid))
        return str(cid)

    def start(self, cid: str) -> None:
        self.cri.runtime.StartContainer(api.StartContainerRequest(container_id=cid), timeout=180)

    def run(self, pod: Pod, name: str, command: list[str], mounts: Sequence[Any] = ()) -> str:
        cid = self.create(pod, name, command, mounts)
        self.start(cid)
        return cid

    def sleeper(self, pod: Pod, name: str, mounts: Sequence[Any] = ()) -> str:
        return self.run(pod, name, ["sleep", "3600"], mounts)

    def state(self, cid: str) -> Any:
        req = api.ContainerStatusRequest(container_id=cid)
        return self.cri.runtime.ContainerStatus(req, timeout=30).status

    def remove_all(self) -> None:
        rt = self.cri.runtime
        for cid in reversed(self.ids):
            with contextlib.suppress(Exception):  # not running
                rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0), timeout=120)
            rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=120)
        self.ids.clear()


def assert_erofs(result: tuple[int, str, str], what: str) -> None:
    code, out, err = result
    assert code != 0, f"{what}: succeeded on a read-only volume ({out!r})"
    assert EROFS in err, f"{what}: exit {code}, stderr {err!r}"


def guest_mount(pod: Pod, cid: str, destination: str) -> tuple[str, set[str]]:
    """The fs type and options of the (topmost) mount at ``destination`` in ``cid``."""
    lines = [
        line.split()
        for line in pod.out(cid, ["cat", "/proc/mounts"]).splitlines()
        if line.split()[1] == destination
    ]
    assert lines, f"nothing mounted at {destination} in {cid}"
    return lines[-1][2], set(lines[-1][3].split(","))


# -- fixtures ---------------------------------------------------------------------------------


@dataclass
class VolPod:
    pod: Pod
    base: Path  # the host side of its volumes (kubelet's /var/lib/kubelet, as it were)


@pytest.fixture(scope="module")
def vpod(containerd: ContainerdRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolPod]:
    cri = containerd.cri()
    base = tmp_path_factory.mktemp("cri-vol")
    try:
        pod = Pod(cri, "vol-pod", "carapace", base, dns=DNS)
        try:
            yield VolPod(pod, base)
        finally:
            pod.remove()
    finally:
        cri.close()
    assert_pod_gone(containerd, pod.id)
    wait_for("the pod's virtiofsd to end", lambda: not virtiofsd_of(RUN_ROOT / pod.id), 30)
    assert not mounts_of(pod.id)


@pytest.fixture
def made(cri: CriClient) -> Iterator[Made]:
    m = Made(cri)
    yield m
    m.remove_all()


# -- hostPath ---------------------------------------------------------------------------------


def test_host_path_rw_8mib_both_ways(vpod: VolPod, made: Made, tmp_path: Path) -> None:
    pod, d = vpod.pod, tmp_path / "hostpath"
    d.mkdir()
    cid = made.sleeper(pod, "rw", [api.Mount(container_path="/data", host_path=str(d))])
    out = pod.out(
        cid, ["sh", "-c", f"head -c {BIG} /dev/urandom > /data/big && sha256sum /data/big"], 120
    )
    data = (d / "big").read_bytes()
    assert len(data) == BIG
    assert sha256(data) == out.split()[0]
    payload = os.urandom(BIG)
    (d / "from-host").write_bytes(payload)
    assert pod.out(cid, ["sha256sum", "/data/from-host"], 120).split()[0] == sha256(payload)
    # on the host: bound into the pod's share, writable, nodev and nosuid
    share = share_of(pod.id, cid, d)
    [(_, _, opts)] = mounts_at_or_under(share)
    assert {"rw", "nodev", "nosuid"} <= opts, opts


def test_host_path_readonly_is_not_recursive_as_cri_asks(
    vpod: VolPod, made: Made, tmp_path: Path
) -> None:
    """CRI's read-only (containerd 1.6: ``rbind``, ``ro``) is runc's ``ro``: the bind is
    read-only, a mount below it keeps its own flags (Kubernetes' non-recursive
    read-only). The host's mounts enforce both: the guest sees the volume as one
    filesystem."""
    pod, d = vpod.pod, tmp_path / "hostpath-ro"
    (d / "sub").mkdir(parents=True)
    (d / "mnt").mkdir()
    (d / "sub" / "f").write_text("in sub\n")
    with host_tmpfs(d / "mnt", "4m"):
        (d / "mnt" / "marker").write_text("in a submount\n")
        cid = made.sleeper(
            pod,
            "ro",
            [api.Mount(container_path="/data", host_path=str(d), readonly=True)],
        )
        assert pod.out(cid, ["cat", "/data/sub/f"]) == "in sub\n"
        # the submount is there, and writable as it is on the host
        assert pod.out(cid, ["cat", "/data/mnt/marker"]) == "in a submount\n"
        for path in ("/data/new", "/data/sub/new", "/data/sub/f"):
            assert_erofs(pod.exec(cid, ["sh", "-c", f"echo x > {path}"]), f"write {path}")
        assert_erofs(pod.exec(cid, ["mkdir", "/data/sub/d"]), "mkdir /data/sub/d")
        pod.out(cid, ["sh", "-c", "echo from-guest > /data/mnt/new && rm /data/mnt/marker"])
        assert sorted(os.listdir(d)) == ["mnt", "sub"]
        assert os.listdir(d / "sub") == ["f"] and os.listdir(d / "mnt") == ["new"]
        assert (d / "mnt" / "new").read_text() == "from-guest\n"
        # on the host: the volume's bind in the share is ro, its submount rw; both
        # nodev, nosuid
        share = share_of(pod.id, cid, d)
        found = mounts_at_or_under(share)
        assert [t for t, _, _ in found] == [share, f"{share}/mnt"], found
        for target, _, opts in found:
            assert {"nodev", "nosuid"} <= opts, (target, opts)
        assert "ro" in found[0][2] and "rw" in found[1][2], found
        made.remove_all()  # before the host's tmpfs goes


@contextlib.contextmanager
def shared_mount_of(path: Path) -> Iterator[Path]:
    """``path`` bound onto itself as a shared mount (kubelet's volumes lie on shared
    mounts; containerd refuses HostToContainer and Bidirectional on a private one)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_host_mounts_reach_a_host_to_container_volume_only(
    vpod: VolPod, made: Made, tmp_path: Path
) -> None:
    """mountPropagation HostToContainer (``rslave``): a mount the host makes under the
    volume after the container started is seen in it; None (``rprivate``) never sees
    one; a mount the container makes never reaches the host (the guest has its own
    mount table)."""
    pod = vpod.pod
    follow, private = tmp_path / "follow", tmp_path / "private"
    for d in (follow, private):
        (d / "late").mkdir(parents=True)
    prop = api.MountPropagation
    with shared_mount_of(follow), shared_mount_of(private):
        cid = made.sleeper(
            pod,
            "prop",
            [
                api.Mount(
                    container_path="/follow",
                    host_path=str(follow),
                    propagation=prop.PROPAGATION_HOST_TO_CONTAINER,
                ),
                api.Mount(
                    container_path="/private",
                    host_path=str(private),
                    propagation=prop.PROPAGATION_PRIVATE,
                ),
            ],
        )
        # the container looks before the host mounts: an empty directory in both
        assert pod.out(cid, ["ls", "-A", "/follow/late", "/private/late"]).split() == [
            "/follow/late:",
            "/private/late:",
        ]
        with host_tmpfs(follow / "late", "4m"), host_tmpfs(private / "late", "4m"):
            for d in (follow, private):
                (d / "late" / "marker").write_text("mounted later\n")

            def seen() -> bool:
                return pod.exec(cid, ["cat", "/follow/late/marker"])[1] == "mounted later\n"

            wait_for("the host's later mount in the HostToContainer volume", seen, 10)
            code, out, err = pod.exec(cid, ["cat", "/private/late/marker"])
            assert code != 0 and "No such file" in err, (code, out, err)
            # the container writes into the host's mount through the volume
            pod.out(cid, ["sh", "-c", "echo from-guest > /follow/late/g"])
            assert (follow / "late" / "g").read_text() == "from-guest\n"
            # on the host: the share follows the source (a slave), the private one not
            follow_share = share_of(pod.id, cid, follow)
            assert [t for t, _, _ in mounts_at_or_under(follow_share)] == [
                follow_share,
                f"{follow_share}/late",
            ]
            private_share = share_of(pod.id, cid, private)
            assert [t for t, _, _ in mounts_at_or_under(private_share)] == [private_share]
            made.remove_all()  # before the host's mounts go


def test_bidirectional_propagation_is_refused_naming_the_volume(
    vpod: VolPod, made: Made, tmp_path: Path
) -> None:
    """CRI creates the task (the shim's Create) at StartContainer: the refusal comes
    there."""
    d = tmp_path / "both"
    d.mkdir()
    run_dir = str(RUN_ROOT / vpod.pod.id)

    def volume_binds() -> list[str]:
        return [t for t, _, _ in host_mounts() if t.startswith(run_dir + "/") and "/volumes/" in t]

    before = volume_binds()  # the pod's own (sandbox) container's
    with shared_mount_of(d):
        cid = made.create(
            vpod.pod,
            "bidi",
            ["true"],
            [
                api.Mount(
                    container_path="/both",
                    host_path=str(d),
                    propagation=api.MountPropagation.PROPAGATION_BIDIRECTIONAL,
                )
            ],
        )
        with pytest.raises(grpc.RpcError) as e:
            made.start(cid)
    msg = str(e.value.details())
    assert f"mount at /both (source {d})" in msg, msg
    assert "(Kubernetes mountPropagation Bidirectional) cannot be honoured" in msg, msg
    assert "accepted: rprivate (None), rslave (HostToContainer)" in msg, msg
    assert volume_binds() == before  # nothing was bound for it


# -- emptyDir ---------------------------------------------------------------------------------


def test_empty_dir_on_disk_is_shared_by_two_containers(vpod: VolPod, made: Made) -> None:
    pod = vpod.pod
    cache = kubelet_volume(pod, vpod.base, "empty-dir", f"cache-{uuid.uuid4().hex[:6]}")
    mount = api.Mount(container_path="/cache", host_path=str(cache))
    a = made.sleeper(pod, "writer", [mount])
    b = made.sleeper(pod, "reader", [mount])
    out = pod.out(
        a, ["sh", "-c", "head -c 1048576 /dev/urandom > /cache/f && sha256sum /cache/f"], 120
    )
    assert pod.out(b, ["sha256sum", "/cache/f"], 120).split()[0] == out.split()[0]
    pod.out(b, ["sh", "-c", "echo from-b > /cache/g"])
    assert pod.out(a, ["cat", "/cache/g"]) == "from-b\n"
    # on disk: the host's directory holds the files (not a guest tmpfs)
    assert sha256((cache / "f").read_bytes()) == out.split()[0]
    assert (cache / "g").read_text() == "from-b\n"
    assert guest_mount(pod, a, "/cache")[0] != "tmpfs"


def test_empty_dir_memory_is_a_guest_tmpfs_shared_by_the_pod(vpod: VolPod, made: Made) -> None:
    pod = vpod.pod
    mem = kubelet_volume(pod, vpod.base, "empty-dir", f"mem-{uuid.uuid4().hex[:6]}")
    with host_tmpfs(mem, "16m"):
        mount = api.Mount(container_path="/mem", host_path=str(mem))
        a = made.sleeper(pod, "writer", [mount])
        b = made.sleeper(pod, "reader", [mount])
        for cid in (a, b):
            fstype, opts = guest_mount(pod, cid, "/mem")
            assert fstype == "tmpfs", (fstype, opts)
            assert "size=16384k" in opts, opts  # the host tmpfs's size
        pod.out(a, ["sh", "-c", "echo in-guest-memory > /mem/f"])
        assert pod.out(b, ["cat", "/mem/f"]) == "in-guest-memory\n"
        pod.out(b, ["sh", "-c", "echo back > /mem/g"])
        assert pod.out(a, ["cat", "/mem/g"]) == "back\n"
        # the guest's memory, not the host's
        assert os.listdir(mem) == []
        made.remove_all()


# -- configmap, secret ------------------------------------------------------------------------


def test_configmap_update_is_seen_within_5s(vpod: VolPod, made: Made) -> None:
    pod = vpod.pod
    cfg = kubelet_volume(pod, vpod.base, "configmap", f"cfg-{uuid.uuid4().hex[:6]}")
    atomic_writer_dir(cfg, {"key": (b"v1\n", 0o644)}, "2026_11_26_12_00_00.1")
    assert os.readlink(cfg / "..data") == "..2026_11_26_12_00_00.1"
    cid = made.sleeper(
        pod, "cm", [api.Mount(container_path="/etc/config", host_path=str(cfg), readonly=True)]
    )
    assert pod.out(cid, ["cat", "/etc/config/key"]) == "v1\n"
    assert_erofs(pod.exec(cid, ["sh", "-c", "echo x > /etc/config/key"]), "write the configmap")

    atomic_writer_dir(cfg, {"key": (b"v2\n", 0o644)}, "2026_11_26_12_00_05.2")
    swapped = time.monotonic()
    seen: list[str] = []
    while time.monotonic() - swapped < 30:
        seen.append(pod.exec(cid, ["cat", "/etc/config/key"])[1])
        if seen[-1] == "v2\n":
            break
    took = time.monotonic() - swapped
    assert seen[-1] == "v2\n", seen
    assert took < UPDATE_WITHIN, (took, seen)
    assert sorted(pod.out(cid, ["ls", "-a", "/etc/config"]).split()) == [
        ".",
        "..",
        "..2026_11_26_12_00_05.2",
        "..data",
        "key",
    ]


def test_secret_keeps_file_modes(vpod: VolPod, made: Made) -> None:
    pod = vpod.pod
    secret = kubelet_volume(pod, vpod.base, "secret", f"token-{uuid.uuid4().hex[:6]}")
    atomic_writer_dir(
        secret,
        {"token": (b"s3cr3t\n", 0o400), "ca.crt": (b"cert\n", 0o640)},
        "2026_11_26_12_00_00.1",
    )
    where = "/var/run/secrets/kubernetes.io/serviceaccount"
    cid = made.sleeper(
        pod, "sec", [api.Mount(container_path=where, host_path=str(secret), readonly=True)]
    )
    assert pod.out(cid, ["stat", "-L", "-c", "%a", f"{where}/token"]) == "400\n"
    assert pod.out(cid, ["stat", "-L", "-c", "%a", f"{where}/ca.crt"]) == "640\n"
    assert pod.out(cid, ["cat", f"{where}/token"]) == "s3cr3t\n"


# -- CRI's pod files, /dev/shm, termination log -----------------------------------------------


def test_cri_hosts_hostname_resolv_conf(vpod: VolPod, made: Made) -> None:
    pod = vpod.pod
    cid = made.sleeper(pod, "files")
    resolv = pod.out(cid, ["cat", "/etc/resolv.conf"])
    words = [line.split() for line in resolv.splitlines() if line.strip()]
    assert [w[1:] for w in words if w[0] == "nameserver"] == [["10.0.0.10"]], resolv
    assert [w[1:] for w in words if w[0] == "search"] == [list(DNS.searches)], resolv
    assert pod.out(cid, ["hostname"]) == f"{pod.name}\n"
    assert pod.out(cid, ["cat", "/etc/hostname"]) == f"{pod.name}\n"
    sources = pod.spec_mounts(cid)
    for name in ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname"):
        assert pod.out(cid, ["cat", name]) == Path(sources[name]).read_text(), name
        share_of(pod.id, cid, Path(sources[name]))  # bound into the share, not copied
    # bound, so live: a line the host appends to the pod's hosts file shows up
    hosts = Path(sources["/etc/hosts"])
    with hosts.open("a") as f:
        f.write("10.0.0.99\tadded-by-the-host\n")
    start = time.monotonic()
    while "added-by-the-host" not in pod.out(cid, ["cat", "/etc/hosts"]):
        assert time.monotonic() - start < UPDATE_WITHIN, pod.out(cid, ["cat", "/etc/hosts"])


def test_dev_shm_is_a_tmpfs_shared_by_the_pod(vpod: VolPod, made: Made) -> None:
    pod = vpod.pod
    a = made.sleeper(pod, "shm-a")
    b = made.sleeper(pod, "shm-b")
    fstype, opts = guest_mount(pod, a, "/dev/shm")
    assert fstype == "tmpfs", (fstype, opts)
    assert "size=65536k" in opts, opts  # CRI's sandbox shm: 64 MiB
    name = f"seg-{uuid.uuid4().hex[:6]}"
    pod.out(a, ["sh", "-c", f"echo shared > /dev/shm/{name}"])
    assert pod.out(b, ["cat", f"/dev/shm/{name}"]) == "shared\n"
    pod.out(a, ["rm", f"/dev/shm/{name}"])


def test_termination_log_reaches_the_host(vpod: VolPod, made: Made, tmp_path: Path) -> None:
    pod = vpod.pod
    log = tmp_path / "termination-log"
    log.touch(mode=0o666)
    cid = made.run(
        pod,
        "term",
        ["sh", "-c", "echo 'goodbye from the container' > /dev/termination-log; exit 3"],
        [api.Mount(container_path="/dev/termination-log", host_path=str(log))],
    )
    wait_for("the container to exit", lambda: made.state(cid).state == EXITED, 60)
    assert made.state(cid).exit_code == 3
    assert log.read_text() == "goodbye from the container\n"


# -- refusals ---------------------------------------------------------------------------------


def test_cri_mount_of_root_is_refused(vpod: VolPod, made: Made) -> None:
    pod = vpod.pod
    with pytest.raises(Exception) as e:  # grpc's RpcError, with CRI's message
        cid = made.create(
            pod, "root", ["sleep", "3600"], [api.Mount(container_path="/host", host_path="/")]
        )
        made.start(cid)
    details = str(e.value)
    assert "mount at /host (source /)" in details, details
    assert "accepted" in details, details
    # the pod lives on
    ok = made.sleeper(pod, "after")
    assert pod.out(ok, ["echo", "alive"]) == "alive\n"


# -- ctr run --mount --------------------------------------------------------------------------


def ctr_run(
    ctr: CtrFn, cid: str, mount: str | Sequence[str], *cmd: str
) -> subprocess.CompletedProcess[str]:
    mounts = [mount] if isinstance(mount, str) else list(mount)
    options = [o for m in mounts for o in ("--mount", m)]
    argv = ["run", "--rm", "--runtime", CARAPACE, *options, BUSYBOX_IMAGE, cid, *cmd]
    try:
        return ctr(*argv, input="", check=False, timeout=240)
    finally:
        ctr("tasks", "delete", cid, check=False)
        ctr("containers", "delete", cid, check=False)


def test_ctr_run_mount_rbind_rw(ctr: CtrFn, tmp_path: Path) -> None:
    (tmp_path / "in").write_text("from the host\n")
    r = ctr_run(
        ctr,
        f"vol-rw-{uuid.uuid4().hex[:6]}",
        f"type=bind,src={tmp_path},dst=/data,options=rbind:rw",
        "sh",
        "-c",
        f"cat /data/in; head -c {BIG} /dev/urandom > /data/out && sha256sum /data/out",
    )
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    assert first == "from the host"
    assert second.split()[0] == sha256((tmp_path / "out").read_bytes())


def test_ctr_run_read_only_mounts_as_runc_makes_them(ctr: CtrFn, tmp_path: Path) -> None:
    """``rbind,ro``: the bind read-only, a submount as it is on the host (writable);
    ``rbind,rro``: the submount read-only too; ``bind,ro`` (not recursive): no
    submount, its mount point's own (empty) directory."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "mnt").mkdir()
    (src / "in").write_text("read me\n")
    probes = ["/ro/new", "/ro/sub/f", "/ro/mnt/new", "/rro/new", "/rro/mnt/other", "/rro/sub/f"]
    script = "; ".join(
        [
            "cat /ro/in /rro/in /nonrec/in",
            *[f"(echo x > {p}) 2>&1" for p in probes],
            "cat /rro/mnt/marker",
            "ls -A /nonrec/mnt | wc -l",
        ]
    )
    with host_tmpfs(src / "mnt", "4m"):
        (src / "mnt" / "marker").write_text("in a submount\n")
        r = ctr_run(
            ctr,
            f"vol-ro-{uuid.uuid4().hex[:6]}",
            [
                f"type=bind,src={src},dst=/ro,options=rbind:ro",
                f"type=bind,src={src},dst=/rro,options=rbind:rro",
                f"type=bind,src={src},dst=/nonrec,options=bind:ro",
            ],
            "sh",
            "-c",
            script,
        )
        on_host = sorted(os.listdir(src / "mnt"))
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[:3] == ["read me"] * 3, lines
    refused = {p for p in probes if f"can't create {p}: {EROFS}" in r.stdout}
    assert refused == set(probes) - {"/ro/mnt/new"}, r.stdout
    assert lines[-2:] == ["in a submount", "0"], lines
    assert on_host == ["marker", "new"]
    assert sorted(os.listdir(src)) == ["in", "mnt", "sub"] and os.listdir(src / "sub") == []


def test_ctr_run_refuses_root_and_shared_propagation(ctr: CtrFn, tmp_path: Path) -> None:
    cases = [
        ("type=bind,src=/,dst=/host,options=rbind:ro", "mount at /host (source /)"),
        (
            f"type=bind,src={tmp_path},dst=/data,options=rbind:rshared",
            f"mount at /data (source {tmp_path})",
        ),
    ]
    for mount, needle in cases:
        r = ctr_run(ctr, f"vol-refused-{uuid.uuid4().hex[:6]}", mount, "true")
        assert r.returncode != 0, (mount, r.stdout, r.stderr)
        assert needle in r.stderr and "accepted" in r.stderr, (mount, r.stderr)


# -- fault paths ------------------------------------------------------------------------------


def virtiofsd_pid(pod_id: str) -> int:
    run_dir = RUN_ROOT / pod_id
    pid = int(state_of(run_dir)["virtiofsd"]["pid"])
    assert pid in virtiofsd_of(run_dir), (pid, virtiofsd_of(run_dir))
    return pid


def vm_ended_within(pod_id: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while qemu_of(pod_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("victim", ["virtiofsd", "qemu", "shim"])
def test_fault_then_stop_and_remove_leave_nothing(
    containerd: ContainerdRig, cri: CriClient, tmp_path: Path, victim: str
) -> None:
    d = tmp_path / "vol"
    d.mkdir()
    pod = Pod(cri, f"vol-fault-{victim}", "carapace", tmp_path)
    run_dir = RUN_ROOT / pod.id
    try:
        m = Made(cri)
        cid = m.sleeper(pod, "k", [api.Mount(container_path="/data", host_path=str(d))])
        pod.out(cid, ["sh", "-c", "echo before > /data/f"])
        share_of(pod.id, cid, d)
        assert virtiofsd_of(run_dir), "no virtiofsd for the pod"
        assert mounts_of(pod.id)
        pid = {
            "virtiofsd": lambda: virtiofsd_pid(pod.id),
            "qemu": lambda: qemu_of(pod.id)[0],
            "shim": lambda: shim_of(containerd, pod.id)[0],
        }[victim]()
        os.kill(pid, signal.SIGKILL)
        # without virtiofsd the VM has lost its filesystem: carapace may stop it (it does:
        # then as for QEMU) or leave it to containerd's delete
        vm_ends = victim != "virtiofsd" or vm_ended_within(pod.id, 10)
        if vm_ends:  # CRI sees the exits (as the kubelet would) before the pod is stopped
            wait_for(
                "the pod to be NOTREADY",
                lambda: pod.status().status.state == api.PodSandboxState.SANDBOX_NOTREADY,
            )
            wait_for("the container to be EXITED", lambda: m.state(cid).state == EXITED)
        pod.remove()
        assert_pod_gone(containerd, pod.id)
        wait_for("the pod's virtiofsd to end", lambda: not virtiofsd_of(run_dir), 30)
        assert not mounts_of(pod.id), mounts_of(pod.id)
        assert not run_dir.exists()
        assert (d / "f").read_text() == "before\n"
    finally:
        pod.remove()


def test_virtiofsd_killed_then_ctr_kill_and_delete_leave_nothing(
    containerd: ContainerdRig, ctr: CtrFn, tmp_path: Path
) -> None:
    cid = f"vol-vfskill-{uuid.uuid4().hex[:6]}"
    mount = f"type=bind,src={tmp_path},dst=/data,options=rbind:rw"
    run_dir = RUN_ROOT / cid
    try:
        ctr(
            "run",
            "-d",
            "--runtime",
            CARAPACE,
            "--mount",
            mount,
            BUSYBOX_IMAGE,
            cid,
            "sleep",
            "3600",
            timeout=240,
        )
        os.kill(virtiofsd_pid(cid), signal.SIGKILL)
        # the task may have ended already (carapace stops a VM that lost its virtiofsd)
        kill = ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        assert kill.returncode == 0 or "not found" in kill.stderr, kill.stderr
        deadline = time.monotonic() + 120
        while ctr("tasks", "delete", cid, check=False).returncode != 0:
            listed = ctr("tasks", "ls", "-q").stdout.split()
            if cid not in listed:
                break
            assert time.monotonic() < deadline, "the task did not go"
            time.sleep(0.5)
        ctr("containers", "delete", cid)
        wait_for("QEMU to end", lambda: not qemu_of(cid), 60)
        wait_for("the shim to end", lambda: not shim_of(containerd, cid), 60)
        wait_for("virtiofsd to end", lambda: not virtiofsd_of(run_dir), 30)
        assert not run_dir.exists()
        assert not mounts_of(cid), mounts_of(cid)
    finally:
        ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        ctr("tasks", "delete", cid, check=False)
        ctr("containers", "delete", cid, check=False)
