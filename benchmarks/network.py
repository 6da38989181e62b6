#!/usr/bin/env python3
"""Pod networking benchmark: carapace pods against runc pods on one node, and a carapace
pod's start with CNI networking against one without.

Starts a private containerd (tests/integration/containerd/rig.py, on its own
directories, bridge and pod subnet: not the test rigs', not containerd.py's) and
measures in one invocation, rounds interleaved:

* TCP throughput pod to pod: busybox ``nc`` streams a fixed amount of zeros from a
  client pod to a server pod of the same runtime (carapace↔carapace, runc↔runc), timed
  on the receiving side (from the accept to EOF, with the pod's own clock); MiB/s;
* HTTP request rate: N sequential ``wget -q -O /dev/null`` of a 1 KiB file served by
  busybox ``httpd`` in the server pod, from the host (the same static busybox) and from
  the client pod; requests per second;
* pod ready with networking ÷ without: ``ctr run --runtime io.containerd.carapace.v2``
  of the same container until its first output line, once with ``--with-ns network:``
  a namespace the bridge CNI plugin configured (as CRI does it), once without (loopback
  only); the CNI ADD itself is timed apart.

Traffic goes only between the benchmark's pods and the host end of its bridge.
Prints a Markdown report and writes results/network.json and results/network.md.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # boot.py and containerd.py beside us; tests/ at the root
    if _p not in sys.path:
        sys.path.insert(0, _p)

import boot  # noqa: E402
import containerd as cbench  # noqa: E402
import cri_api as api  # noqa: E402
from boot import BenchError, Measurement  # noqa: E402

from carapace.config import load_config  # noqa: E402
from carapace.sandbox import Sandbox, SandboxOptions  # noqa: E402
from tests.integration.containerd import rig as rig_module  # noqa: E402
from tests.integration.containerd.rig import (  # noqa: E402
    BUSYBOX_IMAGE,
    CARAPACE,
    ContainerdRig,
    pod_config,
)

#: The benchmark's own containerd: neither the test rigs' (/var/lib/carapace-test*,
#: carapace-testN, 10.234+N.0.0/24) nor containerd.py's (carapace-bench0, 10.233.0.0/24).
NET_BASE = Path("/var/lib/carapace-bench-net")
NET_STATE = Path("/run/carapace-bench-net/containerd")
NET_BRIDGE = "carapace-bnet0"
NET_SUBNET = "10.232.0.0/24"
CRI_NAMESPACE = "carapace-bench-net"  # the pods' Kubernetes namespace (metadata only)

CNI_BIN = "/usr/lib/cni"
HOST_BUSYBOX = "/bin/busybox"  # busybox-static: the binary the test image is made of
HTTP_PORT = 8080
HTTP_FILE_BYTES = 1024
TCP_PORT_BASE = 5001
MIB = 1 << 20
CRI_TIMEOUT = 600.0
EXEC_TIMEOUT = 300
READY_TIMEOUT = 600.0
SERVE_TIMEOUT = 120.0

TCP_CARAPACE = "TCP pod→pod (carapace↔carapace)"
TCP_RUNC = "TCP pod→pod (runc↔runc)"
HTTP_HOST_CARAPACE = "HTTP GET host→pod (carapace)"
HTTP_HOST_RUNC = "HTTP GET host→pod (runc)"
HTTP_POD_CARAPACE = "HTTP GET pod→pod (carapace↔carapace)"
HTTP_POD_RUNC = "HTTP GET pod→pod (runc↔runc)"
READY_NET = "ctr run to first output, CNI netns (carapace)"
READY_LO = "ctr run to first output, loopback only (carapace)"
CNI_ADD = "CNI ADD: loopback + bridge (for the row above)"
ORDER = [
    TCP_CARAPACE,
    TCP_RUNC,
    HTTP_HOST_CARAPACE,
    HTTP_HOST_RUNC,
    HTTP_POD_CARAPACE,
    HTTP_POD_RUNC,
    READY_LO,
    READY_NET,
    CNI_ADD,
]
UNITS = {
    TCP_CARAPACE: "MiB/s",
    TCP_RUNC: "MiB/s",
    HTTP_HOST_CARAPACE: "req/s",
    HTTP_HOST_RUNC: "req/s",
    HTTP_POD_CARAPACE: "req/s",
    HTTP_POD_RUNC: "req/s",
    READY_LO: "s",
    READY_NET: "s",
    CNI_ADD: "s",
}

#: The pod's wall clock with microseconds (busybox's date has no %N; adjtimex(2) in
#: read-only mode needs no privilege). Under TCG the guest clock follows the host's.
NOW = (
    "now() { adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} /status/ {st = $2} "
    'END {if (int(st / 8192) % 2) u = int(u / 1000); printf "%d.%06d\\n", s, u}\'; }'
)
#: What ``nc -l -e`` runs once a connection is accepted (stdin is the connection).
RX_SCRIPT = f"""{NOW}
t0=$(now)
n=$(wc -c)
t1=$(now)
echo "$t0 $n $t1" > /tmp/bench-rx.out
"""
SERVE = (
    f"mkdir -p /tmp/www && yes x | head -c {HTTP_FILE_BYTES} > /tmp/www/index.html "
    f"&& exec httpd -f -p {HTTP_PORT} -h /tmp/www"
)
READY_COMMAND = ["sh", "-c", "ip -o -4 addr show; echo ready; exec sleep 3600"]


def no_proxy_env() -> dict[str, str]:
    """The environment without proxy settings: requests go to the pod IP, nowhere else."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# -- the private containerd and its pods --------------------------------------------------


