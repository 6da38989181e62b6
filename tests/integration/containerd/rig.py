"""A private containerd for the tests: its own root, state, socket, CNI config and images.

``ContainerdRig().start()`` writes a containerd config (version 2), starts
``containerd --config`` with the repository's ``.venv/bin`` first in PATH (so that
containerd finds ``containerd-shim-carapace-v2``), waits for the socket and ``ctr
version``, waits for CRI to report its runtime and network ready, and imports the
local test images (``scripts/build-test-images``) into the ``default`` and ``k8s.io``
namespaces. ``stop()`` deletes what is left in containerd, sends SIGTERM, ends the
shims it started, unmounts everything under its root and state, removes its bridge
and directories, and restores ``net.ipv4.ip_forward``.

Nothing here touches the host's own containerd (/run/containerd, /var/lib/containerd).

Choices (see ``config_text``):

- snapshotter: overlayfs when an overlay mount works in the rig's root (it does on
  this ext4 host), else native; ``snapshotter_reason`` says why.
- CNI: one bridge conflist with host-local IPAM and no ipMasq / portmap, so no iptables
  rule is ever written. containerd's CRI adds the loopback network by itself (go-cni's
  WithLoNetwork, using ``loopback`` from bin_dir); a separate loopback conf file would
  be ignored, CRI loads only the first conf file (``max_conf_num = 1``).
  ``isGateway`` puts the gateway address on the bridge so the host reaches pod IPs; the
  bridge plugin turns ``net.ipv4.ip_forward`` on for that, and ``stop()`` puts back the
  value it found.
- runtimes: ``runc`` (io.containerd.runc.v2, cgroupfs driver: SystemdCgroup = false,
  there is no systemd here) and ``carapace`` (io.containerd.carapace.v2), the latter
  appended from ``carapace.cli.install.SNIPPET`` (= deploy/containerd-carapace.toml)
  with one change: its ConfigPath names the rig's own carapace configuration
  (``carapace_config``, all defaults), not /etc/carapace/configuration.toml, which a
  test host need not have. A second handler, ``carapace-template``
  (``TEMPLATE_HANDLER``), is the same runtime with its own configuration
  (``template_config``): ``[factory] template = true`` with the rig's own template
  directory (``template_dir``, under /dev/shm), which ``stop()`` empties and removes.
- ``restrict_oom_score_adj = true``: the host lacks CAP_SYS_RESOURCE, so lowering
  oom_score_adj fails (see shared/DESIGN.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carapace.cli.install import CARAPACE_CONFIG_PATH, SNIPPET
from carapace.linux import unescape_mountinfo

from ..procs import processes

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = REPO / ".venv" / "bin"
BUILD_TEST_IMAGES = REPO / "scripts" / "build-test-images"

#: $CARAPACE_TEST_RIG (a digit, default 0) picks one of several rigs, so that test
#: sessions on one machine can run side by side: own dirs, bridge and pod subnet.
RIG = os.environ.get("CARAPACE_TEST_RIG", "0")
if not (RIG.isdigit() and len(RIG) == 1):
    raise ValueError(f"CARAPACE_TEST_RIG={RIG!r}: accepted: one digit 0-9")
_SUFFIX = "" if RIG == "0" else f"-{RIG}"
BASE = Path(f"/var/lib/carapace-test{_SUFFIX}")
ROOT = BASE / "containerd"
STATE = Path(f"/run/carapace-test{_SUFFIX}/containerd")
SOCKET = STATE / "containerd.sock"
CNI_DIR = BASE / "cni"
BRIDGE = f"carapace-test{RIG}"
POD_SUBNET = f"10.{234 + int(RIG)}.0.0/24"

#: The rig's VM templates (a tmpfs, as the default template_dir; short: the path of a
#: clone's RAM and sockets must fit QEMU's limits).
TEMPLATE_DIR = Path(f"/dev/shm/carapace-test{_SUFFIX}-templates")

BUSYBOX_IMAGE = "carapace.local/busybox:latest"
PAUSE_IMAGE = "carapace.local/pause:latest"
#: busybox plus the host's Debian ip and iptables (nft), when the host has them
NETTOOLS_IMAGE = "carapace.local/nettools:latest"
NAMESPACES = ("default", "k8s.io")
RUNC = "io.containerd.runc.v2"
CARAPACE = "io.containerd.carapace.v2"
#: The CRI runtime handler of carapace with VM templates on.
TEMPLATE_HANDLER = "carapace-template"

#: Plugins that cannot work on this host (no btrfs/zfs volume, no thin pool, no aufs
#: module) or that only add noise; disabling them keeps the log about real failures.
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class RigError(RuntimeError):
    """The test containerd could not be started or stopped cleanly."""


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


def mounts_under(*dirs: Path) -> list[str]:
    """Mount points at or below any of ``dirs``, deepest (last mounted) first."""
    prefixes = [str(d) for d in dirs]
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = unescape_mountinfo(line.split()[1])
            if any(target == p or target.startswith(p + "/") for p in prefixes):
                found.append(target)
    return list(reversed(found))


def host_dirs_containerd_may_create() -> list[Path]:
    """Host directories outside the rig's own that containerd, runc and CNI create for
    the tests: the per-namespace cgroup parents (cgroupfs driver: /<namespace>/<id>),
    libcni's result cache and the named netns directory; children before parents."""
    dirs: list[Path] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] in ("cgroup", "cgroup2"):
                dirs += [Path(unescape_mountinfo(fields[1])) / ns for ns in NAMESPACES]
    return [*dirs, Path("/var/lib/cni/results"), Path("/var/lib/cni"), Path("/run/netns")]


