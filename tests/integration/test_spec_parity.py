"""The OCI spec applied inside a carapace container as runc applies it on the host.

One bundle (a busybox rootfs) sets every field a container can see: hostname, env,
cwd, user/groups/umask, rlimits, the five capability sets, noNewPrivileges, sysctls,
mounts and their options, a read-only root, masked and read-only paths, device nodes
and device cgroup rules, oomScoreAdj. A probe script prints the container's view of
each; the bundle runs once with the host's runc (``runc run``) and once with carapace
(``carapace run --bundle``, and ``carapace-runtime run`` once the OCI runtime CLI is
ready), and the views are compared field by field.

What legitimately differs, and is normalized (see ``normalize``):

- mountinfo's ids, device numbers, mount sources and super-block options: a VM has its
  own devices and filesystems. A bind of a host directory is a virtio-fs bind in the
  guest (its file system type and super options are the share's), so for binds only the
  per-mount options are compared; for the pseudo filesystems the type and the options
  the spec sets (size, mode) are compared too.
- /sys/fs/cgroup: this host is cgroup v1 (runc mounts a rw tmpfs there holding the v1
  hierarchies, each read-only), the guest is cgroup v2 (one read-only cgroup2 mount):
  only nosuid/nodev/noexec/atime of the top mount are compared.
- a default masked path the kernel does not have (e.g. /proc/timer_stats, /proc/acpi
  without ACPI): both runtimes skip a path that does not exist; a path present under
  one kernel and absent under the other (two kernels: the host's and the guest's) is
  not compared. Masked paths of the rootfs are always compared.
- oom_score_adj: this host cannot lower it (no CAP_SYS_RESOURCE), so the bundle raises it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from carapace.oci.spec import DEFAULT_CAPABILITIES, DEFAULT_PATH, default_spec

from .conftest import CARAPACE, REPO

RUNC = shutil.which("runc") or "/usr/bin/runc"
CARAPACE_RUNTIME = str(REPO / ".venv" / "bin" / "carapace-runtime")
BUSYBOX = Path("/bin/busybox")

UID, GID, GROUPS = 1000, 1000, [10, 20]
UMASK = 0o027
#: Every rlimit, each within this host's hard limits (runc cannot raise a hard limit
#: without CAP_SYS_RESOURCE; nofile's hard cap is 20000 here): a limit left out would
#: be the caller's under runc and the guest's under carapace.
RLIMITS = {
    "RLIMIT_AS": (1 << 40, 1 << 41),
    "RLIMIT_CORE": (0, 1 << 20),
    "RLIMIT_CPU": (3600, 7200),
    "RLIMIT_DATA": (1 << 40, 1 << 41),
    "RLIMIT_FSIZE": (1 << 30, 1 << 31),
    "RLIMIT_LOCKS": (1000, 2000),
    "RLIMIT_MEMLOCK": (1 << 20, 1 << 22),
    "RLIMIT_MSGQUEUE": (409600, 819200),
    "RLIMIT_NICE": (0, 0),
    "RLIMIT_NOFILE": (1000, 2000),
    "RLIMIT_NPROC": (500, 600),
    "RLIMIT_RSS": (1 << 30, 1 << 31),
    "RLIMIT_RTPRIO": (0, 0),
    "RLIMIT_RTTIME": (1000000, 2000000),
    "RLIMIT_SIGPENDING": (1000, 2000),
    "RLIMIT_STACK": (8 << 20, 16 << 20),
}
BOUNDING = [*DEFAULT_CAPABILITIES, "CAP_NET_ADMIN", "CAP_SYS_PTRACE", "CAP_IPC_LOCK"]
PERMITTED = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_SETUID"]
EFFECTIVE = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_ADMIN"]
INHERITABLE = ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SYS_PTRACE"]
AMBIENT = ["CAP_KILL", "CAP_NET_BIND_SERVICE"]
SYSCTL = {
    "kernel.shmmax": "123456789",
    "kernel.msgmax": "12345",
    "kernel.domainname": "parity.example",
    "net.ipv4.ip_unprivileged_port_start": "100",
}
EXTRA_MOUNTS = [
    {
        "destination": "/scratch",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "noexec", "nodev", "size=2m", "mode=1777"],
    },
    {"destination": "/ro-tmp", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "size=1m"]},
    {
        "destination": "/made-ro",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "mode=0777", "size=1m"],
    },
]
MASKED = ["/etc/secret", "/masked-dir"]
READONLY = ["/made-ro"]
#: linux.devices: (path, type, major, minor, mode, uid, gid), and the cgroup rules. runc
#: allows its default devices (null, zero, full, random, urandom, tty, ptmx, tun, pts)
#: whatever the rules say, so the rules are seen on others: /dev/kmsg (write only: a
#: write is let through, a read is not) and /dev/port (denied).
DEVICES = [
    ("/dev/mynull", "c", 1, 3, 0o666, 0, 0),
    ("/dev/myzero", "c", 1, 5, 0o640, UID, 10),
    ("/dev/mykmsg", "c", 1, 11, 0o666, 0, 0),
    ("/dev/noport", "c", 1, 4, 0o666, 0, 0),
]
DEVICE_RULES = [
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "w"},
]
OOM_SCORE_ADJ = 500
ENV = [DEFAULT_PATH, "TERM=dumb", "PARITY=yes", "EMPTY=", "SPACED=a b  c"]
HOSTNAME = "parity-host"
CWD = "/home/user"

PROBE = r"""
section() { echo "== $1"; }
section uid; id -u
section gid; id -g
section groups; id -G
section umask; umask
section hostname; hostname
section pwd; pwd
section env; env | grep -v '^SHLVL=' | sort
section limits; cat /proc/self/limits
section status; grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status
section oom_score_adj; cat /proc/self/oom_score_adj
for s in $SYSCTLS; do section "sysctl $s"; cat "/proc/sys/$(echo "$s" | tr . /)"; done
section mountinfo; cat /proc/self/mountinfo
for p in $MASKED; do
  section "masked $p"
  if [ -d "$p" ]; then echo "dir entries: $(ls -A "$p" | wc -l)"
  elif [ -e "$p" ]; then echo "file bytes: $(cat "$p" 2>&1 | wc -c)"
  else echo absent; fi