def net_rig() -> ContainerdRig:
    """ContainerdRig on the benchmark's own paths, bridge and subnet (module constants of
    rig.py, read when used; set here for this process only)."""
    rig_module.BRIDGE = NET_BRIDGE
    rig_module.POD_SUBNET = NET_SUBNET
    return ContainerdRig(
        root=NET_BASE / "containerd",
        state=NET_STATE,
        cni_dir=NET_BASE / "cni",
        log_path=NET_BASE / "containerd.log",
    )


def _rpc_error(e: Exception) -> str:
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    if callable(code) and callable(details):  # a grpc.RpcError
        return f"{code().name}: {details()}"
    return f"{type(e).__name__}: {e}"


@dataclass
class Pod:
    """A CRI pod with one container; ids filled in as they come (for the cleanup)."""

    name: str
    handler: str  # "carapace" or "runc"
    command: list[str]
    pod_id: str = ""
    cid: str = ""
    ip: str = ""
    ready_seconds: float | None = None


def start_pod(rt: Any, pod: Pod, log_dir: str, label: str) -> None:
    """RunPodSandbox, CreateContainer, StartContainer; the pod IP from PodSandboxStatus."""
    config = pod_config(pod.name, log_dir, CRI_NAMESPACE, {"carapace-bench-net": label})
    t0 = time.perf_counter()
    try:
        pod.pod_id = rt.RunPodSandbox(
            api.RunPodSandboxRequest(config=config, runtime_handler=pod.handler),
            timeout=CRI_TIMEOUT,
        ).pod_sandbox_id
        pod.cid = rt.CreateContainer(
            api.CreateContainerRequest(
                pod_sandbox_id=pod.pod_id,
                config=api.ContainerConfig(
                    metadata=api.ContainerMetadata(name="main"),
                    image=api.ImageSpec(image=BUSYBOX_IMAGE),
                    command=pod.command,
                    log_path="main.log",
                ),
                sandbox_config=config,
            ),
            timeout=CRI_TIMEOUT,
        ).container_id
        rt.StartContainer(api.StartContainerRequest(container_id=pod.cid), timeout=CRI_TIMEOUT)
        pod.ready_seconds = time.perf_counter() - t0
        pod.ip = rt.PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=pod.pod_id), timeout=60
        ).status.network.ip
    except Exception as e:
        raise BenchError(f"starting pod {pod.name} ({pod.handler}): {_rpc_error(e)}") from e
    if not pod.ip:
        raise BenchError(f"pod {pod.name} ({pod.handler}) has no IP in PodSandboxStatus")