def pod_config(
    name: str, log_dir: str, namespace: str = "carapace-tests", labels: dict[str, str] | None = None
) -> Any:
    """A CRI PodSandboxConfig (pod network, private pid namespace), labelled ``test=name``
    unless ``labels`` are given."""
    from cri_api import (
        LinuxPodSandboxConfig,
        LinuxSandboxSecurityContext,
        NamespaceMode,
        NamespaceOption,
        PodSandboxConfig,
        PodSandboxMetadata,
    )

    return PodSandboxConfig(
        metadata=PodSandboxMetadata(
            name=name, uid=uuid.uuid4().hex, namespace=namespace, attempt=0
        ),
        hostname=name,
        log_directory=log_dir,
        labels={"test": name} if labels is None else labels,
        linux=LinuxPodSandboxConfig(
            security_context=LinuxSandboxSecurityContext(
                namespace_options=NamespaceOption(
                    network=NamespaceMode.POD, pid=NamespaceMode.CONTAINER
                )
            )
        ),
    )


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def overlay_works(where: Path) -> tuple[bool, str]:
    """Whether an overlay mount works on the filesystem of ``where`` (and why not)."""
    fstype = "?"
    with contextlib.suppress(OSError):
        fstype = subprocess.run(
            ["stat", "-f", "-c", "%T", str(where)], capture_output=True, text=True
        ).stdout.strip()
    probe = where / "overlay-probe"
    shutil.rmtree(probe, ignore_errors=True)
    dirs = {n: probe / n for n in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir(parents=True)
    (dirs["lower"] / "f").write_text("x")
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
        capture_output=True,
        text=True,
    )
    try:
        if r.returncode != 0:
            return False, f"overlay mount on {fstype} failed: {r.stderr.strip()}"
        ok = (dirs["merged"] / "f").read_text() == "x"
        subprocess.run(["umount", str(dirs["merged"])], check=True)
        return ok, f"overlay mount works on {fstype} ({where})"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@dataclass
class CriClient:
    """CRI v1 stubs over gRPC to the rig's socket."""

    runtime: Any  # cri_api.RuntimeServiceStub
    image: Any  # cri_api.ImageServiceStub
    channel: Any  # grpc.Channel

    def close(self) -> None:
        self.channel.close()


