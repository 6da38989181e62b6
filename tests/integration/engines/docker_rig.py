"""A private dockerd for the tests (Docker 20.10: /usr/sbin/dockerd, CLI /usr/bin/docker).

``DockerRig().start()`` makes a fresh directory ``/tmp/engine-docker-XXXX`` holding the
daemon's data root, exec root, pid file, socket, daemon.json and log, starts dockerd
with the flags this host needs (no iptables, no default bridge, vfs storage, cgroupfs
driver; see shared/DESIGN.md §5) and the runtime ``carapace`` registered in daemon.json
(``path`` = .venv/bin/carapace-runtime, ``runtimeArgs`` = ``--config <the rig's carapace
configuration>``; dockerd wraps path and arguments in a script of its own), waits for
``docker version`` and imports the busybox test image (images.py).

``stop()`` removes every container and user-defined network, stops dockerd (which stops
the containerd it started), kills whatever of its containerd and shims outlived it,
unmounts everything under its directory (``<exec-root>/netns/default`` stays mounted
otherwise), removes the directory and the ``docker`` cgroups it created, and restores
``net.ipv4.ip_forward``.

Nothing here touches a system docker (/var/lib/docker, /run/docker.sock).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from carapace.linux import mounts_under

from ..procs import processes
from .hostparts import cgroup_parents, rmdir_tree
from .images import IMAGE_REF, busybox_tar, import_into

REPO = Path(__file__).resolve().parents[3]
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # the 20.10 CLI matching dockerd (/usr/local/bin/docker is 28.x)
CARAPACE_RUNTIME = REPO / ".venv" / "bin" / "carapace-runtime"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "docker"  # dockerd's default --cgroup-parent with the cgroupfs driver
#: networks dockerd always has (with --bridge=none there is no "bridge")
BUILTIN_NETWORKS = frozenset({"host", "none", "bridge"})
#: the carapace configuration the rig's runtime gets (``--config``): all defaults
CARAPACE_CONFIG_TEXT = "# carapace configuration of the test dockerd's runtime: defaults\n"

DAEMON_FLAGS = (
    "--iptables=false",
    "--ip-masq=false",
    "--bridge=none",
    "--storage-driver=vfs",
    "--exec-opt",
    "native.cgroupdriver=cgroupfs",
)


class DockerRigError(RuntimeError):
    """The test dockerd could not be started, used or stopped cleanly."""


class DockerCommandError(DockerRigError):
    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout.strip()}\n"
            f"stderr: {result.stderr.strip()}"
        )


class DockerRig:
    """One private dockerd; ``docker(...)`` runs the matching CLI against it."""

    def __init__(
        self,
        runtimes: dict[str, dict[str, Any]] | None = None,
        carapace_config_text: str = CARAPACE_CONFIG_TEXT,
        exec_root: Path | None = None,
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="engine-docker-"))
        self.data_root = self.base / "data"
        #: dockerd's --exec-root (default <base>/exec); one given must not exist yet
        self.exec_root = exec_root or self.base / "exec"
        self.socket = self.base / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.pidfile = self.base / "docker.pid"
        self.daemon_json = self.base / "daemon.json"
        self.log_path = self.base / "dockerd.log"
        self.carapace_config = self.base / "carapace-configuration.toml"
        self.carapace_config_text = carapace_config_text
        self.runtimes: dict[str, dict[str, Any]] = {
            "carapace": {
                "path": str(CARAPACE_RUNTIME),
                "runtimeArgs": ["--config", str(self.carapace_config)],
            },
            **(runtimes or {}),
        }
        self.image = IMAGE_REF
        self.proc: subprocess.Popen[bytes] | None = None
        self._ip_forward: str | None = None
        self._cgroups_before: set[Path] = set()

    # -- the CLI ------------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        return [DOCKER, "-H", self.host, *args]

    def docker(
        self,
        *args: str,
        timeout: float = 300.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``docker -H unix://<ours> ARGS``; output captured as text. With ``check``, a
        non-zero exit raises DockerCommandError (which holds the result)."""
        argv = self.argv(*args)
        result = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise DockerCommandError(argv, result)
        return result

    # -- lifecycle ----------------------------------------------------------------------

    def daemon_config(self) -> dict[str, Any]:
        return {"runtimes": self.runtimes}

    def start(self, timeout: float = 60.0) -> DockerRig:
        self.carapace_config.write_text(self.carapace_config_text)
        self.daemon_json.write_text(json.dumps(self.daemon_config(), indent=2) + "\n")
        self._ip_forward = IP_FORWARD.read_text().strip()
        self._cgroups_before = {c for c in cgroup_parents(CGROUP_PARENT) if c.exists()}
        argv = [
            DOCKERD,
            "--config-file", str(self.daemon_json),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "-H", self.host,
            *DAEMON_FLAGS,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # Ctrl-C on pytest does not hit it first
            )
        try:
            self._wait_ready(timeout)
            import_into(self.argv(), busybox_tar(self.base), self.image)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DockerRigError(
                    f"dockerd exited with {self.proc.returncode} before it answered; "
                    f"its log ends with:\n{self.log_tail()}"
                )
            if self.socket.exists():
                r = self.docker("version", timeout=10, check=False)
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise DockerRigError(
                    f"dockerd did not answer on {self.socket} in {timeout}s; its log ends "
                    f"with:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def inventory(self) -> list[str]:
        """What the tests may leave: containers (any state) and user-defined networks."""
        left = []
        ps = self.docker("ps", "-a", "--format", "{{.ID}} {{.Names}} {{.Status}}", timeout=60)
        left += [f"container {line}" for line in ps.stdout.splitlines() if line.strip()]
        nets = self.docker("network", "ls", "--format", "{{.Name}}", timeout=60)
        left += [f"network {n}" for n in nets.stdout.split() if n not in BUILTIN_NETWORKS]
        return left

    def remove_all(self) -> list[str]:
        """Remove every container and user-defined network; what was removed."""
        left = self.inventory()
        ids = self.docker("ps", "-aq", timeout=60).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=600, check=False)
        nets = [x.split(" ", 1)[1] for x in left if x.startswith("network ")]
        if nets:
            self.docker("network", "rm", *nets, timeout=120, check=False)
        return left

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Stop dockerd and remove every trace of it; the problems met, if any."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                left = self.remove_all()
                if left:
                    problems.append(f"removed at stop: {left}")
            except Exception as e:  # keep going: the daemon must still be stopped
                problems.append(f"removing containers failed: {e}")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"dockerd did not exit {timeout}s after SIGTERM; killed")
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        problems += self._kill_children()
        for directory in (self.exec_root, self.base):
            for target in mounts_under(str(directory)):
                r = subprocess.run(["umount", target], capture_output=True, text=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", target], capture_output=True)
                    problems.append(f"umount {target}: {r.stderr.strip()} (detached lazily)")
            shutil.rmtree(directory, ignore_errors=True)
            if directory.exists():
                problems.append(f"could not remove {directory}")
        for cgroup in cgroup_parents(CGROUP_PARENT) - self._cgroups_before:
            if cgroup.exists():
                rmdir_tree(cgroup)
                if cgroup.exists():
                    problems.append(f"cgroup {cgroup} still has members or children")
        if self._ip_forward is not None:
            IP_FORWARD.write_text(self._ip_forward + "\n")
            self._ip_forward = None
        return problems

    def own_processes(self) -> list[tuple[int, bytes]]:
        """(pid, argv[0]) of the processes naming our directories in their command line:
        our containerd, its shims, the runtimes and carapace's sandbox services (their
        socket is under --root, in the exec root)."""
        marks = (str(self.base).encode(), str(self.exec_root).encode())
        return [
            (pid, argv[0])
            for pid, argv in processes()
            if pid != os.getpid() and any(m in a for a in argv for m in marks)
        ]

    def _kill_children(self) -> list[str]:
        """After dockerd exited: wait for its containerd to go; SIGTERM what is left (a
        carapace sandbox service destroys its VM on SIGTERM), then SIGKILL."""
        problems = []
        deadline = time.monotonic() + 10  # containerd exits shortly after dockerd
        while (left := self.own_processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, name in left:
                problems.append(
                    f"{name.decode(errors='replace')} (pid {pid}) outlived dockerd; {sig.name}"
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 30
            while (left := self.own_processes()) and time.monotonic() < deadline:
                time.sleep(0.2)
        return problems

    def runtime_logs(self, lines: int = 20) -> str:
        """The end of every live bundle's runtime log (``--log <bundle>/log.json``)."""
        tasks = self.exec_root / "containerd" / "daemon" / "io.containerd.runtime.v2.task"
        out = []
        for log in sorted(tasks.glob("*/*/log.json")):
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"== {log}\n" + "\n".join(tail))
        return "\n".join(out) or "(no runtime log)"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- fixtures (imported by conftest.py) ------------------------------------------------

RUNTIMES = ("runc", "carapace")


@pytest.fixture(scope="session")
def dockerd() -> Iterator[DockerRig]:
    """The session's private dockerd, with the busybox test image imported."""
    if os.geteuid() != 0:
        pytest.skip("the test dockerd needs root")
    for binary in (DOCKERD, DOCKER):
        if not Path(binary).is_file():
            pytest.skip(f"{binary} not installed (Debian's docker.io)")
    rig = DockerRig().start()
    try:
        yield rig
    finally:
        problems = rig.stop()
    assert not problems, f"stopping the test dockerd: {problems}"


@pytest.fixture
def docker(dockerd: DockerRig, request: pytest.FixtureRequest) -> Iterator[DockerRig]:
    """The session's dockerd; after the test, no container, user-defined network or
    container network namespace of the test may be left (they are removed, and the test
    fails)."""
    yield dockerd
    left = dockerd.inventory()
    if left:
        dockerd.remove_all()
    netns_dir = str(dockerd.exec_root / "netns")
    netns = [m for m in mounts_under(netns_dir) if not m.endswith("/default")]
    assert not left and not netns, (
        f"{request.node.name} left behind in dockerd: {left}; network namespaces: {netns}"
    )


@pytest.fixture(params=RUNTIMES)
def docker_runtime(request: pytest.FixtureRequest) -> str:
    """Each docker test runs with runc (the baseline that proves the test) and with
    carapace (skipped while .venv/bin/carapace-runtime is not installed)."""
    name: str = request.param
    if name == "carapace" and not CARAPACE_RUNTIME.exists():
        pytest.skip(
            f"{CARAPACE_RUNTIME} does not exist: the carapace OCI runtime CLI is not installed"
        )
    return name