def exec_in(
    rt: Any, cid: str, script: str, timeout: int = EXEC_TIMEOUT, args: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    """ExecSync ``sh -c script sh ARGS...`` in a container: exit code, stdout, stderr."""
    cmd = ["sh", "-c", script, "sh", *args]
    try:
        r = rt.ExecSync(
            api.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
            timeout=timeout + 60,
        )
    except Exception as e:
        raise BenchError(f"ExecSync in {cid[:12]}: {_rpc_error(e)}") from e
    return r.exit_code, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def exec_ok(
    rt: Any,
    cid: str,
    script: str,
    what: str,
    timeout: int = EXEC_TIMEOUT,
    args: tuple[str, ...] = (),
) -> str:
    code, out, err = exec_in(rt, cid, script, timeout, args)
    if code != 0:
        raise BenchError(f"{what}: exited {code}: {(err or out).strip()[-400:]}")
    return out


def wait_serving(ip: str, what: str) -> None:
    """Until busybox httpd answers on the pod IP (from the host, no proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + SERVE_TIMEOUT
    while True:
        try:
            with opener.open(f"http://{ip}:{HTTP_PORT}/index.html", timeout=10) as r:
                if len(r.read()) == HTTP_FILE_BYTES:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: httpd on {ip}:{HTTP_PORT} not answering")
        time.sleep(0.5)


# -- 1. TCP throughput ---------------------------------------------------------------------


def _seconds_between(t0: str, t1: str) -> float:
    return float(t1) - float(t0)


def measure_tcp(
    rt: Any, server: Pod, client: Pod, nbytes: int, port: int, details: list[dict[str, Any]]
) -> float:
    """``head -c N /dev/zero | nc SERVER PORT`` in the client, ``nc -l -p PORT`` in the
    server; MiB/s from the receiver's accept to its EOF."""
    result: dict[str, Any] = {}

    def receive() -> None:
        try:
            result["rx"] = exec_ok(
                rt,
                server.cid,
                f"rm -f /tmp/bench-rx.out; nc -l -p {port} -e sh /tmp/bench-rx.sh; "
                "cat /tmp/bench-rx.out",
                f"receiver in {server.name}",
            )
        except BenchError as e:
            result["rx_error"] = str(e)

    receiver = threading.Thread(target=receive, name="receiver", daemon=True)
    receiver.start()
    try:
        deadline = time.monotonic() + 120
        while exec_in(rt, server.cid, f"netstat -ltn | grep -q ':{port} '", 60)[0] != 0:
            if not receiver.is_alive() or time.monotonic() > deadline:
                raise BenchError(
                    f"no listener on {server.name}:{port}: {result.get('rx_error', 'timeout')}"
                )
            time.sleep(0.2)
        tx = exec_ok(
            rt,
            client.cid,
            f"{NOW}\nt0=$(now)\ni=0\n"
            f"until head -c {nbytes} /dev/zero | nc {server.ip} {port}; do\n"
            "  i=$((i + 1)); [ $i -lt 50 ] || exit 1; sleep 0.2\ndone\n"
            't1=$(now)\necho "$t0 $t1 $i"\n',
            f"sender in {client.name}",
        )
        receiver.join(EXEC_TIMEOUT + 60)
    finally:
        if receiver.is_alive():  # the sender failed: end the listener
            with contextlib.suppress(BenchError):
                exec_in(rt, server.cid, "killall nc", 60)
            receiver.join(120)
    if "rx_error" in result:
        raise BenchError(result["rx_error"])
    rx = result.get("rx", "").split()
    if len(rx) != 3:
        raise BenchError(f"receiver in {server.name}: unexpected output {result.get('rx')!r}")
    t0, got, t1 = rx
    if int(got) != nbytes:
        raise BenchError(f"receiver in {server.name} got {got} bytes of {nbytes}")
    seconds = _seconds_between(t0, t1)
    tx_t0, tx_t1, retries = tx.split()
    details.append(
        {
            "bytes": nbytes,
            "receiver_seconds": round(seconds, 6),
            "sender_seconds": round(_seconds_between(tx_t0, tx_t1), 6),
            "sender_connect_retries": int(retries),
        }
    )
    if seconds <= 0:
        raise BenchError(f"receiver in {server.name}: non-positive time {seconds}")
    return nbytes / MIB / seconds


# -- 2. HTTP request rate -------------------------------------------------------------------


def measure_http_from_host(ip: str, n: int) -> float:
    """N sequential busybox wget (the test image's busybox-static) from the host; req/s."""
    url = f"http://{ip}:{HTTP_PORT}/index.html"
    script = (
        f"i=0; while [ $i -lt {n} ]; do {HOST_BUSYBOX} wget -q -O /dev/null {url} || exit 1; "
        "i=$((i + 1)); done"
    )
    t0 = time.perf_counter()
    r = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env=no_proxy_env(), timeout=600
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"wget loop from the host to {url}: {r.stderr.strip()[-400:]}")
    return n / dt


