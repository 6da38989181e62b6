"""openEuler's "Configuring Resources for a Secure Container" (seed 003): each of its
``docker run --runtime kata-runtime ...`` examples as a test with carapace.

Docker 20.10 passes no annotations to the runtime (``--annotation`` needs docker 24), so
the examples that use them run through podman 4.3, which passes ``--annotation k=v``
unchanged: the same flags, ``-tid --network none``, the same dockershim pod annotations
(``io.kubernetes.docker.type=podsandbox`` on the pause container,
``io.kubernetes.docker.type=container`` and ``io.kubernetes.sandbox.id=<pause id>`` on a
container joining its pod), ``podman rm -f -t 0`` for ``docker rm -f``. The examples
without annotations run through docker (--cpuset-cpus) or both docker and podman (the
host namespaces). podman reads ``--annotation`` as a CSV record, so the blkio_cgroup
JSON (which has commas) is given as one quoted field.

What this host changes in the examples: it has 2 CPUs, and carapace refuses a VM larger
than the host (the seed's NOTE: "The maximum number of CPUs that can be configured is
the number of CPUs ... that can run on the OS"), so ``sandbox_cpu=4`` and ``--cpus 4``
become min(4, host CPUs) and the 4 itself is checked to be refused; busybox has no
``lscpu``, so ``nproc`` and /sys/devices/system/cpu/online stand for it; the blkio
example's 400 bytes/s would also throttle QEMU's own page-ins (QEMU is in that cgroup),
so the same shape runs with workable values; docker's ``--files-limit`` is openEuler's
own docker option (neither docker 20.10 nor podman has it): carapace takes the files
limit from the annotation ``com.github.containers.virtcontainers.files_limit`` on the
pause container, given by ``--annotation`` or, for every container, by containers.conf
``[containers] annotations``.

The rig's carapace configuration enables hotplug and the blkio_cgroup and files_limit
annotations (carapace refuses both by default); the example that needs hotplug off gets
another configuration with ``podman --runtime-flag config=FILE``. The tests run only
with carapace (runc ignores these annotations).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from carapace import hostinfo
from carapace import resources as r

from ..conftest import qemu_pids
from .docker_rig import DockerRig
from .podman_rig import PodmanRig, carapace_missing

pytestmark = pytest.mark.vm

POD = "io.kubernetes.docker.type=podsandbox"
MEMBER = "io.kubernetes.docker.type=container"
SANDBOX_ID = "io.kubernetes.sandbox.id"
HOST_CPUS = len(os.sched_getaffinity(0))
KIB_PER_GIB = 1024 * 1024
PROBE = "nproc; cat /sys/devices/system/cpu/online; grep MemTotal /proc/meminfo"
#: the seed's four namespaces: docker/podman flag, the OCI name carapace's message uses
HOST_NAMESPACES = {"net": "network", "ipc": "ipc", "pid": "pid", "uts": "uts"}


@pytest.fixture
def started(podman_carapace: PodmanRig) -> Iterator[list[str]]:
    """Containers started by the test (``rm -f -t 0`` after it, members first, before
    the ``podman`` fixture checks that nothing was left)."""
    ids: list[str] = []
    yield ids
    for cid in reversed(ids):
        podman_carapace.podman("rm", "-f", "-t", "0", cid, check=False, timeout=600)


def run_tid(podman: PodmanRig, ids: list[str], *args: str) -> str:
    """The seed's ``docker run -tid --runtime kata-runtime --network none ARGS``."""
    cid = podman.podman(
        "run", "-tid", "--runtime", "carapace", "--network", "none", *args
    ).stdout.strip()  # fmt: skip
    ids.append(cid)
    return cid


def probe(podman: PodmanRig, cid: str) -> tuple[str, str, int]:
    """What ``docker exec CID lscpu; free`` shows: nproc, the online CPUs, MemTotal kB."""
    out = podman.podman("exec", cid, "sh", "-c", PROBE).stdout.split()
    return out[0], out[1], int(out[3])


def online(n: int) -> str:
    return "0" if n == 1 else f"0-{n - 1}"


