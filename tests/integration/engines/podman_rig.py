"""A private podman for the tests (podman 4.3 /usr/bin/podman, conmon /usr/bin/conmon).

``PodmanRig().start()`` makes a fresh directory ``/tmp/carapace-podman-XXXX`` holding
podman's storage (``--root``), run state (``--runroot``), temporary files and locks
(``--tmpdir``), its network configuration, a containers.conf and the carapace
configuration, and imports the busybox test image (images.py) and a pause image made
from it. Every ``podman`` call runs ``/usr/bin/podman`` with those directories and the
flags this host needs (``--cgroup-manager cgroupfs --events-backend file
--storage-driver vfs``; see shared/DESIGN.md §5), with ``CONTAINERS_CONF`` naming the
rig's containers.conf (podman then reads no other) and a timeout.

containers.conf (``containers_conf_text``):

- ``[engine.runtimes] carapace = [".venv/bin/carapace-runtime"]`` next to runc.
- ``default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]``: podman's default
  nofile (1048576) is above this host's hard cap of 20000.
- ``[engine] conmon_env_vars`` holds ``CARAPACE_CONFIG=<the rig's carapace
  configuration>``. podman 4.3 has no containers.conf key for runtime flags (only the
  ``--runtime-flag`` option of each podman call, which podman passes, as ``--NAME=VALUE``
  before the verb, to every runtime call of that podman process, whichever the
  runtime). conmon_env_vars is the environment of conmon, and conmon runs the runtime's
  ``create`` and ``exec``; podman runs ``start``, ``kill``, ``pause``, ``resume``,
  ``update`` and ``delete`` itself with an environment of ``XDG_RUNTIME_DIR`` (and for
  start and update ``PATH``) only. So the runtime reads the configuration at
  ``create`` and must not need $CARAPACE_CONFIG afterwards.
- ``[containers] netns = "none"``: containers and pods have no network unless a test
  asks for one. podman picks CNI here (netavark is not installed; ``network_backend``
  records what ``podman info`` says), and its own bridge networks come with the CNI
  firewall plugin (iptables chains on the host) and host-local leases under
  /var/lib/cni; ``[network] network_config_dir`` is the rig's own directory, so no
  network of the host's is seen or changed.
- ``infra_image`` / ``infra_command``: the pause image made from busybox (``/pause``
  sleeps and exits 0 on SIGTERM); Debian's podman has no catatonit to build its own.
- ``lock_type = "file"``: locks under ``--tmpdir`` rather than the machine-wide
  /dev/shm/libpod_lock; ``events_logfile_path`` under ``--tmpdir`` too.

The carapace configuration (``carapace_config_text``) enables CPU and memory hotplug
and the annotations openEuler's resource guide uses (sandbox_cpu, sandbox_mem,
blkio_cgroup, files_limit); carapace refuses the last two by default.

``stop()`` removes every pod and container (``pod rm -af``, ``rm -af``, time 0), then
``carapace-runtime delete --force``s any record of the runtime whose bundle is the rig's
(what podman could not remove), ends the conmon processes of the rig still alive,
unmounts everything under its directory, deletes the network namespaces podman made
(``/run/netns/netns-*`` that were not there before), removes the ``libpod_parent``
cgroups it created (cgroupfs driver), its directory, and /var/lib/containers/cache
(containers/image's blob info cache, which ``podman import`` makes whatever ``--root``
says) and /var/lib/containers when they were not there before. Nothing else here
touches a system podman (/var/lib/containers, /run/containers).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from carapace.linux import mounts_under

from ..procs import processes
from .hostparts import cgroup_parents, rmdir_tree
from .images import IMAGE_REF, busybox_tar, import_into

__all__ = [
    "CARAPACE_RUNTIME",
    "PODMAN_RUNTIMES",
    "PodmanCommandError",
    "PodmanRig",
    "PodmanRigError",
    "carapace_missing",
    "carapace_oci_state",
    "podman",
    "podman_carapace",
    "podman_rig",
    "podman_runtime",
    "runtime_state",
]

REPO = Path(__file__).resolve().parents[3]
PODMAN = "/usr/bin/podman"
CONMON = "/usr/bin/conmon"
RUNC = "/usr/sbin/runc"
CARAPACE_RUNTIME = REPO / ".venv" / "bin" / "carapace-runtime"
#: the runtime's state directory when it is given no --root (podman never gives one)
CARAPACE_OCI_ROOT = Path("/run/carapace-oci")
PAUSE_REF = "carapace-test/pause:latest"
#: a pod's pause process: sleeps forever, exits 0 on SIGTERM or SIGINT (the trap is
#: installed, so the signals reach it as PID 1), reaps the children reparented to it
PAUSE_SCRIPT = """\
#!/bin/sh
trap 'kill $! 2>/dev/null; exit 0' TERM INT
while :; do
  sleep 2147483647 &
  wait $!