def measure_http_pod(rt: Any, server: Pod, client: Pod, n: int) -> float:
    """N sequential wget in the client pod, timed with the pod's clock; req/s."""
    url = f"http://{server.ip}:{HTTP_PORT}/index.html"
    out = exec_ok(
        rt,
        client.cid,
        f"{NOW}\nt0=$(now)\ni=0\nwhile [ $i -lt {n} ]; do\n"
        f"  wget -q -O /dev/null {url} || exit 1; i=$((i + 1))\ndone\n"
        't1=$(now)\necho "$t0 $t1"\n',
        f"wget loop in {client.name}",
    )
    t0, t1 = out.split()
    return n / _seconds_between(t0, t1)


# -- 3. pod ready with and without networking --------------------------------------------


def cni_call(command: str, conf: dict[str, Any], netns: str, container_id: str, ifname: str) -> Any:
    """One CNI plugin call, as libcni makes it."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": CNI_BIN,
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    r = subprocess.run(
        [f"{CNI_BIN}/{conf['type']}"],
        input=json.dumps(conf),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise BenchError(f"CNI {command} {conf['type']}: {(r.stdout + r.stderr).strip()[-400:]}")
    return json.loads(r.stdout) if r.stdout.strip() else {}


def cni_networks(rig: ContainerdRig) -> list[tuple[dict[str, Any], str]]:
    """(plugin configuration, interface) in the order CRI's go-cni sets them up: its own
    loopback network first, then the rig's conflist (one bridge plugin) on eth0."""
    conflist = rig.cni_conflist()
    lo = {"cniVersion": "0.3.1", "name": "cni-loopback", "type": "loopback"}
    nets = [(lo, "lo")]
    for plugin in conflist["plugins"]:
        conf = {**plugin, "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
        nets.append((conf, "eth0"))
    return nets


@dataclass
class Netns:
    name: str
    path: str
    ip: str = ""
    added: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def netns_add(rig: ContainerdRig, name: str, made: list[Netns]) -> tuple[Netns, float]:
    """``ip netns add`` (untimed), then CNI ADD of every network (timed); the pod IP."""
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"ip netns add {name}: {r.stderr.strip()}")
    ns = Netns(name, f"/run/netns/{name}")
    made.append(ns)
    t0 = time.perf_counter()
    for conf, ifname in cni_networks(rig):
        ns.added.append((conf, ifname))
        result = cni_call("ADD", conf, ns.path, name, ifname)
        if ifname == "eth0":
            ns.ip = result["ips"][0]["address"].split("/")[0]
    return ns, time.perf_counter() - t0


def netns_remove(ns: Netns) -> list[str]:
    """CNI DEL in reverse order (frees the host-local address, removes the veth), then the
    namespace; the problems."""
    problems = []
    for conf, ifname in reversed(ns.added):
        try:
            cni_call("DEL", conf, ns.path, ns.name, ifname)
        except BenchError as e:
            problems.append(str(e))
    ns.added.clear()
    r = subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True, text=True)
    if r.returncode != 0 and Path(ns.path).exists():
        problems.append(f"ip netns delete {ns.name}: {r.stderr.strip()}")
    return problems


