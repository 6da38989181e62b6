"""Port forwarding (``kubectl port-forward``) to a carapace pod through containerd's CRI.

containerd's CRI PortForward dials ``localhost:PORT`` inside the pod's network
namespace on the host; the service listens in the VM. The pod's shim keeps a listener
on 127.0.0.1:PORT in that namespace for each TCP port something listens on in the guest
and relays its connections through the agent (sandbox/portforward.py). Here: busybox
httpd in a CRI pod answers ``nsenter --net=<pod netns> wget http://127.0.0.1:80/``; a
1 MiB random file comes through byte for byte; a port opened later (ExecSync) is
reachable within the 2 s the issue allows and stops being listened on once its server
is killed; CRI's own PortForward (containerd's streaming server, the Kubernetes
port-forward protocol over a WebSocket) reaches the pod; nothing listens once the pod
is removed.

A VM boot costs seconds under TCG: the tests share one pod (module fixture
``served``); the last one removes it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cri_api as api
import pytest

from .rig import ContainerdRig, CriClient
from .test_cri_network import (  # the module's leak check: relative to a shared pod
    Pod,
    assert_pod_gone,
    containerd_left_clean,  # noqa: F401
    kept_netns,
    shim_of,
    wait_for,
)

BIG = 1 << 20
SERVE = (
    "mkdir -p /www && echo hello-pf > /www/index.html "
    f"&& head -c {BIG} /dev/urandom > /www/big && exec httpd -f -p 80 -h /www"
)
#: A second server, started after the pod (its pid is printed).
LATE = (
    "mkdir -p /www2 && echo late > /www2/index.html "
    "&& { httpd -f -p 8080 -h /www2 </dev/null >/dev/null 2>&1 & echo $!; }"
)
#: What the issue allows for a port opened in the pod to be reachable from its netns.
REACHABLE_WITHIN = 2.0
LOOPBACK_HEX = "0100007F"  # 127.0.0.1 in /proc/net/tcp (a little-endian host)
TCP_LISTEN = "0A"


# -- helpers ------------------------------------------------------------------------------


def listening(netns: str) -> dict[tuple[str, int], str]:
    """(address as /proc/net/tcp{,6} writes it, port) -> socket inode of every
    listening TCP socket in ``netns``."""
    out: dict[tuple[str, int], str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        r = subprocess.run(
            ["nsenter", f"--net={netns}", "cat", table], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_LISTEN:
                address, port = fields[1].split(":")
                out[(address, int(port, 16))] = fields[9]
    return out


def fetch(netns: str, url: str, timeout: int = 10) -> subprocess.CompletedProcess[bytes]:
    """``wget -O- url`` run in ``netns`` (one try, no proxy, at most ``timeout``
    seconds): busybox's, which busybox-static (scripts/install-deps.sh) installs; a
    newcomer's Debian has no GNU wget."""
    argv = ["nsenter", f"--net={netns}", "busybox", "wget", "-q", "-O-", "-Y", "off", url]
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(
            argv, 124, e.stdout or b"", f"timed out after {timeout} s".encode()
        )


def fetch_until(netns: str, url: str, deadline: float) -> subprocess.CompletedProcess[bytes]:
    """``fetch`` until it succeeds or ``deadline`` (time.monotonic) passed; the last try."""
    while True:
        r = fetch(netns, url)
        if r.returncode == 0 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                out.add(target[len("socket:[") : -1])
    return out


