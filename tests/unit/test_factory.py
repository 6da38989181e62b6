"""VM templates (carapace.factory) and the start of a pod from one (sandbox.restore):
the key, the template's and a clone's VM, the sparse copy of RAM, the store, the
restore plan, the [factory] configuration and ``carapace factory``'s output."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.cli.factory import (
    factory_status,
    format_destroyed,
    format_status,
    template_status,
)
from carapace.config import Config, FactoryConfig, parse_config
from carapace.errors import InvalidArgument
from carapace.factory import (
    MAX_TEMPLATES,
    Template,
    TemplateStore,
    clone_spec,
    copy_sparse,
    template_key,
    template_spec,
)
from carapace.factory.template import INFO, TEMPLATE_FORMAT, file_identity, loading_all_modules
from carapace.guest import ALL_MODULES_PARAM
from carapace.hypervisor import PortForward, TapNic, UserNic, VMSpec, vm_command_line
from carapace.sandbox.restore import MAX_CLONE_NICS, Restore, plan_restore, template_base
from tests.tooling.vmspecs import make_spec

QEMU = "/usr/bin/qemu-system-x86_64"
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def go() -> T:
        return await asyncio.wait_for(coro, 10)

    return asyncio.run(go())


def fake_identity(
    versions: dict[str, int] | None = None,
) -> Callable[[str | Path], dict[str, object]]:
    """A file identity that reads no file: the path and a version number."""
    seen = versions or {}

    def identity(path: str | Path) -> dict[str, object]:
        return {"path": str(path), "version": seen.get(str(path), 0)}

    return identity


def key_of(spec: VMSpec, identity: Callable[[str | Path], dict[str, object]] | None = None) -> str:
    return template_key(QEMU, spec, vm_command_line, identity or fake_identity())[0]


# -- template_key ---------------------------------------------------------------------


def test_the_same_pod_shape_gives_the_same_key() -> None:
    key, inputs = template_key(QEMU, make_spec(), vm_command_line, fake_identity())
    assert key == key_of(make_spec())
    assert len(key) == 24 and int(key, 16) >= 0
    assert inputs["format"] == TEMPLATE_FORMAT
    assert inputs["qemu"] == {"path": QEMU, "version": 0}
    assert inputs["kernel"] == {"path": "/var/lib/carapace/guest/vmlinux", "version": 0}
    argv = inputs["argv"]
    assert isinstance(argv, list) and QEMU not in argv  # the binary is in "qemu"
    # the key is the digest of JSON: its inputs survive a round trip
    assert json.loads(json.dumps(inputs)) == inputs


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mib": 2048},
        {"vcpus": 2},
        {"kernel_params": "loglevel=7"},
        {"shared_fs": "virtio-fs"},
        {"tcg_tb_size_mib": 128},
        {"seccomp_sandbox": False},
        {"max_vcpus": 4},
        {"max_memory_mib": 4096},
        {"accel": "kvm"},
        {"nic_slots": 3},
        {"kernel": Path("/other/vmlinux")},
        {"initrd": Path("/other/initrd.img")},
    ],
    ids=lambda c: next(iter(c)),
)
def test_what_changes_the_command_line_changes_the_key(change: dict[str, Any]) -> None:
    assert key_of(make_spec(**change)) != key_of(make_spec())


@pytest.mark.parametrize(
    "changed", [QEMU, "/var/lib/carapace/guest/vmlinux", "/var/lib/carapace/guest/initrd.img"]
)
def test_a_changed_qemu_kernel_or_initrd_file_changes_the_key(changed: str) -> None:
    assert key_of(make_spec(), fake_identity({changed: 1})) != key_of(make_spec())


@pytest.mark.parametrize(
    "change",
    [
        {"name": "pod-2"},
        {"run_dir": Path("/run/carapace/pod-2")},
        {"shared_dir": Path("/run/carapace/pod-2/shared")},
        {"nics": (TapNic("net0", "02:00:00:00:00:01", 9),)},
        {"nics": (TapNic("net0", "02:00:00:00:00:01", 9), TapNic("net1", "02:aa:00:00:00:02", 10))},
        {"nics": (UserNic("net0", "02:00:00:00:00:01", (PortForward(8080, 80),)),)},
        {"extra_args": ("-S",)},
        {"memory_file": Path("/dev/shm/x"), "memory_file_shared": True},
        {"incoming": Path("/dev/shm/state")},
    ],
    ids=lambda c: "+".join(c),
)
def test_what_is_the_pods_own_does_not_change_the_key(change: dict[str, Any]) -> None:
    assert key_of(make_spec(**change)) == key_of(make_spec())


def test_the_pods_nic_fds_do_not_change_the_key() -> None:
    one = make_spec(nics=(TapNic("net0", "02:00:00:00:00:01", 9),))
    other = make_spec(nics=(TapNic("net0", "02:00:00:00:00:01", 31),))
    assert key_of(one) == key_of(other)
    # as the sandbox computes it: from the template's base of the pod's spec
    assert key_of(template_base(one, 2)) == key_of(template_base(other, 2))


def test_file_identity_tells_versions_of_a_file_apart(tmp_path: Path) -> None:
    f = tmp_path / "vmlinux"
    f.write_bytes(b"kernel one")
    link = tmp_path / "current"
    link.symlink_to(f)
    first = file_identity(f)
    assert first == file_identity(f)
    assert file_identity(link) == first  # a symlink is its target
    assert first["path"] == str(f.resolve()) and first["size"] == 10
    os.utime(f, ns=(1, 1))
    assert file_identity(f) != first
    touched = file_identity(f)
    f.write_bytes(b"kernel two!")  # same inode, new size and time
    assert file_identity(f) != touched
    with pytest.raises(FileNotFoundError):
        file_identity(tmp_path / "absent")


# -- the template's VM and a clone's ----------------------------------------------------


def test_template_spec_has_no_nic_and_its_memory_in_a_shared_file() -> None:
    pod = make_spec(nics=(TapNic("net0", "02:00:00:00:00:01", 9),), extra_args=("-S",))
    work = Path("/dev/shm/t/k.building")
    t = template_spec(pod, work / "build", work / "memory")
    assert t.nics == () and t.extra_args == ()
    assert (t.name, t.run_dir, t.shared_dir) == ("template", work / "build", work / "build/shared")
    assert (t.memory_file, t.memory_file_shared, t.memory_fd) == (work / "memory", True, None)
    assert t.incoming is None
    assert not t.hotplug_share  # 9p: QEMU's own 9p device is migrated
    assert (t.vcpus, t.memory_mib, t.kernel, t.nic_slots) == (1, 1024, pod.kernel, 2)
    fs = template_spec(make_spec(shared_fs="virtio-fs"), work / "build", work / "memory")
    assert fs.hotplug_share  # vhost-user-fs cannot be migrated: clones hot-add it


def test_a_template_and_its_clones_load_every_kernel_module_at_start() -> None:
    work = Path("/dev/shm/t/k.building")
    pod = make_spec(kernel_params="loglevel=7")
    t = template_spec(pod, work / "build", work / "memory")
    assert t.kernel_params == f"loglevel=7 {ALL_MODULES_PARAM}"
    c = clone_spec(pod, Template(Path("/dev/shm/t/k"), "k"))
    assert c.kernel_params == t.kernel_params  # the clone asks what its template did
    assert loading_all_modules(t.kernel_params) == t.kernel_params  # not twice
    assert loading_all_modules("") == ALL_MODULES_PARAM


def test_a_9p_clone_maps_the_template_file_private() -> None:
    t = Template(Path("/dev/shm/t/k"), "k")
    pod = make_spec(nics=(TapNic("net0", "02:00:00:00:00:01", 9),))
    c = clone_spec(pod, t)
    assert c.nics == ()  # hot-added once it runs
    assert (c.memory_file, c.memory_file_shared, c.memory_fd) == (t.memory_file, False, None)
    assert c.incoming == t.state_file == Path("/dev/shm/t/k/state")
    assert not c.hotplug_share
    assert (c.name, c.run_dir, c.shared_dir) == (pod.name, pod.run_dir, pod.shared_dir)
    with pytest.raises(ValueError, match="9p none"):
        clone_spec(pod, t, memory_fd=7)


def test_a_virtiofs_clone_needs_its_own_memory_fd_mapped_shared() -> None:
    t = Template(Path("/dev/shm/t/k"), "k")
    pod = make_spec(shared_fs="virtio-fs")
    with pytest.raises(ValueError, match="virtio-fs clone needs a memfd"):
        clone_spec(pod, t)
    c = clone_spec(pod, t, memory_fd=7)
    assert (c.memory_file, c.memory_file_shared, c.memory_fd) == (
        Path("/proc/self/fd/7"),
        True,
        7,
    )
    assert c.incoming == t.state_file
    assert c.hotplug_share


def _opts(v: str) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in v.split(",")[1:])


@pytest.mark.parametrize("shared_fs", ["virtio-9p", "virtio-fs"])
@pytest.mark.parametrize("headroom", [False, True], ids=["no-headroom", "headroom"])
def test_a_clone_has_the_templates_command_line(shared_fs: str, headroom: bool) -> None:
    """What makes a restore work: the clone's QEMU is the template's, but for its name,
    pid file and the path of its RAM (and, with 9p, its RAM mapped private and its own
    share directory) and the wait for the incoming state."""
    grow = {"max_vcpus": 4, "max_memory_mib": 4096} if headroom else {}
    pod = make_spec(
        shared_fs=shared_fs,
        nics=(TapNic("net0", "02:00:00:00:00:01", 9),),
        free_page_reporting=True,
        **grow,
    )
    work = Path("/dev/shm/carapace/templates/k.building")
    base = template_base(pod, 2)
    template_argv = vm_command_line(QEMU, template_spec(base, work / "build", work / "memory"))
    virtiofs = shared_fs == "virtio-fs"
    t = Template(Path("/dev/shm/carapace/templates/k"), "k")
    restore = Restore(t, False, (), memory_fd=7 if virtiofs else None)
    clone_argv = vm_command_line(QEMU, restore.vm_spec(pod, 2))

    assert clone_argv[-2:] == ["-incoming", "defer"]
    assert "-incoming" not in template_argv
    clone_argv = clone_argv[:-2]
    assert len(clone_argv) == len(template_argv)
    differ = {
        template_argv[i - 1]: (a, b)
        for i, (a, b) in enumerate(zip(template_argv, clone_argv, strict=True))
        if a != b
    }
    expected = {"-name", "-pidfile", "-object"} | (set() if virtiofs else {"-fsdev"})
    assert set(differ) == expected
    assert differ["-name"] == (
        "carapace-template,debug-threads=on",
        "carapace-pod-1,debug-threads=on",
    )
    assert differ["-pidfile"] == (str(work / "build/qemu.pid"), "/run/carapace/pod-1/qemu.pid")
    tmem, cmem = map(_opts, differ["-object"])
    assert tmem["mem-path"] == str(work / "memory")
    assert cmem["mem-path"] == ("/proc/self/fd/7" if virtiofs else str(t.memory_file))
    assert tmem["share"] == "on" and cmem["share"] == ("on" if virtiofs else "off")
    assert {k: v for k, v in tmem.items() if k not in ("mem-path", "share")} == {
        k: v for k, v in cmem.items() if k not in ("mem-path", "share")
    }
    if not virtiofs:
        tfs, cfs = map(_opts, differ["-fsdev"])
        assert (tfs["path"], cfs["path"]) == (str(work / "build/shared"), str(pod.shared_dir))
    # neither has a NIC or a balloon: clones hot-add their NICs; QEMU cannot restore one
    for argv in (template_argv, clone_argv):
        assert "-netdev" not in argv
        assert not any(a.startswith("virtio-balloon") for a in argv)
        assert not any(a.startswith("vhost-user-fs") for a in argv)


def test_the_key_is_the_templates_command_line_with_neutral_paths() -> None:
    pod = template_base(make_spec(shared_fs="virtio-fs"), 2)
    _, inputs = template_key(QEMU, pod, vm_command_line, fake_identity())
    work = Path("/dev/shm/carapace/templates/k.building")
    built = vm_command_line(QEMU, template_spec(pod, work / "build", work / "memory"))
    neutral = [a.replace(str(work), "/template") for a in built[1:]]
    assert inputs["argv"] == neutral


# -- copy_sparse ------------------------------------------------------------------------

PAGE = 4096
#: (offset, bytes) of the data in the sparse test file; holes between them.
CHUNKS = [(0, b"a" * PAGE), (64 * PAGE, b"b" * 3 * PAGE), (1000 * PAGE, b"c" * PAGE)]
SIZE = 2048 * PAGE


def sparse_file(path: Path) -> bytes:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, data in CHUNKS:
            f.seek(offset)
            f.write(data)
    content = bytearray(SIZE)
    for offset, data in CHUNKS:
        content[offset : offset + len(data)] = data
    return bytes(content)


def data_ranges(fd: int) -> list[tuple[int, int]]:
    """The (start, end) of each data range of ``fd`` (SEEK_DATA / SEEK_HOLE)."""
    out, offset, size = [], 0, os.fstat(fd).st_size
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        offset = end
    return out


def test_copy_sparse_copies_the_data_and_keeps_the_holes(tmp_path: Path) -> None:
    src = tmp_path / "memory"
    content = sparse_file(src)
    data = sum(len(d) for _, d in CHUNKS)
    assert os.stat(src).st_blocks * 512 < SIZE / 10  # the file system keeps holes
    dst = tmp_path / "copy"
    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert copy_sparse(src, fd) == data
        assert os.fstat(fd).st_size == SIZE
        assert data_ranges(fd) == data_ranges(os.open(src, os.O_RDONLY))
    finally:
        os.close(fd)
    assert dst.read_bytes() == content
    assert os.stat(dst).st_blocks * 512 < SIZE / 10  # the holes were not written


def test_copy_sparse_into_a_memfd_as_a_virtiofs_clone_does(tmp_path: Path) -> None:
    src = tmp_path / "memory"
    content = sparse_file(src)
    fd = os.memfd_create("test-clone", os.MFD_CLOEXEC)
    try:
        copied = copy_sparse(src, fd)
        assert copied == sum(len(d) for _, d in CHUNKS)
        assert os.fstat(fd).st_blocks * 512 == copied  # only the data's pages
        assert data_ranges(fd) == [(o, o + len(d)) for o, d in CHUNKS]
        assert os.pread(fd, SIZE, 0) == content
    finally:
        os.close(fd)


def test_copy_sparse_of_a_file_of_holes_only(tmp_path: Path) -> None:
    src = tmp_path / "memory"
    with open(src, "wb") as f:
        f.truncate(SIZE)
    fd = os.memfd_create("test-clone", os.MFD_CLOEXEC)
    try:
        assert copy_sparse(src, fd) == 0
        assert os.fstat(fd).st_size == SIZE and os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)


# -- TemplateStore ----------------------------------------------------------------------

INPUTS: dict[str, object] = {"format": TEMPLATE_FORMAT, "argv": ["-m", "1024M"]}


class FakeBuild:
    """A build that writes what a template VM's save leaves: its RAM and its state."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.fail = fail

    async def __call__(self, work: Path) -> None:
        self.calls.append(work)
        (work / "build").mkdir()  # the template VM's run dir: removed once saved
        with open(work / "memory", "wb") as f:
            f.truncate(1 << 20)
            f.write(b"ram")
        (work / "state").write_bytes(b"QEVM")
        if self.fail:
            raise RuntimeError("the template VM died")