def one_new_qemu(before: set[int]) -> int:
    new = qemu_pids() - before
    assert len(new) == 1, f"expected one VM for the pod, found QEMU processes {sorted(new)}"
    return new.pop()


# -- Limiting CPU Resources --------------------------------------------------------------------


def test_seed003_sandbox_cpu_annotation_sets_the_vms_cpus(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """docker run -tid ... --annotation io.kubernetes.docker.type=podsandbox --annotation
    com.github.containers.virtcontainers.sandbox_cpu=4 busybox sleep 999999; docker exec
    ... lscpu → CPU(s): 4 (here min(4, the host's CPUs))."""
    n = min(4, HOST_CPUS)
    cid = run_tid(
        podman_carapace, started, "--annotation", POD, "--annotation", f"{r.SANDBOX_CPU}={n}",
        podman_carapace.image, "sleep", "999999",
    )  # fmt: skip
    nproc, cpus, _ = probe(podman_carapace, cid)
    assert (nproc, cpus) == (str(n), online(n))


def test_seed003_sandbox_cpu_above_the_hosts_cpus_refused(podman_carapace: PodmanRig) -> None:
    """The seed's NOTE: "The maximum number of CPUs that can be configured is the number
    of CPUs (excluding isolated cores) that can run on the OS": more is refused, naming
    the annotation, and nothing is left (podman run --rm removes its container)."""
    too_many = str(max(4, HOST_CPUS + 1))
    res = podman_carapace.podman(
        "run", "--rm", "--runtime", "carapace", "--network", "none",
        "--annotation", POD, "--annotation", f"{r.SANDBOX_CPU}={too_many}",
        podman_carapace.image, "true", check=False,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert r.SANDBOX_CPU in res.stderr and too_many in res.stderr, res.stderr
    assert "the host's usable CPUs" in res.stderr, res.stderr


def test_seed003_sandbox_cpu_only_on_the_pause_container(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """ "This option can be configured only on the pause container": a container joining
    the pod with its own sandbox_cpu is refused, naming the annotation; the pod runs on."""
    pause = run_tid(
        podman_carapace, started, "--annotation", POD, podman_carapace.image, "sleep", "999999"
    )  # fmt: skip
    res = podman_carapace.podman(
        "run", "--rm", "--runtime", "carapace", "--network", "none",
        "--annotation", MEMBER, "--annotation", f"{SANDBOX_ID}={pause}",
        "--annotation", f"{r.SANDBOX_CPU}=2", podman_carapace.image, "true", check=False,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert r.SANDBOX_CPU in res.stderr and "pause" in res.stderr, res.stderr
    assert probe(podman_carapace, pause)[0] == "1"


def test_seed003_cpu_hotplug_cpus_4_and_back_to_1_after_rm(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """Configure CPU hot swap: a pause container (1 vCPU by default); a container of the
    same pod with --cpus 4 (here min(4, the host's CPUs)) → the VM has that many CPUs;
    docker rm -f of it → 1 CPU again, seen from the pause container."""
    n = min(4, HOST_CPUS)
    qemus = qemu_pids()
    pause = run_tid(
        podman_carapace, started, "--annotation", POD, podman_carapace.image, "sleep", "999999"
    )  # fmt: skip
    assert probe(podman_carapace, pause)[:2] == ("1", "0")
    big = run_tid(
        podman_carapace, started, "--cpus", str(n),
        "--annotation", MEMBER, "--annotation", f"{SANDBOX_ID}={pause}",
        podman_carapace.image, "sleep", "999999",
    )  # fmt: skip
    assert probe(podman_carapace, big)[:2] == (str(n), online(n))
    assert probe(podman_carapace, pause)[:2] == (str(n), online(n))  # one VM
    one_new_qemu(qemus)
    podman_carapace.podman("rm", "-f", "-t", "0", big)
    started.remove(big)
    assert probe(podman_carapace, pause)[:2] == ("1", "0")


def test_seed003_cpus_above_the_hosts_cpus_refused(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """--cpus 4 in a pod on a host with fewer CPUs: the VM cannot grow that far, the
    container is refused naming the vCPUs it needs; the pod keeps its 1 vCPU."""
    if HOST_CPUS >= 4:
        pytest.skip("the host has 4 CPUs or more: --cpus 4 fits")
    pause = run_tid(
        podman_carapace, started, "--annotation", POD, podman_carapace.image, "sleep", "999999"
    )  # fmt: skip
    res = podman_carapace.podman(
        "run", "--rm", "--runtime", "carapace", "--network", "none", "--cpus", "4",
        "--annotation", MEMBER, "--annotation", f"{SANDBOX_ID}={pause}",
        podman_carapace.image, "true", check=False,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert "need 4 vCPUs" in res.stderr, res.stderr
    assert probe(podman_carapace, pause)[:2] == ("1", "0")


# -- Limiting Memory Resources -----------------------------------------------------------------


def test_seed003_sandbox_mem_annotation_sets_the_vms_memory(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """docker run -tid ... --annotation ...podsandbox --annotation
    com.github.containers.virtcontainers.sandbox_mem=4G busybox sleep 999999; docker exec
    ... free -m → total 3950 (about 4G: the guest kernel keeps some)."""
    cid = run_tid(
        podman_carapace, started, "--annotation", POD, "--annotation", f"{r.SANDBOX_MEM}=4G",
        podman_carapace.image, "sleep", "999999",
    )  # fmt: skip
    mem = probe(podman_carapace, cid)[2]
    assert 0.9 * 4 * KIB_PER_GIB < mem <= 4 * KIB_PER_GIB


def test_seed003_memory_hot_add_4g_stays_after_rm(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """Configure memory hot add: a pause container (1G by default); a container of the
    same pod with -m 4G → about 4G (3G hot-added: the pause container's 1G is shared);
    docker rm -f of it → the memory is still 4G ("memory resources support hot add only")."""
    pause = run_tid(
        podman_carapace, started, "--annotation", POD, podman_carapace.image, "sleep", "999999"
    )  # fmt: skip
    mem0 = probe(podman_carapace, pause)[2]
    assert 0.8 * KIB_PER_GIB < mem0 <= KIB_PER_GIB  # the seed's "983" MiB of 1G
    big = run_tid(
        podman_carapace, started, "-m", "4G",
        "--annotation", MEMBER, "--annotation", f"{SANDBOX_ID}={pause}",
        podman_carapace.image, "sleep", "999999",
    )  # fmt: skip
    mem = probe(podman_carapace, big)[2]
    assert mem - mem0 == 3 * KIB_PER_GIB
    podman_carapace.podman("rm", "-f", "-t", "0", big)
    started.remove(big)
    assert probe(podman_carapace, pause)[2] == mem


def test_seed003_memory_above_the_vm_refused_without_hotplug(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """ "When memory hot swap is disabled, the value of -m must be less than or equal to
    the memory size allocated when the lightweight VM is started": with a configuration
    whose enable_cpu_memory_hotplug is false (given by ``podman --runtime-flag
    config=FILE`` to both creates), a 2G container in a 1G pod is refused, naming -m and
    the VM's memory; the pod runs on."""
    config = podman_carapace.base / "carapace-no-hotplug.toml"
    config.write_text("[hypervisor]\nenable_cpu_memory_hotplug = false\n")
    flag = [f"config={config}"]
    pause = podman_carapace.podman(
        "run", "-tid", "--runtime", "carapace", "--network", "none", "--annotation", POD,
        podman_carapace.image, "sleep", "999999", runtime_flags=flag,
    ).stdout.strip()  # fmt: skip
    started.append(pause)
    res = podman_carapace.podman(
        "run", "--rm", "--runtime", "carapace", "--network", "none", "-m", "2G",
        "--annotation", MEMBER, "--annotation", f"{SANDBOX_ID}={pause}",
        podman_carapace.image, "true", runtime_flags=flag, check=False,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert "--memory 2G" in res.stderr and "memory hotplug is off" in res.stderr, res.stderr
    assert probe(podman_carapace, pause)[0] == "1"


@pytest.mark.parametrize(
    ("annotation", "needle"),
    [(f"{r.SANDBOX_MEM}=512m", "1G to 256G"), (f"{r.SANDBOX_CPU}=0.25", "0.5 to")],
    ids=["sandbox_mem-below-1G", "sandbox_cpu-below-0.5"],
)
def test_seed003_sandbox_size_below_the_minimum_refused(
    podman_carapace: PodmanRig, annotation: str, needle: str
) -> None:
    """ "The minimum memory size of a pod in a secure container is 1 GB"; "The minimum
    number of CPUs is 0.5": less is refused, naming the annotation and what is accepted,
    before any VM exists."""
    qemus = qemu_pids()
    res = podman_carapace.podman(
        "run", "--rm", "--runtime", "carapace", "--network", "none", "--annotation", POD,
        "--annotation", annotation, podman_carapace.image, "true", check=False,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert annotation.split("=")[0] in res.stderr and needle in res.stderr, res.stderr
    assert qemu_pids() - qemus == set()


# -- Limiting Block I/O Resources --------------------------------------------------------------


def first_disk() -> str:
    for name in ("vda", "sda", "nvme0n1", "xvda"):
        if Path(f"/dev/{name}").exists():
            return f"/dev/{name}"
    pytest.skip("no whole-disk block device on this host")


def cgroup_of(pid: int, controller: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    raise AssertionError(f"{controller} not in /proc/{pid}/cgroup")


def csv_field(text: str) -> str:
    """podman reads --annotation as a comma-separated list (a CSV record): a value with
    commas (JSON) is given as one quoted field."""
    return '"' + text.replace('"', '""') + '"'


def test_seed003_blkio_cgroup_annotation_limits_the_vm(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """docker run -tid ... --annotation com.github.containers.virtcontainers.blkio_cgroup=
    '{"blkiocgroup":[{"path":"/dev/sda","limits":[throttle_read_bps, throttle_write_bps,
    throttle_read_iops, throttle_write_iops]},{"limits":[{"type":"blkio_weight",...}]}]}'
    busybox sleep 999999 → the VM's host cgroup has those throttles for the disk."""
    disk = first_disk()
    st = os.stat(disk)
    dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    bps = 400 << 20
    value = json.dumps(
        {
            "blkiocgroup": [
                {
                    "path": disk,
                    "limits": [
                        {"type": "throttle_read_bps", "value": bps},
                        {"type": "throttle_write_bps", "value": bps},
                        {"type": "throttle_read_iops", "value": 70000},
                        {"type": "throttle_write_iops", "value": 69999},
                    ],
                },
                {"limits": [{"type": "blkio_weight", "value": 78}]},
            ]
        }
    )
    qemus = qemu_pids()
    cid = run_tid(
        podman_carapace, started, "--annotation", csv_field(f"{r.BLKIO_CGROUP}={value}"),
        podman_carapace.image, "sleep", "999999",
    )  # fmt: skip
    cg = cgroup_of(one_new_qemu(qemus), "blkio")
    assert (cg / "blkio.throttle.read_bps_device").read_text().split() == [dev, str(bps)]
    assert (cg / "blkio.throttle.write_bps_device").read_text().split() == [dev, str(bps)]
    assert (cg / "blkio.throttle.read_iops_device").read_text().split() == [dev, "70000"]
    assert (cg / "blkio.throttle.write_iops_device").read_text().split() == [dev, "69999"]
    assert podman_carapace.podman("exec", cid, "true").returncode == 0


# -- Limiting File Descriptor Resources --------------------------------------------------------


def nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no Max open files line in /proc/{pid}/limits")


def expected_files_limit(value: str) -> int:
    """The seed's rules: below 1024 (not 0) → 1024; 0 → fs.file-max / 400; never above
    what the host allows."""
    n = int(value)
    n = hostinfo.file_max() // 400 if n == 0 else n
    return min(max(n, 1024), hostinfo.nofile_cap())


@pytest.mark.parametrize("value", ["100", "0", "4096"])
def test_seed003_files_limit_sets_qemus_open_files(
    podman_carapace: PodmanRig, started: list[str], value: str
) -> None:
    """docker run -tid ... --annotation ...podsandbox --files-limit <max-open-files>
    busybox bash: docker's --files-limit is openEuler's own option; carapace takes the
    files limit from the pause container's files_limit annotation (podman --annotation):
    QEMU's RLIMIT_NOFILE (soft and hard) is 1024 for 100, fs.file-max / 400 for 0."""
    qemus = qemu_pids()
    cid = run_tid(
        podman_carapace, started, "--annotation", POD,
        "--annotation", f"{r.FILES_LIMIT}={value}", podman_carapace.image, "sh",
    )  # fmt: skip
    want = expected_files_limit(value)
    assert nofile(one_new_qemu(qemus)) == (want, want)
    assert podman_carapace.podman("exec", cid, "true").returncode == 0


def test_seed003_files_limit_from_containers_conf(
    podman_carapace: PodmanRig, started: list[str]
) -> None:
    """The files limit as a setting of the engine rather than of each command: a
    containers.conf with ``[containers] annotations = ["...files_limit=2048"]`` gives it
    to every container podman creates with it."""
    conf = podman_carapace.write_containers_conf(
        "containers-files-limit.conf", [f"{r.FILES_LIMIT}=2048"]
    )
    qemus = qemu_pids()
    res = podman_carapace.podman(
        "run", "-tid", "--runtime", "carapace", "--network", "none", "--annotation", POD,
        podman_carapace.image, "sh", containers_conf=conf,
    )  # fmt: skip
    started.append(res.stdout.strip())
    assert nofile(one_new_qemu(qemus)) == (2048, 2048)


# -- Sharing Resources: --net host, --ipc host, --pid host, --uts host -----------------------


def refusal_text(flag: str, namespace: str) -> str:
    return f"host's {namespace} namespace (--{flag} host)"


@pytest.mark.parametrize("flag", list(HOST_NAMESPACES))
def test_seed003_host_namespaces_not_supported_through_podman(
    podman_carapace: PodmanRig, flag: str
) -> None:
    """ "--net host, --ipc host, --pid host, and --uts host are not supported during
    startup": refused, the message naming the namespace and the flag; no VM, no
    container left (the fixtures check)."""
    qemus = qemu_pids()
    res = podman_carapace.podman(
        "run", "--rm", "--runtime", "carapace", f"--{flag}", "host",
        podman_carapace.image, "true", check=False,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert refusal_text(flag, HOST_NAMESPACES[flag]) in res.stderr, res.stderr
    assert qemu_pids() - qemus == set()


@pytest.mark.parametrize("flag", list(HOST_NAMESPACES))
def test_seed003_host_namespaces_not_supported_through_docker(docker: DockerRig, flag: str) -> None:
    """The same through docker 20.10 (these examples need no annotation)."""
    if why := carapace_missing():
        pytest.skip(why)
    qemus = qemu_pids()
    network = [] if flag == "net" else ["--network", "none"]
    res = docker.docker(
        "run", "--rm", "--runtime", "carapace", *network, f"--{flag}", "host",
        docker.image, "true", check=False,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert refusal_text(flag, HOST_NAMESPACES[flag]) in res.stderr, res.stderr
    assert qemu_pids() - qemus == set()


def test_seed003_cpuset_cpus_beyond_the_vm_refused_through_docker(docker: DockerRig) -> None:
    """The seed's NOTE on --cpuset-cpus: "the CPU ID cannot exceed the number of CPUs in
    the lightweight VM ... minus 1 (The CPU ID in the lightweight VM starts from 0)": a
    1-vCPU VM takes --cpuset-cpus 0 and refuses 1, naming the option and the VM's vCPUs."""
    if why := carapace_missing():
        pytest.skip(why)
    if HOST_CPUS < 2:
        pytest.skip("needs 2 host CPUs (docker checks --cpuset-cpus against the host)")
    run = ("run", "--rm", "--runtime", "carapace", "--network", "none")
    ok = docker.docker(*run, "--cpuset-cpus", "0", docker.image, "nproc")
    assert ok.stdout.strip() == "1"
    res = docker.docker(*run, "--cpuset-cpus", "1", docker.image, "true", check=False)
    assert res.returncode != 0, res.stdout
    assert "--cpuset-cpus names CPU 1" in res.stderr and "1 vCPU" in res.stderr, res.stderr