# -- the Kubernetes port-forward protocol over a WebSocket (client side, stdlib) ---------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _ws_send(sock: socket.socket, payload: bytes, opcode: int = 2) -> None:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def _ws_frames(f: object, sock: socket.socket) -> Iterator[tuple[int, bytes]]:
    """(opcode, payload) of each frame the server sends, until it closes."""
    read = f.read  # type: ignore[attr-defined]
    while True:
        head = read(2)
        if len(head) < 2:
            return
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", read(8))[0]
        mask = read(4) if head[1] & 0x80 else b""
        payload = read(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if opcode == 8:
            return
        if opcode == 9:  # ping
            _ws_send(sock, payload, opcode=10)
            continue
        yield opcode, payload


def cri_port_forward(url: str, port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` to ``port`` through containerd's streaming server at ``url``
    (the answer of CRI PortForward), by the port-forward protocol over a WebSocket
    (channel 0: data, channel 1: errors, each starting with the port, little-endian);
    returns (data, error text) once the server closed."""
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None and u.port is not None, url
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(
            (
                f"GET {u.path}?port={port} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n"
                f"Origin: http://{u.netloc}\r\n\r\n"
            ).encode()
        )
        f = sock.makefile("rb")
        status = f.readline()
        assert b" 101 " in status, status
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept, headers
        _ws_send(sock, b"\x00" + request)
        channels: dict[int, bytes] = {0: b"", 1: b""}
        for _, payload in _ws_frames(f, sock):
            if payload:
                channels[payload[0]] = channels.get(payload[0], b"") + payload[1:]
    prefix = struct.pack("<H", port)
    for ch in (0, 1):
        assert channels[ch][:2] == prefix, (ch, channels[ch][:16])
    return channels[0][2:], channels[1][2:]


# -- the shared pod ---------------------------------------------------------------------------


@dataclass
class Served:
    pod: Pod
    web: str  # the container serving /www on port 80
    netns: str


@pytest.fixture(scope="module")
def served(containerd: ContainerdRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cri = containerd.cri()
    logs = tmp_path_factory.mktemp("cri-portforward")
    pod: Pod | None = None
    try:
        pod = Pod(cri, "pf-vm", "carapace", logs)
        web = pod.container("web", ["sh", "-c", SERVE])
        netns = pod.netns()
        # the container is started; httpd listens a moment later
        r = fetch_until(netns, "http://127.0.0.1:80/", time.monotonic() + 60)
        assert r.returncode == 0, r.stderr
        yield Served(pod, web, netns)
    finally:
        try:
            if pod is not None:
                pod.remove()
        finally:
            cri.close()
    if pod is not None:
        assert_pod_gone(containerd, pod.id)


# -- tests ------------------------------------------------------------------------------------


def test_the_pod_netns_reaches_httpd_in_the_pod_at_127_0_0_1(served: Served) -> None:
    r = fetch(served.netns, "http://127.0.0.1:80/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello-pf\n"
    # what listens in the pod's namespace: port 80 on the loopback address, no other
    assert set(listening(served.netns)) == {(LOOPBACK_HEX, 80)}


def test_a_1mib_random_file_comes_through_byte_for_byte(served: Served) -> None:
    out = served.pod.out(served.web, ["sha256sum", "/www/big"])
    digest = out.split()[0]
    r = fetch(served.netns, "http://127.0.0.1:80/big", timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == BIG
    assert hashlib.sha256(r.stdout).hexdigest() == digest


def test_a_port_opened_later_is_reachable_within_2s_and_goes_with_its_server(
    served: Served,
) -> None:
    pod, netns = served.pod, served.netns
    assert (LOOPBACK_HEX, 8080) not in listening(netns)
    pid = pod.out(served.web, ["sh", "-c", LATE]).strip()
    assert pid.isdigit(), pid
    started = time.monotonic()
    try:
        # every try begins before the deadline: one that succeeds reached it in time
        r = fetch_until(netns, "http://127.0.0.1:8080/", started + REACHABLE_WITHIN)
        assert r.returncode == 0, f"not reachable within {REACHABLE_WITHIN}s: {r.stderr!r}"
        assert r.stdout == b"late\n"
        assert (LOOPBACK_HEX, 8080) in listening(netns)
    finally:
        pod.exec(served.web, ["kill", pid])
    wait_for(
        "port 8080 to be no longer listened on in the pod's netns",
        lambda: (LOOPBACK_HEX, 8080) not in listening(netns),
        30,
    )
    assert fetch(netns, "http://127.0.0.1:8080/").returncode != 0
    assert set(listening(netns)) == {(LOOPBACK_HEX, 80)}  # port 80 stays


def test_cri_port_forward_reaches_the_pod(served: Served, cri: CriClient) -> None:
    url = cri.runtime.PortForward(
        api.PortForwardRequest(pod_sandbox_id=served.pod.id, port=[80]), timeout=30
    ).url
    data, errors = cri_port_forward(url, 80, b"GET / HTTP/1.0\r\n\r\n")
    assert errors == b""
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    assert body == b"hello-pf\n"


def test_nothing_listens_once_the_pod_is_gone(containerd: ContainerdRig, served: Served) -> None:
    pod, netns = served.pod, served.netns
    ours = listening(netns)
    assert set(ours) == {(LOOPBACK_HEX, 80)}
    # the listener is the pod's shim's
    [shim] = shim_of(containerd, pod.id)
    assert set(ours.values()) <= socket_inodes(shim)
    with kept_netns(netns) as kept:
        pod.remove()
        assert_pod_gone(containerd, pod.id)
        assert not Path(netns).exists()  # CRI removed the pod's namespace
        assert listening(kept) == {}  # and nothing listens in it