def ctr_run_ready(rig: ContainerdRig, cid: str, netns: Netns | None) -> float:
    """``ctr run --rm --runtime carapace [--with-ns network:PATH] busybox CID READY_COMMAND``
    until the line "ready" arrives; then the task is killed (untimed). Checks that the
    container saw eth0 with the CNI address (netns) or no eth0 at all (loopback only)."""
    argv = ["ctr", "-a", str(rig.socket), "-n", "default", "run", "--rm", "--runtime", CARAPACE]
    if netns is not None:
        argv += ["--with-ns", f"network:{netns.path}"]
    argv += [BUSYBOX_IMAGE, cid, *READY_COMMAND]
    lines: queue.Queue[tuple[float, bytes]] = queue.Queue()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=rig.environment(),
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            lines.put((time.perf_counter(), line))
        lines.put((time.perf_counter(), b""))  # EOF

    threading.Thread(target=read, name="ctr-stdout", daemon=True).start()
    seen: list[str] = []
    ready: float | None = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while ready is None:
            try:
                at, line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"ctr run {cid}: no output in {READY_TIMEOUT:g}s") from None
            if not line:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"ctr run {cid} ended before 'ready': {err.strip()[-400:]}")
            text = line.decode(errors="replace").strip()
            if text == "ready":
                ready = at - t0
            else:
                seen.append(text)
    finally:
        rig.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=60)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    has_eth0 = any(" eth0 " in f" {s} " for s in seen)
    if netns is not None and not any(f"inet {netns.ip}/" in s for s in seen):
        raise BenchError(f"ctr run {cid}: the pod's address {netns.ip} not on eth0: {seen}")
    if netns is None and has_eth0:
        raise BenchError(f"ctr run {cid}: loopback only expected, saw {seen}")
    return ready


# -- report ---------------------------------------------------------------------------------


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if unit == "s" else f"{x:.1f}"


def ratios(results: dict[str, Measurement]) -> dict[str, float | None]:
    r = boot._ratio
    med = {name: results[name].median for name in ORDER}
    net, lo, cni = med[READY_NET], med[READY_LO], med[CNI_ADD]
    return {
        "tcp carapace / runc": r(med[TCP_CARAPACE], med[TCP_RUNC]),
        "http host->pod carapace / runc": r(med[HTTP_HOST_CARAPACE], med[HTTP_HOST_RUNC]),
        "http pod->pod carapace / runc": r(med[HTTP_POD_CARAPACE], med[HTTP_POD_RUNC]),
        "ready netns / loopback only": r(net, lo),
        "(cni add + ready netns) / loopback only": r(
            None if net is None or cni is None else net + cni, lo
        ),
    }


RATIO_LABELS = {
    "tcp carapace / runc": "TCP throughput, carapace ÷ runc",
    "http host->pod carapace / runc": "HTTP requests/s host→pod, carapace ÷ runc",
    "http pod->pod carapace / runc": "HTTP requests/s pod→pod, carapace ÷ runc",
    "ready netns / loopback only": "**pod ready with networking ÷ without** (goal ≤ 1.1)",
    "(cni add + ready netns) / loopback only": "(CNI ADD + pod ready with networking) ÷ without",
}