done
"""
NETNS_DIR = Path("/run/netns")
#: containers/image's blob info cache for root: ``podman import`` creates it whatever
#: --root says (podman 4.3 has no option to move it)
BLOB_INFO_CACHE = Path("/var/lib/containers/cache")
CGROUP_PARENT = "libpod_parent"  # podman's parent cgroup with the cgroupfs manager
GLOBAL_FLAGS = ("--cgroup-manager", "cgroupfs", "--events-backend", "file")
STORAGE_DRIVER = "vfs"
ULIMITS = ("nofile=20000:20000", "nproc=32768:32768")
#: openEuler's annotations the seed's examples use (carapace enables only the first
#: two by default)
SEED_ANNOTATIONS = ("^sandbox_cpu$", "^sandbox_mem$", "^blkio_cgroup$", "^files_limit$")
CARAPACE_CONFIG_TEXT = (
    "# carapace configuration of the test podman: hotplug and openEuler's annotations\n"
    "[hypervisor]\n"
    "enable_cpu_memory_hotplug = true\n"
    "default_maxmemory = 8192\n"
    f"enable_annotations = {json.dumps(list(SEED_ANNOTATIONS))}\n"
)
PODMAN_RUNTIMES = ("runc", "carapace")


class PodmanRigError(RuntimeError):
    """The test podman could not be set up, used or cleaned up."""


class PodmanCommandError(PodmanRigError):
    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout.strip()}\n"
            f"stderr: {result.stderr.strip()}"
        )


def _toml_list(items: Sequence[str]) -> str:
    return json.dumps(list(items))  # a JSON list of strings is a valid TOML array


def podman_netns() -> set[str]:
    """Named network namespaces podman makes (``/run/netns/netns-<uuid>``)."""
    return {p.name for p in NETNS_DIR.glob("netns-*")} if NETNS_DIR.is_dir() else set()


def carapace_oci_state() -> set[str]:
    """What the carapace runtime keeps in its default state directory: container
    records (``<id>``), their locks (``.lock/<id>``) and pod services (``pods/<pod>``)."""
    root = CARAPACE_OCI_ROOT
    found = {p.parent.name for p in root.glob("*/state.json")}
    found |= {f".lock/{p.name}" for p in root.glob(".lock/*")}
    found |= {f"pods/{p.name}" for p in root.glob("pods/*")}
    return found


class PodmanRig:
    """One private podman; ``podman(...)`` runs it with the rig's directories."""

    def __init__(self, carapace_config_text: str = CARAPACE_CONFIG_TEXT) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="carapace-podman-"))
        self.root = self.base / "root"
        self.runroot = self.base / "run"
        self.tmpdir = self.base / "tmp"
        self.network_dir = self.base / "net"
        self.containers_conf = self.base / "containers.conf"
        self.carapace_config = self.base / "carapace-configuration.toml"
        self.carapace_config_text = carapace_config_text
        self.image = IMAGE_REF
        self.pause_image = PAUSE_REF
        self.network_backend = ""
        self._netns_before: set[str] = set()
        self._cgroups_before: set[Path] = set()
        self._host_dirs_before: set[Path] = set()

    # -- configuration ------------------------------------------------------------------

    def containers_conf_text(self, annotations: Sequence[str] = ()) -> str:
        """The rig's containers.conf; ``annotations`` ("key=value") are added to every
        container created with it (containers.conf ``[containers] annotations``)."""
        return (
            "# containers.conf of the test podman\n"
            "[containers]\n"
            f"default_ulimits = {_toml_list(ULIMITS)}\n"
            'netns = "none"\n'
            f"annotations = {_toml_list(annotations)}\n"
            "\n[network]\n"
            f"network_config_dir = {json.dumps(str(self.network_dir))}\n"
            "\n[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"events_logfile_path = {json.dumps(str(self.tmpdir / 'events.log'))}\n"
            f"tmp_dir = {json.dumps(str(self.tmpdir))}\n"
            'lock_type = "file"\n'
            'runtime = "runc"\n'
            f"conmon_path = {_toml_list([CONMON])}\n"
            "conmon_env_vars = "
            + _toml_list(
                [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    f"CARAPACE_CONFIG={self.carapace_config}",
                ]
            )
            + "\n"
            f"infra_image = {json.dumps(PAUSE_REF)}\n"
            'infra_command = "/pause"\n'
            'pull_policy = "never"\n'
            "\n[engine.runtimes]\n"
            f"runc = {_toml_list([RUNC])}\n"
            f"carapace = {_toml_list([str(CARAPACE_RUNTIME)])}\n"
        )

    def write_containers_conf(self, name: str, annotations: Sequence[str]) -> Path:
        """A second containers.conf beside the rig's, with ``annotations`` for every
        container; pass it as ``podman(..., containers_conf=path)``."""
        path = self.base / name
        path.write_text(self.containers_conf_text(annotations))
        return path

    # -- the CLI ------------------------------------------------------------------------

    def argv(self, *args: str, runtime_flags: Sequence[str] = ()) -> list[str]:
        flags = [f for flag in runtime_flags for f in ("--runtime-flag", flag)]
        return [
            PODMAN,
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--tmpdir", str(self.tmpdir),
            "--storage-driver", STORAGE_DRIVER,
            *GLOBAL_FLAGS,
            *flags,
            *args,
        ]  # fmt: skip

    def env(self, containers_conf: Path | None = None) -> dict[str, str]:
        """podman's environment: ours with CONTAINERS_CONF naming the rig's file, and
        no CARAPACE_CONFIG (the runtime gets the rig's through containers.conf)."""
        env = {k: v for k, v in os.environ.items() if k != "CARAPACE_CONFIG"}
        env["CONTAINERS_CONF"] = str(containers_conf or self.containers_conf)
        return env

    def podman(
        self,
        *args: str,
        timeout: float = 180.0,
        check: bool = True,
        input: str | None = None,
        runtime_flags: Sequence[str] = (),
        containers_conf: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``podman <the rig's flags> ARGS``; output captured as text; killed after
        ``timeout`` seconds (PodmanRigError, with what it printed). ``runtime_flags``
        ("NAME=VALUE") become ``--runtime-flag`` options. With ``check``, a non-zero
        exit raises PodmanCommandError (which holds the result)."""
        argv = self.argv(*args, runtime_flags=runtime_flags)
        try:
            result = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env(containers_conf),
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            raise PodmanRigError(
                f"{' '.join(argv)} did not finish in {timeout:g}s (killed)\n"
                f"stdout: {(out or '').strip()}\nstderr: {(err or '').strip()}"
            ) from None
        if check and result.returncode != 0:
            raise PodmanCommandError(argv, result)
        return result

    def inspect(self, name: str, fmt: str) -> str:
        return self.podman("inspect", "--format", fmt, name).stdout.strip()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> PodmanRig:
        for d in (self.root, self.runroot, self.tmpdir, self.network_dir):
            d.mkdir(parents=True)
        self.carapace_config.write_text(self.carapace_config_text)
        self.containers_conf.write_text(self.containers_conf_text())
        self._netns_before = podman_netns()
        self._cgroups_before = {c for c in cgroup_parents(CGROUP_PARENT) if c.exists()}
        self._host_dirs_before = {d for d in self.host_dirs() if d.exists()}
        try:
            info = json.loads(self.podman("info", "--format", "json", timeout=60).stdout)
            self.network_backend = str(info.get("host", {}).get("networkBackend", ""))
            cli = ["env", f"CONTAINERS_CONF={self.containers_conf}", *self.argv()]
            tar = busybox_tar(self.base)
            import_into(cli, tar, self.image)
            self.podman(
                "import", "--change", 'ENTRYPOINT ["/pause"]', "--change", "CMD []",
                str(self._pause_tar(tar)), self.pause_image, timeout=300,
            )  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def _pause_tar(self, busybox: Path) -> Path:
        """The busybox root filesystem with /pause (PAUSE_SCRIPT) added."""
        path = self.base / "pause-rootfs.tar"
        shutil.copyfile(busybox, path)
        data = PAUSE_SCRIPT.encode()
        info = tarfile.TarInfo("pause")
        info.size = len(data)
        info.mode = 0o755
        with tarfile.open(path, "a") as tar:
            tar.addfile(info, io.BytesIO(data))
        return path

    def inventory(self) -> list[str]:
        """What the tests may leave: pods and containers (any state)."""
        left = []
        pods = self.podman("pod", "ps", "--format", "{{.ID}} {{.Name}} {{.Status}}", timeout=60)
        left += [f"pod {line}" for line in pods.stdout.splitlines() if line.strip()]
        ps = self.podman(
            "ps", "-a", "--format", "{{.ID}} {{.Names}} {{.Status}}", timeout=60
        )  # fmt: skip
        left += [f"container {line}" for line in ps.stdout.splitlines() if line.strip()]
        return left

    def remove_all(self) -> list[str]:
        """Remove every pod and container (no grace period); what was there, and what
        removing them printed on failure."""
        left = self.inventory()
        if left:
            for args in (("pod", "rm", "-af", "-t", "0"), ("rm", "-af", "-t", "0")):
                r = self.podman(*args, timeout=600, check=False)
                if r.returncode != 0:
                    left.append(f"podman {' '.join(args)}: {r.stderr.strip()}")
        return left

    def stop(self) -> list[str]:
        """Remove every trace of the rig; the problems met, if any."""
        problems: list[str] = []
        if self.containers_conf.exists():
            try:
                left = self.remove_all()
                if left:
                    problems.append(f"removed at stop: {left}")
            except PodmanRigError as e:
                problems.append(f"removing containers failed: {e}")
        problems += self.delete_runtime_records()
        problems += self._kill_leftovers()
        for target in mounts_under(str(self.base)):
            r = subprocess.run(["umount", target], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)
                problems.append(f"umount {target}: {r.stderr.strip()} (detached lazily)")
        for name in sorted(podman_netns() - self._netns_before):
            path = NETNS_DIR / name
            subprocess.run(["umount", str(path)], capture_output=True)
            with contextlib.suppress(OSError):
                path.unlink()
            problems.append(f"network namespace {path} was left; removed")
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            problems.append(f"could not remove {self.base}")
        for d in self.host_dirs():  # children first
            if d.exists() and d not in self._host_dirs_before:
                shutil.rmtree(d, ignore_errors=True)
        for cgroup in cgroup_parents(CGROUP_PARENT) - self._cgroups_before:
            if cgroup.exists():
                rmdir_tree(cgroup)
                if cgroup.exists():
                    problems.append(f"cgroup {cgroup} still has members or children")
        return problems

    def delete_runtime_records(self) -> list[str]:
        """``carapace-runtime delete --force`` of the records in its state directory
        whose bundle is the rig's (left when podman could not remove a container); what
        was deleted."""
        deleted = []
        for cid in sorted(p.parent.name for p in CARAPACE_OCI_ROOT.glob("*/state.json")):
            if not CARAPACE_RUNTIME.exists():
                break
            st = subprocess.run(
                [str(CARAPACE_RUNTIME), "state", cid], capture_output=True, text=True, timeout=60
            )  # fmt: skip
            try:
                bundle = str(json.loads(st.stdout).get("bundle", ""))
            except (ValueError, AttributeError):
                continue
            if bundle.startswith(str(self.base) + "/"):
                d = subprocess.run(
                    [str(CARAPACE_RUNTIME), "delete", "--force", cid],
                    capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                deleted.append(f"runtime record {cid} deleted ({d.returncode}: {d.stderr.strip()})")
        return deleted

    @staticmethod
    def host_dirs() -> list[Path]:
        """Directories outside the rig's own that podman creates: the blob info cache
        and its parent; children first."""
        return [BLOB_INFO_CACHE, BLOB_INFO_CACHE.parent]

    def own_processes(self) -> list[int]:
        """Processes naming the rig's directory in their command line (conmon, the
        containers' runtime calls)."""
        mark = str(self.base).encode()
        return [
            pid for pid, argv in processes() if pid != os.getpid() and any(mark in a for a in argv)
        ]

    def _kill_leftovers(self) -> list[str]:
        problems = []
        deadline = time.monotonic() + 10  # conmon exits shortly after its container
        while (pids := self.own_processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            problems.append(f"pid {pid} outlived its container; killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return problems


# -- fixtures (imported by conftest.py) ------------------------------------------------


def carapace_missing() -> str:
    """Why carapace cannot be used here ('' when it can)."""
    if not os.access(CARAPACE_RUNTIME, os.X_OK):
        return f"{CARAPACE_RUNTIME} does not exist: the carapace OCI runtime CLI is not installed"
    return ""


@pytest.fixture(scope="session")
def podman_rig() -> Iterator[PodmanRig]:
    """The session's private podman, with the busybox and pause test images."""
    if os.geteuid() != 0:
        pytest.skip("the test podman needs root")
    for binary in (PODMAN, CONMON, RUNC):
        if not Path(binary).is_file():
            pytest.skip(f"{binary} not installed (Debian's podman, conmon, runc)")
    rig = PodmanRig().start()
    try:
        yield rig
    finally:
        problems = rig.stop()
    assert not problems, f"stopping the test podman: {problems}"


@pytest.fixture
def podman(podman_rig: PodmanRig, request: pytest.FixtureRequest) -> Iterator[PodmanRig]:
    """The session's podman; after the test no pod, container or network namespace of
    podman's may be left, nor a record in the carapace runtime's state directory (they
    are removed, and the test fails)."""
    netns_before, state_before = podman_netns(), carapace_oci_state()
    yield podman_rig
    left = podman_rig.remove_all()
    netns = sorted(podman_netns() - netns_before)
    state = sorted(carapace_oci_state() - state_before)
    if state:
        left += podman_rig.delete_runtime_records()
    assert not left and not netns and not state, (
        f"{request.node.name} left behind in podman: {left}; network namespaces: {netns}; "
        f"carapace runtime state in {CARAPACE_OCI_ROOT}: {state}"
    )


@pytest.fixture(params=PODMAN_RUNTIMES)
def podman_runtime(request: pytest.FixtureRequest) -> str:
    """Each podman test runs with runc (the baseline that proves the test) and with
    carapace (skipped while .venv/bin/carapace-runtime is not installed)."""
    name: str = request.param
    if name == "carapace" and (why := carapace_missing()):
        pytest.skip(why)
    return name


@pytest.fixture
def podman_carapace(request: pytest.FixtureRequest) -> PodmanRig:
    """The podman fixture for tests that only mean something with carapace (openEuler's
    sandbox annotations, which runc ignores); skipped while carapace is not installed."""
    if why := carapace_missing():
        pytest.skip(why)
    rig: PodmanRig = request.getfixturevalue("podman")
    return rig


def runtime_state(runtime: str, container_id: str) -> Mapping[str, object]:
    """``<runtime> state ID`` (runc's default root, carapace's default root: podman
    gives neither runtime a --root)."""
    binary = RUNC if runtime == "runc" else str(CARAPACE_RUNTIME)
    r = subprocess.run(
        [binary, "state", container_id], capture_output=True, text=True, timeout=60
    )  # fmt: skip
    if r.returncode != 0:
        raise PodmanRigError(f"{binary} state {container_id} exited {r.returncode}: {r.stderr}")
    state: Mapping[str, object] = json.loads(r.stdout)
    return state