def test_get_builds_once_then_finds(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    build = FakeBuild()
    t, built = run(store.get("k1", INPUTS, build))
    assert built and build.calls == [tmp_path / "templates/k1.building"]
    assert t == Template(tmp_path / "templates/k1", "k1")
    assert t.memory_file.read_bytes().startswith(b"ram") and t.state_file.read_bytes() == b"QEVM"
    info = t.info()
    assert info["key"] == "k1" and info["inputs"] == INPUTS
    assert isinstance(info["built"], float) and abs(info["built"] - time.time()) < 3600
    assert isinstance(info["build_seconds"], float) and info["build_seconds"] >= 0
    assert sorted(os.listdir(t.dir)) == sorted(["memory", "state", INFO])  # no build/
    assert not (tmp_path / "templates/k1.building").exists()

    again, built = run(store.get("k1", INPUTS, build))
    assert (again, built) == (t, False)
    assert len(build.calls) == 1
    assert store.templates() == [t] and store.find("k1") == t


def test_two_pods_asking_at_once_build_it_once(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    calls: list[Path] = []
    started = asyncio.Event()

    async def slow_build(work: Path) -> None:
        calls.append(work)
        started.set()
        await asyncio.sleep(0.2)  # the other pod asks meanwhile
        await FakeBuild()(work)

    async def both() -> list[tuple[Template, bool]]:
        first = asyncio.ensure_future(store.get("k1", INPUTS, slow_build))
        await started.wait()
        second = await store.get("k1", INPUTS, slow_build)
        return [await first, second]

    (t1, built1), (t2, built2) = run(both())
    assert t1 == t2 and (built1, built2) == (True, False)
    assert len(calls) == 1


def test_a_failed_build_leaves_no_directory(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    store = TemplateStore(root)
    with pytest.raises(RuntimeError, match="died"):
        run(store.get("k1", INPUTS, FakeBuild(fail=True)))
    assert [p for p in root.iterdir() if p.is_dir()] == []
    assert store.find("k1") is None and store.templates() == []
    # the next pod builds it again, and gets it
    build = FakeBuild()
    t, built = run(store.get("k1", INPUTS, build))
    assert built and len(build.calls) == 1 and store.find("k1") == t


def test_a_half_made_build_is_started_over(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    (root / "k1.building" / "build").mkdir(parents=True)
    (root / "k1.building" / "stale").write_text("from a build that died")
    t, built = run(TemplateStore(root).get("k1", INPUTS, FakeBuild()))
    assert built and not (t.dir / "stale").exists()


def complete(
    root: Path, key: str, info_key: str | None = None, files: tuple[str, ...] = ("memory", "state")
) -> Template:
    d = root / key
    d.mkdir(parents=True)
    for name in files:
        (d / name).write_bytes(b"x")
    if info_key is not None:
        (d / INFO).write_text(json.dumps({"key": info_key, "built": 1.0, "inputs": {}}))
    return Template(d, key)


def test_find_refuses_an_incomplete_directory(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    store = TemplateStore(root)
    assert store.find("none") is None and store.templates() == []  # no store at all
    complete(root, "noinfo")
    complete(root, "otherkey", info_key="k9")
    complete(root, "nostate", info_key="nostate", files=("memory",))
    complete(root, "nomemory", info_key="nomemory", files=("state",))
    bad = complete(root, "badjson")
    bad.info_file.write_text("{not json")
    arr = complete(root, "array")
    arr.info_file.write_text("[1, 2]")
    good = complete(root, "good", info_key="good")
    for key in ("noinfo", "otherkey", "nostate", "nomemory", "badjson", "array"):
        assert store.find(key) is None, key
    assert store.find("good") == good
    assert store.templates() == [good]


def test_the_store_keeps_the_templates_used_last(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    keys = [f"k{i}" for i in range(MAX_TEMPLATES)]
    for i, key in enumerate(keys):
        t, _ = run(store.get(key, INPUTS, FakeBuild()))
        os.utime(t.info_file, (1000.0 * (i + 1), 1000.0 * (i + 1)))
    assert [t.key for t in store.templates()] == keys
    # k0 is used again: now k1 is the one used longest ago
    _, built = run(store.get("k0", INPUTS, FakeBuild()))
    assert not built
    _, built = run(store.get("new", INPUTS, FakeBuild()))
    assert built
    left = {t.key for t in store.templates()}
    assert len(left) == MAX_TEMPLATES
    assert left == {"k0", "k2", "k3", "new"}
    assert not (tmp_path / "templates/k1").exists()
    # its lock file stays: a process may be waiting on it
    assert (tmp_path / "templates/k1.lock").exists()


def test_remove_all(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    store = TemplateStore(root)
    for key in ("a", "b"):
        run(store.get(key, INPUTS, FakeBuild()))
    (root / "c.building").mkdir()  # half-made: removed, not counted
    assert store.remove_all() == 2
    assert not root.exists() and store.templates() == []
    assert store.remove_all() == 0  # nothing there: nothing to do


def test_remove_all_leaves_what_is_not_a_template(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    (root / "someone-elses-file").write_text("keep me")
    store = TemplateStore(root)
    run(store.get("k1", INPUTS, FakeBuild()))
    assert store.remove_all() == 1
    assert (root / "someone-elses-file").read_text() == "keep me"


# -- plan_restore, template_base --------------------------------------------------------


def tap(i: int) -> TapNic:
    return TapNic(f"net{i}", f"02:00:00:00:00:0{i}", 10 + i)


def test_plan_restore_refuses_user_networking() -> None:
    why = plan_restore((UserNic("net0", "02:00:00:00:00:01"),))
    assert why is not None and "user-mode networking" in why
    assert plan_restore((tap(0), UserNic("net1", "02:00:00:00:00:02"))) is not None


def test_plan_restore_takes_at_most_max_clone_nics() -> None:
    for n in range(MAX_CLONE_NICS + 1):
        assert plan_restore(tuple(tap(i) for i in range(n))) is None
    n = MAX_CLONE_NICS + 1
    why = plan_restore(tuple(tap(i) for i in range(n)))
    assert why is not None
    assert f"{n} network interfaces" in why and f"at most {MAX_CLONE_NICS}" in why


def test_template_base_has_room_for_a_clones_nics_and_no_balloon() -> None:
    pod = make_spec(nics=(tap(0),), nic_slots=2, free_page_reporting=True)
    base = template_base(pod, 2)
    assert base.nics == ()
    assert base.nic_slots == 2 + MAX_CLONE_NICS
    assert base.free_page_reporting is False
    assert dataclasses.replace(base, nics=pod.nics, nic_slots=2, free_page_reporting=True) == pod
    argv = vm_command_line(QEMU, base)
    assert sum(a.startswith("pcie-root-port,id=nicslot") for a in argv) == 2 + MAX_CLONE_NICS


# -- [factory] configuration ------------------------------------------------------------


def test_factory_defaults() -> None:
    cfg = parse_config("")
    assert cfg.factory == FactoryConfig()
    assert cfg.factory.template is False
    assert cfg.factory.template_dir == "/dev/shm/carapace/templates"


def test_factory_section_parses() -> None:
    cfg = parse_config('[factory]\ntemplate = true\ntemplate_dir = "/dev/shm/t"\n')
    assert (cfg.factory.template, cfg.factory.template_dir) == (True, "/dev/shm/t")


def test_factory_unknown_key_is_refused() -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_config("[factory]\ntemplates = true\n", "c.toml")
    assert "c.toml [factory]: unknown key" in str(e.value) and "'templates'" in str(e.value)
    assert "accepted: template, template_dir" in str(e.value)


def test_factory_template_must_be_a_bool() -> None:
    with pytest.raises(InvalidArgument, match=r"\[factory\]\.template: 'yes' is a str"):
        parse_config('[factory]\ntemplate = "yes"\n', "c.toml")


@pytest.mark.parametrize("bad", ["templates", "./t", "", "/" + "d" * 56])
def test_factory_template_dir_must_be_absolute_and_short(bad: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_config(f'[factory]\ntemplate_dir = "{bad}"\n', "c.toml")
    assert f"[factory] template_dir: {bad!r}" in str(e.value)
    assert "an absolute path" in str(e.value) and "at most 56 characters" in str(e.value)
    parse_config(f'[factory]\ntemplate_dir = "/{"d" * 55}"\n')  # 56: accepted


# -- carapace factory status / destroy --------------------------------------------------


def test_status_of_a_store(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    inputs = {
        "format": TEMPLATE_FORMAT,
        "argv": [],
        "qemu": {"path": QEMU},
        "kernel": {"path": "/g/vmlinux"},
        "initrd": {"path": "/g/initrd.img"},
    }

    async def build(work: Path) -> None:
        with open(work / "memory", "wb") as f:
            f.truncate(256 << 20)  # 256 MiB of guest RAM, 2 MiB of it touched
            f.write(b"r" * (2 << 20))
        (work / "state").write_bytes(b"QEVM")

    t, _ = run(TemplateStore(root).get("abc", inputs, build))
    st = template_status(t)
    assert st["key"] == "abc"
    assert st["memory_mib_on_disk"] == pytest.approx(2.0, abs=0.1)
    assert st["guest_memory_mib"] == 256.0
    assert (st["qemu"], st["kernel"], st["initrd"]) == (QEMU, "/g/vmlinux", "/g/initrd.img")
    assert st["built"] == t.info()["built"] and st["build_seconds"] == t.info()["build_seconds"]

    cfg = Config(source="c.toml")
    cfg.factory = FactoryConfig(template=True, template_dir=str(root))
    status = factory_status(cfg)
    assert status == {
        "enabled": True,
        "config": "c.toml",
        "template_dir": str(root),
        "templates": [st],
    }
    json.dumps(status)  # --json prints it


def test_status_of_a_template_with_odd_inputs(tmp_path: Path) -> None:
    t = complete(tmp_path, "k", info_key="k")
    t.info_file.write_text(json.dumps({"key": "k", "built": "yesterday", "inputs": [1]}))
    st = template_status(t)
    assert (st["built"], st["build_seconds"], st["qemu"], st["kernel"]) == (None, None, "", "")
    assert "k: built - in -" in format_status(
        {"enabled": False, "config": "", "template_dir": str(tmp_path), "templates": [st]}
    )


def test_format_status() -> None:
    status = {
        "enabled": False,
        "config": "/etc/carapace/configuration.toml",
        "template_dir": "/dev/shm/carapace/templates",
        "templates": [
            {
                "key": "0123456789abcdef01234567",
                "built": 0.0,
                "build_seconds": 12.345,
                "memory_mib_on_disk": 97.3,
                "guest_memory_mib": 1024.0,
                "qemu": QEMU,
                "kernel": "/g/vmlinux",
                "initrd": "",
            }
        ],
    }
    assert format_status(status) == (
        "templates: disabled ([factory] template = false in "
        "/etc/carapace/configuration.toml)\n"
        "template_dir: /dev/shm/carapace/templates\n"
        "0123456789abcdef01234567: built 1970-01-01 00:00:00 UTC in 12.3 s, memory 97.3 MiB "
        "on disk of 1024.0 MiB\n"
        f"  qemu:   {QEMU}\n"
        "  kernel: /g/vmlinux\n"
        "  initrd: -\n"
    )
    empty = format_status({**status, "enabled": True, "config": "", "templates": []})
    assert empty.splitlines() == [
        "templates: enabled ([factory] template = true in the defaults)",
        "template_dir: /dev/shm/carapace/templates",
        "no templates",
    ]


def test_format_destroyed() -> None:
    assert format_destroyed(0, "/d") == "removed 0 templates from /d\n"
    assert format_destroyed(1, "/d") == "removed 1 template from /d\n"
    assert format_destroyed(3, "/d") == "removed 3 templates from /d\n"


def test_the_factory_command_is_registered() -> None:
    from carapace.cli.main import build_parser

    args = build_parser().parse_args(["factory", "status", "--json"])
    assert (args.command, args.factory_command, args.json) == ("factory", "status", True)
    for sub in ("init", "destroy"):
        assert build_parser().parse_args(["factory", sub]).factory_command == sub
    with pytest.raises(InvalidArgument, match="factory"):
        build_parser().parse_args(["factory", "rebuild"])