def markdown(
    machine: dict[str, Any],
    params: dict[str, Any],
    results: dict[str, Measurement],
    rat: dict[str, float | None],
    others: dict[str, list[int]],
    notes: list[str],
) -> str:
    lines = [
        "# carapace network benchmark",
        "",
        f"{machine['date']} · {machine['nproc']} CPUs ({machine['cpu']}) · host kernel "
        f"{machine['host_kernel']} · {machine.get('qemu', '?')} · accel "
        f"**{machine.get('accel', '?')}** ({machine.get('accel_reason', '?')}) · "
        f"{machine['containerd']} · pod VM {machine.get('vm_vcpus', '?')} vCPU, "
        f"{machine.get('vm_memory_mib', '?')} MiB",
        "",
        f"Medians of {params['runs']} runs per traffic row and {params['ready_runs']} per "
        "pod-ready row, rounds interleaved (the order alternating), in one invocation "
        f"({params['warmup']} untimed warm-up round(s) first). TCP: busybox nc, "
        f"{params['tcp_mib']} MiB of zeros per sample, timed by the receiver. HTTP: "
        f"{params['requests']} sequential busybox wget of a {HTTP_FILE_BYTES}-byte file from "
        "busybox httpd. Pod ready: `ctr run --rm` of the same container until its first "
        "output line, with and without a CNI-configured network namespace.",
        "",
        "| measurement | unit | median | min | max | runs | other QEMU seen |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ORDER:
        m, unit = results[name], UNITS[name]
        seen = others.get(name, [])
        other = max(seen) if seen else "n/a"
        if m.error is not None:
            err = m.error.replace("|", "/").replace("\n", " ")
            lines.append(f"| {name} | {unit} | failed: {err} | | | {len(m.samples)} | {other} |")
            continue
        lo, hi = (min(m.samples), max(m.samples)) if m.samples else (None, None)
        lines.append(
            f"| {name} | {unit} | {_fmt(m.median, unit)} | {_fmt(lo, unit)} | "
            f"{_fmt(hi, unit)} | {len(m.samples)} | {other} |"
        )
    lines += ["", "| ratio (of medians) | value |", "|---|---:|"]
    for key, label in RATIO_LABELS.items():
        v = rat.get(key)
        lines.append(f"| {label} | {'n/a' if v is None else f'{v:.3g}x'} |")
    if notes:
        lines += ["", *[f"- {x}" for x in notes]]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------


@dataclass
class Bench:
    rig: ContainerdRig
    monitor: cbench.Monitor
    results: dict[str, Measurement]
    others: dict[str, list[int]] = field(default_factory=dict)
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def one(self, name: str, record: bool, fn: Callable[[], float]) -> None:
        """One sample; the most QEMU processes not ours seen meanwhile."""
        if self.results[name].error is not None:
            return
        self.monitor.reset()
        boot._timed(self.results, name, record, fn)
        if record:
            self.others.setdefault(name, []).append(self.monitor.read()["max_foreign_qemu"])


def traffic_phase(
    bench: Bench, prefix: str, args: argparse.Namespace, pods: list[Pod], log_dir: str
) -> None:
    """Four pods (a server and a client of each runtime), then the interleaved rounds of
    TCP and HTTP samples."""
    rt_client = bench.rig.cri()
    try:
        rt = rt_client.runtime
        serve = ["sh", "-c", SERVE]
        sleep = ["sleep", "3600"]
        for handler in ("carapace", "runc"):
            for role, cmd in (("server", serve), ("client", sleep)):
                pod = Pod(f"{prefix}-{handler}-{role}", handler, cmd)
                pods.append(pod)
                print(f"  starting {pod.name} ...", file=sys.stderr, flush=True)
                start_pod(rt, pod, log_dir, prefix)
        by = {(p.handler, p.name.rsplit("-", 1)[1]): p for p in pods}
        for handler in ("carapace", "runc"):
            server = by[(handler, "server")]
            wait_serving(server.ip, server.name)
            exec_ok(
                rt,
                server.cid,
                'printf "%s" "$1" > /tmp/bench-rx.sh',
                f"writing the receiver script in {server.name}",
                args=(RX_SCRIPT,),
            )
        # the carapace pods' guests really have the pod IP on eth0
        for p in pods:
            if p.handler == "carapace":
                out = exec_ok(rt, p.cid, "ip -o -4 addr show eth0", f"ip addr in {p.name}")
                if f"inet {p.ip}/" not in out:
                    raise BenchError(f"{p.name}: {p.ip} not on the guest's eth0: {out.strip()}")
        rows = {
            "carapace": (TCP_CARAPACE, HTTP_HOST_CARAPACE, HTTP_POD_CARAPACE),
            "runc": (TCP_RUNC, HTTP_HOST_RUNC, HTTP_POD_RUNC),
        }
        nbytes = args.tcp_mib * MIB
        port = TCP_PORT_BASE
        for i in range(args.warmup + args.runs):
            record = i >= args.warmup
            tag = f"run {i - args.warmup + 1}/{args.runs}" if record else "warm-up"
            print(f"[{tag}] TCP and HTTP, carapace and runc ...", file=sys.stderr, flush=True)
            # alternate which runtime goes first, so neither always follows the other
            for handler in ("carapace", "runc") if i % 2 == 0 else ("runc", "carapace"):
                server, client = by[(handler, "server")], by[(handler, "client")]
                tcp_row, host_row, pod_row = rows[handler]
                port += 1
                tcp_details = bench.details.setdefault(tcp_row, []) if record else []
                bench.one(
                    tcp_row,
                    record,
                    partial(measure_tcp, rt, server, client, nbytes, port, tcp_details),
                )
                bench.one(
                    host_row, record, partial(measure_http_from_host, server.ip, args.requests)
                )
                bench.one(
                    pod_row, record, partial(measure_http_pod, rt, server, client, args.requests)
                )
    finally:
        ids = [p.pod_id for p in pods if p.pod_id]
        bench.problems += cbench.remove_pods(rt_client.runtime, ids)
        rt_client.close()
        bench.problems += cbench.settle(bench.rig, bench.monitor, "the traffic pods")


def ready_phase(bench: Bench, prefix: str, args: argparse.Namespace, made: list[Netns]) -> None:
    """Interleaved: the same ``ctr run`` with a CNI netns and without; after each sample,
    untimed, the container is gone, no shim or QEMU is left, the netns is torn down."""
    for i in range(args.warmup + args.ready_runs):
        record = i >= args.warmup
        tag = f"run {i - args.warmup + 1}/{args.ready_runs}" if record else "warm-up"
        print(f"[{tag}] pod ready with and without networking ...", file=sys.stderr, flush=True)
        for variant in ("lo", "net") if i % 2 == 0 else ("net", "lo"):
            cid = f"{prefix}-ready{i}-{variant}"
            if variant == "lo":
                bench.one(READY_LO, record, partial(ctr_run_ready, bench.rig, cid, None))
                bench.problems += cbench.settle(bench.rig, bench.monitor, READY_LO)
                continue
            if bench.results[READY_NET].error is not None:
                continue
            try:
                ns, cni_seconds = netns_add(bench.rig, f"{prefix}-{i}", made)
            except BenchError as e:
                bench.results[READY_NET].error = bench.results[CNI_ADD].error = str(e)
                continue
            try:
                if record:
                    bench.results[CNI_ADD].samples.append(cni_seconds)
                bench.one(READY_NET, record, partial(ctr_run_ready, bench.rig, cid, ns))
                bench.problems += cbench.settle(bench.rig, bench.monitor, READY_NET)
            finally:
                bench.problems += netns_remove(ns)
                made.remove(ns)


def machine_facts(rig: ContainerdRig) -> dict[str, Any]:
    config = load_config(rig.carapace_config)
    hv = config.hypervisor
    _image, _kernel, _initrd, accel = boot.guest_of(config, "network.py")
    sizing = Sandbox(config, SandboxOptions())  # what the shim gives a pod
    return {
        "snapshotter": f"{rig.snapshotter} ({rig.snapshotter_reason})",
        "ctr": boot._first_line(["ctr", "--version"]),
        "qemu": boot._first_line([hv.path, "--version"]),
        "accel": accel.accel,
        "accel_reason": accel.reason,
        "vm_vcpus": sizing.vcpus,
        "vm_memory_mib": sizing.memory_mib,
        "vhost_net": os.access("/dev/vhost-net", os.R_OK | os.W_OK),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    ap.add_argument("--tcp-mib", type=int, default=64, help="MiB streamed per TCP sample (64)")
    ap.add_argument("--requests", type=int, default=200, help="HTTP GETs per sample (200)")
    ap.add_argument(
        "--ready-runs",
        type=int,
        default=5,
        help="timed runs of each pod-ready row (5: the noisiest rows, and the goal's)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory for network.json and network.md (benchmarks/results)",
    )
    args = ap.parse_args(argv)
    if min(args.runs, args.ready_runs, args.tcp_mib, args.requests) < 1 or args.warmup < 0:
        ap.error("--runs, --ready-runs, --tcp-mib and --requests must be >= 1, --warmup >= 0")
    if os.geteuid() != 0:
        ap.error("run it as root (containerd, pods, QEMU and network namespaces need it)")
    for tool in ("containerd", "ctr", "ip", HOST_BUSYBOX, f"{CNI_BIN}/bridge"):
        if shutil.which(tool) is None and not os.access(tool, os.X_OK):
            ap.error(f"{tool} is not installed (scripts/install-deps.sh installs it)")

    results = {name: Measurement(name) for name in ORDER}
    prefix = f"bnet-{secrets.token_hex(3)}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rig = net_rig()
    machine: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": boot._cpu_model(),
        "memory_total_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20,
        "host_kernel": platform.release(),
        "containerd": boot._first_line(["containerd", "--version"]),
        "python": platform.python_version(),
        "loadavg_at_start": round(os.getloadavg()[0], 2),
        "other_qemu_processes_at_start": len(cbench.snapshot(rig.socket).foreign_qemu),
        "rig": {
            "root": str(rig.root),
            "state": str(rig.state),
            "bridge": NET_BRIDGE,
            "pod_subnet": NET_SUBNET,
            "log": str(rig.log_path),
        },
    }
    params = {
        "runs": args.runs,
        "ready_runs": args.ready_runs,
        "warmup": args.warmup,
        "tcp_mib": args.tcp_mib,
        "requests": args.requests,
        "http_file_bytes": HTTP_FILE_BYTES,
    }
    monitor = cbench.Monitor(rig.socket)
    bench = Bench(rig, monitor, results)
    pods: list[Pod] = []
    made_netns: list[Netns] = []
    log_dir = tempfile.mkdtemp(prefix="carapace-bench-net-")
    left: list[str] = []
    stop_problems: list[str] = []
    interrupted = False
    started = time.monotonic()
    print(f"starting a private containerd in {NET_BASE} ...", file=sys.stderr, flush=True)
    try:
        rig.start()
        monitor.start()
        machine.update(machine_facts(rig))
        print("traffic: starting 2 carapace and 2 runc pods ...", file=sys.stderr, flush=True)
        try:
            traffic_phase(bench, prefix, args, pods, log_dir)
        except BenchError as e:  # the pods could not be set up: every traffic row fails
            for name in ORDER[:6]:
                if results[name].error is None:
                    results[name].error = str(e)
        ready_phase(bench, prefix, args, made_netns)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up ...", file=sys.stderr, flush=True)
    finally:
        for ns in list(made_netns):
            bench.problems += netns_remove(ns)
        monitor.stop()
        try:
            stop_problems = rig.stop()
        finally:
            left = cbench.kill_leftovers(rig, monitor)
            shutil.rmtree(log_dir, ignore_errors=True)
    left += [f"network namespace {n}" for n in rig_module.netns_names() if n.startswith(prefix)]
    if interrupted:
        if stop_problems:
            print(f"stopping the containerd: {'; '.join(stop_problems)}", file=sys.stderr)
        if left:
            print(f"LEFT BEHIND: {', '.join(left)}", file=sys.stderr)
        return 130

    machine["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    machine["wall_seconds"] = round(time.monotonic() - started, 1)
    notes = list(bench.problems)
    if stop_problems:
        notes.append("stopping the containerd: " + "; ".join(stop_problems))
    if left:
        notes.append("LEFT BEHIND (killed or still there): " + ", ".join(left))
    others = max(
        [machine["other_qemu_processes_at_start"]] + [x for xs in bench.others.values() for x in xs]
    )
    if others:
        notes.append(
            f"up to {others} QEMU process(es) not ours were running (other sessions on this "
            "machine): the figures are disturbed, compare them with care."
        )
    notes.append(
        "During the traffic rows all four pods run: the two carapace VMs idle while the runc "
        "pods are measured. vhost-net: "
        + ("available" if machine.get("vhost_net") else "none (QEMU moves the packets)")
        + "."
    )
    rat = ratios(results)
    report = {
        "machine": machine,
        "parameters": params,
        "results": {name: {"unit": UNITS[name], **results[name].summary()} for name in ORDER},
        "ratios": rat,
        "tcp_samples": bench.details,
        "traffic_pods": [
            {
                "name": p.name,
                "runtime_handler": p.handler,
                "ip": p.ip,
                "cri_ready_seconds": None if p.ready_seconds is None else round(p.ready_seconds, 3),
            }
            for p in pods
        ],
        "other_qemu_processes_seen": bench.others,
        "notes": notes,
    }
    md = markdown(machine, params, results, rat, bench.others, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "network.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "network.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'network.json'} and {args.out / 'network.md'}", file=sys.stderr)
    failed = any(m.error is not None for m in results.values())
    return 1 if failed or left or stop_problems or bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