class ContainerdRig:
    """One private containerd (see the module's doc)."""

    def __init__(
        self,
        *,
        root: Path = ROOT,
        state: Path = STATE,
        cni_dir: Path = CNI_DIR,
        log_path: Path = BASE / "containerd.log",
        extra_path: Sequence[Path] = (),
        template_dir: Path = TEMPLATE_DIR,
    ) -> None:
        self.root = root
        self.state = state
        self.socket = state / "containerd.sock"
        self.cni_dir = cni_dir
        self.cni_conf_dir = cni_dir / "net.d"
        self.config_path = root.parent / "containerd.toml"
        self.carapace_config = root.parent / "carapace-configuration.toml"
        self.template_config = root.parent / "carapace-template-configuration.toml"
        self.template_dir = template_dir
        self.log_path = log_path
        self.extra_path = list(extra_path)
        self.snapshotter = "overlayfs"
        self.snapshotter_reason = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._ip_forward: str | None = None
        self._host_dirs_before: set[Path] | None = None

    # -- configuration ---------------------------------------------------------------

    def cni_conflist(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "carapace-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.cni_dir / "networks"),
                    },
                }
            ],
        }

    def config_text(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        runtimes = f"{cri}.containerd.runtimes"
        return (
            f"""\
# written by tests/integration/containerd/rig.py
version = 2
root = {_toml_str(str(self.root))}
state = {_toml_str(str(self.state))}
disabled_plugins = {_toml_list(DISABLED_PLUGINS)}

[grpc]
  address = {_toml_str(str(self.socket))}

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = {_toml_str(str(self.root / "opt"))}

[{cri}]
  sandbox_image = {_toml_str(PAUSE_IMAGE)}
  restrict_oom_score_adj = true
  systemd_cgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {_toml_str(str(self.cni_conf_dir))}
    max_conf_num = 1
  [{cri}.containerd]
    snapshotter = {_toml_str(self.snapshotter)}
    default_runtime_name = "runc"
    [{runtimes}.runc]
      runtime_type = {_toml_str(RUNC)}
      [{runtimes}.runc.options]
        SystemdCgroup = false
"""
            # the carapace runtime as deploy/containerd-carapace.toml registers it
            + "\n"
            + SNIPPET.replace(_toml_str(CARAPACE_CONFIG_PATH), _toml_str(str(self.carapace_config)))
            # the same runtime, its pods started from VM templates
            + "\n"
            + SNIPPET.replace(_toml_str(CARAPACE_CONFIG_PATH), _toml_str(str(self.template_config)))
            .replace("runtimes.carapace]", f"runtimes.{TEMPLATE_HANDLER}]")
            .replace("runtimes.carapace.options]", f"runtimes.{TEMPLATE_HANDLER}.options]")
        )

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(p) for p in (*self.extra_path, VENV_BIN)]
        path += [p for p in env.get("PATH", "").split(":") if p and p not in path]
        for p in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
            if p not in path:
                path.append(p)
        env["PATH"] = ":".join(path)
        return env

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, *, timeout: float = 60.0, images: bool = True) -> ContainerdRig:
        if self.socket.exists() and self._ctr_ok():
            raise RigError(
                f"a containerd already answers on {self.socket}; stop it first "
                "(another test session may be running)"
            )
        self._remove_leftovers()
        self.root.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        ok, why = overlay_works(self.root)
        self.snapshotter = "overlayfs" if ok else "native"
        self.snapshotter_reason = why if ok else f"{why}; falling back to native"
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        (self.cni_conf_dir / "10-carapace-test.conflist").write_text(
            json.dumps(self.cni_conflist(), indent=2) + "\n"
        )
        self.config_path.write_text(self.config_text())
        self.carapace_config.write_text(
            "# carapace configuration of the test containerd's runtime: all defaults\n"
        )
        self.template_config.write_text(
            "# carapace configuration of the test containerd's runtime handler "
            f"{TEMPLATE_HANDLER}\n[factory]\ntemplate = true\n"
            f"template_dir = {_toml_str(str(self.template_dir))}\n"
        )
        self._ip_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        self._host_dirs_before = {p for p in host_dirs_containerd_may_create() if p.exists()}
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.environment(),
                start_new_session=True,  # Ctrl-C on pytest does not hit it first
            )
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
            if images:
                self.import_images()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.socket.exists() or not self._ctr_ok():
            if self.proc.poll() is not None:
                raise RigError(
                    f"containerd exited with {self.proc.returncode} before it answered; "
                    f"its log ends with:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RigError(f"containerd did not answer on {self.socket} in {timeout}s")
            time.sleep(0.1)
        # CRI reports its runtime and network conditions once it has loaded the CNI config
        cri = self.cri()
        try:
            from cri_api import StatusRequest

            while True:
                status = cri.runtime.Status(StatusRequest(), timeout=10)
                conditions = {c.type: c for c in status.status.conditions}
                if all(
                    t in conditions and conditions[t].status
                    for t in ("RuntimeReady", "NetworkReady")
                ):
                    break
                if time.monotonic() > deadline:
                    raise RigError(f"CRI not ready in {timeout}s: {status.status}")
                time.sleep(0.2)
        finally:
            cri.close()

    def _ctr_ok(self) -> bool:
        r = subprocess.run(
            ["ctr", "-a", str(self.socket), "version"], capture_output=True, timeout=10
        )
        return r.returncode == 0

    def import_images(self) -> None:
        """Build the test images and import them into every namespace of NAMESPACES."""
        argv = [sys.executable, str(BUILD_TEST_IMAGES), str(self.root.parent / "images")]
        argv += ["--import", str(self.socket), "--snapshotter", self.snapshotter]
        for ns in NAMESPACES:
            argv += ["--namespace", ns]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RigError(f"building/importing the test images failed:\n{r.stdout}{r.stderr}")

    def stop(self, timeout: float = 20.0) -> list[str]:
        """Stop containerd and remove every trace of it; the problems met, if any."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                problems += self.remove_all()
            except Exception as e:  # keep going: the process must still be stopped
                problems.append(f"removing containers failed: {e}")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"containerd did not exit {timeout}s after SIGTERM; killed")
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        problems += self._remove_leftovers()
        if self._host_dirs_before is not None:
            # only the ones that appeared since start() and are empty (rmdir refuses
            # a cgroup with members or children, and a non-empty directory)
            for d in host_dirs_containerd_may_create():
                if d not in self._host_dirs_before:
                    with contextlib.suppress(OSError):
                        d.rmdir()
            self._host_dirs_before = None
        if self._ip_forward is not None:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self._ip_forward + "\n")
            self._ip_forward = None
        return problems

    def _remove_leftovers(self) -> list[str]:
        """End our shims, unmount, delete the bridge and the directories."""
        problems: list[str] = []
        for pid in self.shim_pids():
            problems.append(f"shim {pid} outlived containerd; killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for target in mounts_under(self.root, self.state):
            r = subprocess.run(["umount", target], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)
                problems.append(f"umount {target}: {r.stderr.strip()} (detached lazily)")
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        for d in (self.root, self.state, self.cni_dir, self.template_dir):
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.state.parent.rmdir()  # /run/carapace-test when nothing else is in it
        return problems

    def shim_pids(self) -> list[int]:
        """Shim processes started by this containerd (their -address is our socket)."""
        pids = []
        for pid, argv in processes():
            if (
                any(b"containerd-shim" in a for a in argv[:2])  # a script: argv[1]
                and b"-address" in argv
                and str(self.socket).encode() in argv
            ):
                pids.append(pid)
        return pids

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clients -------------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        namespace: str = "default",
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCKET -n NAMESPACE ARGS``; raise with its stderr when it fails."""
        argv = ["ctr", "-a", str(self.socket), "-n", namespace, *args]
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=self.environment(),
        )
        if check and r.returncode != 0:
            raise RigError(
                f"{' '.join(argv)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def cri(self) -> CriClient:
        import grpc
        from cri_api import ImageServiceStub, RuntimeServiceStub

        channel = grpc.insecure_channel(f"unix://{self.socket}")
        return CriClient(RuntimeServiceStub(channel), ImageServiceStub(channel), channel)

    # -- inventory and cleanup (per test) ----------------------------------------------

    def inventory(self) -> dict[str, list[str]]:
        """What exists besides the images: tasks, containers, active snapshots, pods."""
        found: dict[str, list[str]] = {}
        for ns in NAMESPACES:
            tasks = self.ctr("tasks", "ls", "-q", namespace=ns).stdout.split()
            containers = self.ctr("containers", "ls", "-q", namespace=ns).stdout.split()
            active = [
                line.split()[0]
                for line in self.ctr(
                    "snapshots", "--snapshotter", self.snapshotter, "ls", namespace=ns
                ).stdout.splitlines()[1:]
                if line.split()[-1:] == ["Active"]
            ]
            found.update(
                {
                    f"{ns} tasks": tasks,
                    f"{ns} containers": containers,
                    f"{ns} active snapshots": active,
                }
            )
        from cri_api import ListContainersRequest, ListPodSandboxRequest

        cri = self.cri()
        try:
            pods = cri.runtime.ListPodSandbox(ListPodSandboxRequest(), timeout=30).items
            ctrs = cri.runtime.ListContainers(ListContainersRequest(), timeout=30).containers
            found["cri pods"] = [p.id for p in pods]
            found["cri containers"] = [c.id for c in ctrs]
        finally:
            cri.close()
        return {k: sorted(v) for k, v in found.items() if v}

    def remove_all(self) -> list[str]:
        """Delete every pod, container and task; a line per thing that had to go."""
        removed: list[str] = []
        from cri_api import (
            ListPodSandboxRequest,
            RemovePodSandboxRequest,
            StopPodSandboxRequest,
        )

        cri = self.cri()
        try:
            for pod in cri.runtime.ListPodSandbox(ListPodSandboxRequest(), timeout=30).items:
                cri.runtime.StopPodSandbox(StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
                cri.runtime.RemovePodSandbox(
                    RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60
                )
                removed.append(f"cri pod {pod.id}")
        finally:
            cri.close()
        for ns in NAMESPACES:
            for task in self.ctr("tasks", "ls", "-q", namespace=ns).stdout.split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, namespace=ns, check=False)
                self._wait_task_gone(ns, task)
                removed.append(f"{ns} task {task}")
            for c in self.ctr("containers", "ls", "-q", namespace=ns).stdout.split():
                self.ctr("containers", "delete", c, namespace=ns, check=False)
                removed.append(f"{ns} container {c}")
        return removed

    def _wait_task_gone(self, ns: str, task: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.ctr("tasks", "delete", task, namespace=ns, check=False)
            if r.returncode == 0 or "not found" in r.stderr:
                return
            time.sleep(0.2)

    @contextlib.contextmanager
    def running(self) -> Iterator[ContainerdRig]:
        self.start()
        try:
            yield self
        finally:
            problems = self.stop()
            if problems:
                print("containerd rig: " + "; ".join(problems), file=sys.stderr)