done
for p in $READONLY; do
  section "readonly $p"
  if [ ! -e "$p" ]; then echo absent
  elif [ -d "$p" ]; then (mkdir "$p/.probe" && echo written) 2>&1 | sed 's/^.*: //'
  else (echo x > "$p" && echo written) 2>&1 | sed 's/^.*: //'; fi
done
for d in $DEVICES; do
  section "device $d"
  stat -c '%F %t:%T %a %u:%g' "$d" 2>&1
  (head -c 1 "$d" > /dev/null && echo read ok) 2>&1 | sed 's/^.*: //'
  (echo "<6>spec parity probe" > "$d" && echo write ok) 2>&1 | sed 's/^.*: //'
done
section root-write; (touch /rootfs-probe && echo ok) 2>&1 | sed 's/^.*: //'
section scratch-exec
(cp /bin/busybox /scratch/bb && /scratch/bb true && echo ran) 2>&1 | sed 's/^.*: //'
section end
"""


# -- the bundle ---------------------------------------------------------------------------


def make_rootfs(rootfs: Path) -> None:
    """A busybox rootfs (from the host's busybox-static) with the probe's files."""
    for d in ("bin", "etc", "home/user", "tmp", "dev", "proc", "sys", "scratch", "ro-tmp",
              "made-ro", "masked-dir/sub", "vol"):  # fmt: skip
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chown(rootfs / "home/user", UID, GID)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    )
    (rootfs / "etc/group").write_text("root:x:0:\nwheel:x:10:\ndialout:x:20:\nuser:x:1000:\n")
    (rootfs / "etc/secret").write_text("a secret the container must not read\n")
    (rootfs / "masked-dir/file").write_text("hidden\n")
    (rootfs / "probe.sh").write_text(PROBE)


def make_spec(volume: Path) -> dict[str, Any]:
    spec = default_spec(["/bin/sh", "/probe.sh"], cwd=CWD, hostname=HOSTNAME)
    process = spec["process"]
    process["env"] = [
        *ENV,
        f"SYSCTLS={' '.join(SYSCTL)}",
        f"MASKED={' '.join(spec['linux']['maskedPaths'] + MASKED)}",
        f"READONLY={' '.join(spec['linux']['readonlyPaths'] + READONLY)}",
        f"DEVICES={' '.join(d[0] for d in DEVICES)}",
    ]
    process["user"] = {"uid": UID, "gid": GID, "additionalGids": GROUPS, "umask": UMASK}
    process["rlimits"] = [{"type": k, "soft": s, "hard": h} for k, (s, h) in RLIMITS.items()]
    process["capabilities"] = {
        "bounding": BOUNDING,
        "permitted": PERMITTED,
        "effective": EFFECTIVE,
        "inheritable": INHERITABLE,
        "ambient": AMBIENT,
    }
    process["noNewPrivileges"] = True
    process["oomScoreAdj"] = OOM_SCORE_ADJ
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["mounts"] += [
        *EXTRA_MOUNTS,
        {
            "destination": "/vol",
            "type": "bind",
            "source": str(volume),
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        },
    ]
    linux = spec["linux"]
    linux["maskedPaths"] += MASKED
    linux["readonlyPaths"] += READONLY
    linux["sysctl"] = dict(SYSCTL)
    linux["devices"] = [
        {"path": p, "type": t, "major": ma, "minor": mi, "fileMode": mode, "uid": u, "gid": g}
        for p, t, ma, mi, mode, u, g in DEVICES
    ]
    linux["resources"] = {"devices": DEVICE_RULES}
    return spec


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("parity")
    volume = base / "volume"
    volume.mkdir()
    (volume / "data").write_text("from the host\n")
    b = base / "bundle"
    make_rootfs(b / "rootfs")
    (b / "config.json").write_text(json.dumps(make_spec(volume), indent=1))
    return b


# -- the views ----------------------------------------------------------------------------


def sections(output: str) -> dict[str, str]:
    """The probe's output by section."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("== "):
            current = out.setdefault(line[3:], [])
        elif current is not None:
            current.append(line)
    return {k: "\n".join(v) for k, v in out.items()}


SPEC_OPTIONS = re.compile(r"^(size|mode|ptmxmode|nr_inodes)=")


def mounts_view(mountinfo: str, destinations: list[str], binds: set[str]) -> dict[str, str]:
    """For each destination (and /): the top mount's per-mount options, and, but for
    binds and /sys/fs/cgroup, its type and the super options the spec sets."""
    top: dict[str, list[str]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        top[fields[4]] = [
            fields[5],
            fields[sep + 1],
            fields[sep + 3] if len(fields) > sep + 3 else "",
        ]
    view = {}
    for dest in ["/", *destinations]:
        if dest not in top:
            view[dest] = "absent"
            continue
        opts, fstype, sopts = top[dest]
        if dest == "/sys/fs/cgroup":  # v1 here: a rw tmpfs of ro hierarchies; v2: ro
            view[dest] = ",".join(o for o in opts.split(",") if o not in ("ro", "rw"))
        elif dest in binds or dest == "/":
            view[dest] = opts
        else:
            kept = sorted(o for o in sopts.split(",") if SPEC_OPTIONS.match(o))
            view[dest] = f"{opts} {fstype} {','.join(kept)}"
    return view


def limits_view(text: str) -> dict[str, str]:
    return {line[:26].strip(): " ".join(line[26:].split()) for line in text.splitlines()[1:]}


def normalize(raw: dict[str, str], spec: dict[str, Any]) -> dict[str, str]:
    """The view two runtimes on two kernels must agree on (see the module docstring)."""
    view = {k: v for k, v in raw.items() if k != "mountinfo" and not k.startswith("limits")}
    for name, value in limits_view(raw.get("limits", "")).items():
        view[f"limit {name}"] = value
    dests = [m["destination"] for m in spec["mounts"]] + spec["linux"]["readonlyPaths"]
    binds = {m["destination"] for m in spec["mounts"] if m.get("type") == "bind"}
    for dest, value in mounts_view(raw.get("mountinfo", ""), dests, binds).items():
        view[f"mount {dest}"] = value
    return view


def comparable(a: dict[str, str], b: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Drop the default masked paths of /proc and /sys that one kernel lacks."""
    skip = {
        k
        for k in a.keys() | b.keys()
        if k.split(" ", 1)[-1].startswith(("/proc/", "/sys/"))
        if "absent" in (a.get(k), b.get(k))
    }
    return {k: v for k, v in a.items() if k not in skip}, {
        k: v for k, v in b.items() if k not in skip
    }


def run_runc(bundle: Path) -> str:
    cid = f"parity-{uuid.uuid4().hex[:8]}"
    try:
        r = subprocess.run(
            [RUNC, "run", "--bundle", str(bundle), cid],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run([RUNC, "delete", "--force", cid], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def run_carapace(bundle: Path) -> str:
    r = subprocess.run(
        [CARAPACE, "run", "--bundle", str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def run_carapace_runtime(bundle: Path) -> str:
    cid = f"parity-{uuid.uuid4().hex[:8]}"
    try:
        r = subprocess.run(
            [CARAPACE_RUNTIME, "run", "--bundle", str(bundle), cid],
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run(
            [CARAPACE_RUNTIME, "delete", "--force", cid], capture_output=True, timeout=60
        )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def runc_view(bundle: Path) -> dict[str, str]:
    spec = json.loads((bundle / "config.json").read_text())
    return normalize(sections(run_runc(bundle)), spec)


RUNTIMES = {"carapace run": run_carapace, "carapace-runtime": run_carapace_runtime}


@pytest.fixture(params=list(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_runc_view_is_what_the_spec_says(runc_view: dict[str, str]) -> None:
    """The probe sees the fields (so that agreeing with runc means something)."""
    v = runc_view
    assert (v["uid"], v["gid"], v["groups"]) == ("1000", "1000", "1000 10 20")
    assert (v["umask"], v["hostname"], v["pwd"]) == ("0027", HOSTNAME, CWD)
    assert "PARITY=yes" in v["env"].splitlines() and "SPACED=a b  c" in v["env"].splitlines()
    assert v["limit Max open files"] == "1000 2000 files"
    assert "NoNewPrivs:\t1" in v["status"]
    assert v["oom_score_adj"] == str(OOM_SCORE_ADJ)
    assert {k: v[f"sysctl {k}"] for k in SYSCTL} == SYSCTL
    assert v["masked /etc/secret"] == "file bytes: 0"
    assert v["masked /masked-dir"] == "dir entries: 0"
    assert v["readonly /made-ro"] == "Read-only file system"
    assert v["device /dev/mynull"].splitlines() == [
        "character special file 1:3 666 0:0", "read ok", "write ok"]  # fmt: skip
    assert v["device /dev/myzero"].splitlines()[0] == "character special file 1:5 640 1000:10"
    assert v["device /dev/mykmsg"].splitlines()[1:] == ["Operation not permitted", "write ok"]
    assert v["device /dev/noport"].splitlines()[1:] == ["Operation not permitted"] * 2
    assert v["root-write"] == "Read-only file system"
    assert v["mount /scratch"].startswith("rw,nosuid,nodev,noexec")
    assert v["mount /vol"].startswith("ro,nosuid,nodev,noexec")


def test_container_view_matches_runc(bundle: Path, runc_view: dict[str, str], runtime: str) -> None:
    spec = json.loads((bundle / "config.json").read_text())
    view = normalize(sections(RUNTIMES[runtime](bundle)), spec)
    theirs, ours = comparable(runc_view, view)
    assert "end" in ours, f"the probe did not finish under {runtime}: {ours}"
    differ = {
        k: (theirs.get(k), ours.get(k))
        for k in theirs.keys() | ours.keys()
        if theirs.get(k) != ours.get(k)
    }
    assert differ == {}, (
        f"{runtime} differs from runc (runc's, {runtime}'s): {json.dumps(differ, indent=1)}"
    )


# -- a command that cannot be started (docker's exit statuses) ------------------------------


@pytest.mark.parametrize(
    ("command", "status", "text"),
    [
        ("nosuchcmd", 127, 'exec: "nosuchcmd": executable file not found in $PATH'),
        ("/bin/nosuch", 127, 'exec: "/bin/nosuch": stat /bin/nosuch: no such file or directory'),
        ("/etc/passwd", 126, 'exec: "/etc/passwd": permission denied'),
        ("/etc", 126, 'exec: "/etc": permission denied'),
    ],
)
def test_run_exit_status_of_a_command_that_cannot_start(
    command: str, status: int, text: str
) -> None:
    r = subprocess.run(
        [CARAPACE, "run", "--", command], capture_output=True, text=True, timeout=300
    )
    assert (r.returncode, r.stdout) == (status, ""), r.stderr
    assert text in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
