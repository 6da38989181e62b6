"""The pool of pre-booted VMs, its pure parts and its fd plumbing: the pool VM's shape
and key, its name, the handover protocol (JSON lines, fds by SCM_RIGHTS), where a pod
may ask for its sockets, the configuration keys, and an adopted process waited for and
signalled through a pidfd."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from carapace.config import parse_config
from carapace.errors import CarapaceError, InvalidArgument
from carapace.factory import template_key
from carapace.factory.pool import (
    MAX_LINE,
    Handover,
    VMPool,
    decode_line,
    encode_line,
    pool_key,
    pool_vm_spec,
    receive_message,
    send_message,
    socket_target,
    status,
    take,
    why_not_pooled,
)
from carapace.guest import ALL_MODULES_PARAM
from carapace.hypervisor import VM, TapNic, VMSpec, vm_command_line
from carapace.hypervisor.qemu.vm import UNKNOWN_STATUS, AdoptedProcess
from carapace.protocols.contract import ID_RE, is_pool_vm_name, pool_vm_name, vm_name
from carapace.sandbox.restore import MAX_CLONE_NICS, pool_base
from tests.tooling.vmspecs import make_spec


def spec(**kw: object) -> VMSpec:
    pod1 = {"name": "pod1", "run_dir": Path("/run/carapace/pod1"), "shared_fs": "virtio-fs"}
    return make_spec(**{**pod1, **kw})


def fake_identity(path: str | Path) -> dict[str, object]:
    return {"path": str(path)}


def test_a_pool_vm_has_no_nic_no_share_device_and_every_module() -> None:
    pod = spec(nics=(TapNic("net0", "02:00:00:00:00:01", 9),), extra_args=("-S",))
    base = pool_base(pod, 2)
    assert base.nics == () and base.nic_slots == 2 + MAX_CLONE_NICS
    vm = pool_vm_spec(base, Path("/run/carapace/.pool/3"), pool_vm_name(77, 3))
    assert vm.nics == () and vm.extra_args == ()
    assert vm.hotplug_share  # the pod hot-adds its own virtio-fs device
    assert ALL_MODULES_PARAM in vm.kernel_params.split()
    assert vm.agent_socket.parent == Path("/run/carapace/.pool/3")
    assert (vm.vcpus, vm.memory_mib, vm.kernel) == (1, 1024, pod.kernel)
    # the pod's view of the same VM: its own run dir, its own name
    own = pool_vm_spec(base, pod.run_dir, pod.name)
    assert own.agent_socket.parent == pod.run_dir and own.vm_name == vm_name("pod1")


def test_the_pool_key_is_the_command_line_without_paths() -> None:
    a = pool_key("/usr/bin/qemu", pool_base(spec(), 2), vm_command_line, fake_identity)
    b = pool_key(
        "/usr/bin/qemu",
        pool_base(spec(name="other", run_dir=Path("/run/carapace/other")), 2),
        vm_command_line,
        fake_identity,
    )
    assert a[0] == b[0]  # another pod of the same shape
    bigger = pool_key("/usr/bin/qemu", pool_base(spec(vcpus=2), 2), vm_command_line, fake_identity)
    assert bigger[0] != a[0]
    other_initrd = pool_key(
        "/usr/bin/qemu", pool_base(spec(initrd=Path("/x")), 2), vm_command_line, fake_identity
    )
    assert other_initrd[0] != a[0]
    # never a template's key, though a template has the same shape
    assert (
        template_key("/usr/bin/qemu", pool_base(spec(), 2), vm_command_line, fake_identity)[0]
        != a[0]
    )


def test_only_virtio_fs_pods_take_pool_vms() -> None:
    assert why_not_pooled(spec()) is None
    why = why_not_pooled(spec(shared_fs="virtio-9p"))
    assert why is not None and "virtio-9p" in why


def test_a_pool_vm_name_is_never_a_pods() -> None:
    name = pool_vm_name(123, 4)
    assert ID_RE.fullmatch(name) is None  # no sandbox can be called so
    assert is_pool_vm_name(vm_name(name))
    assert not is_pool_vm_name(vm_name("pool-123-4"))
    assert not is_pool_vm_name(vm_name("pod1"))
    assert not is_pool_vm_name(vm_name(name) + "x")
    assert not is_pool_vm_name("")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"op": "take"}', "one JSON line"),
        (b"[1]\n", "JSON object"),
        (b"nope\n", "not JSON"),
        (b"{" + b" " * MAX_LINE + b"}\n", "one JSON line"),
    ],
)
def test_a_bad_message_is_refused_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_line(data)


def test_messages_round_trip() -> None:
    msg: dict[str, object] = {"op": "take", "key": "k", "agent_socket": "/run/x/a"}
    assert decode_line(encode_line(msg)) == msg
    with pytest.raises(ValueError, match="most"):
        encode_line({"x": "y" * MAX_LINE})


def test_fds_travel_with_the_answer(tmp_path: Path) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        send_message(left, {"ok": True, "pid": 5}, [r, w])
        answer, fds = receive_message(right)
        assert answer == {"ok": True, "pid": 5}
        assert len(fds) == 2 and set(fds).isdisjoint({r, w})
        os.write(fds[1], b"x")  # the copies are the pipe's ends
        assert os.read(r, 1) == b"x"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


def test_a_pod_asks_for_its_sockets_only_in_its_own_run_dir(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "pod1").mkdir(parents=True)
    ok = socket_target(str(root / "pod1" / "agent.sock"), root, "agent_socket")
    assert ok == root / "pod1" / "agent.sock"
    (root / "pod1" / "taken.sock").touch()
    bad = {
        "relative/agent.sock": "absolute path",
        str(root / "agent.sock"): "a path in a pod's run dir",
        str(root / "pod1" / "sub" / "agent.sock"): "a path in a pod's run dir",
        str(root / "pod1" / ".." / ".." / "agent.sock"): "a path in a pod's run dir",
        str(root / "nopod" / "agent.sock"): "does not exist",
        str(root / "pod1" / "taken.sock"): "exists already",
    }
    for value, why in bad.items():
        with pytest.raises(InvalidArgument, match=why):
            socket_target(value, root, "agent_socket")
    with pytest.raises(InvalidArgument, match="absolute path"):
        socket_target(5, root, "agent_socket")


def test_no_pool_serving_is_an_error_naming_the_endpoint(tmp_path: Path) -> None:
    endpoint = tmp_path / "vmcache.sock"
    with pytest.raises(CarapaceError, match=f"no VM pool serves {endpoint}"):
        take(endpoint, "k", tmp_path / "a", tmp_path / "q")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(endpoint))
    stale.close()  # the file stays, nobody listens
    with pytest.raises(CarapaceError, match="stale"):
        take(endpoint, "k", tmp_path / "a", tmp_path / "q")


def test_the_configuration_keys_of_the_pool() -> None:
    cfg = parse_config('[factory]\nvm_cache_number = 3\nvm_cache_endpoint = "/run/x.sock"\n')
    assert (cfg.factory.vm_cache_number, cfg.factory.vm_cache_endpoint) == (3, "/run/x.sock")
    assert parse_config("").factory.vm_cache_number == 0
    with pytest.raises(InvalidArgument, match="vm_cache_number: 65; accepted: 0"):
        parse_config("[factory]\nvm_cache_number = 65\n")
    with pytest.raises(InvalidArgument, match=r"vm_cache_endpoint: 'x\.sock'; accepted: an abs"):
        parse_config('[factory]\nvm_cache_endpoint = "x.sock"\n')
    long = "/" + "x" * 120
    with pytest.raises(InvalidArgument, match="at most 107 bytes"):
        parse_config(f'[factory]\nvm_cache_endpoint = "{long}"\n')


def test_an_adopted_process_is_waited_for_and_killed_through_its_pidfd() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:

        async def main() -> int:
            p = AdoptedProcess(child.pid, os.pidfd_open(child.pid))
            assert p.returncode is None
            waiter = asyncio.ensure_future(p.wait())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            p.send_signal(signal.SIGKILL)
            # the pidfd turns readable once the child is a zombie: our child here, so
            # reap it (a pool reaps its VMs) and the adopter still sees the exit
            await asyncio.to_thread(child.wait)
            status = await asyncio.wait_for(waiter, 10)
            assert p.returncode == UNKNOWN_STATUS and p.pidfd == -1
            p.send_signal(signal.SIGKILL)  # gone: a no-op, never another process
            return status

        assert asyncio.run(main()) == UNKNOWN_STATUS
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_an_abandoned_handover_kills_its_vm() -> None:
    child = subprocess.Popen(["sleep", "60"])
    a, b = socket.socketpair()
    try:
        agent, agent_peer = socket.socketpair()
        h = Handover(child.pid, os.pidfd_open(child.pid), a, "carapace-pool:1:1", agent)
        h.abandon()
        assert child.wait(10) == -signal.SIGKILL
        assert h.pidfd == -1 and a.fileno() == -1 and agent.fileno() == -1
        assert agent_peer.recv(1) == b""  # the agent connection is closed too
        agent_peer.close()
        # given away first: abandon leaves the VM alone
        child2 = subprocess.Popen(["sleep", "60"])
        c, d = socket.socketpair()
        agent2, _peer2 = socket.socketpair()
        h2 = Handover(child2.pid, os.pidfd_open(child2.pid), c, "carapace-pool:1:2", agent2)
        pid, pidfd, console = h2.give()
        h2.abandon()
        assert child2.poll() is None and pid == child2.pid
        os.close(pidfd)
        os.close(console)
        child2.kill()
        child2.wait()
        d.close()
        _peer2.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        b.close()


def test_one_pool_per_endpoint_serving_its_status(tmp_path: Path) -> None:
    """The pool's serving side with VMs that never boot: its socket is 0600, it answers
    status and refuses a take saying why, a second pool on the endpoint is refused, and
    stopping removes the socket and the pool's directory."""

    def no_vm(binary: str, spec: VMSpec, die_with_owner: bool) -> VM:
        raise OSError("no VM in a unit test")

    def new_pool() -> VMPool:
        return VMPool(
            "/usr/bin/qemu", spec(), "k" * 24, 1, tmp_path / ".pool", tmp_path, no_vm, 5.0
        )

    endpoint = tmp_path / "vmcache.sock"

    async def main() -> None:
        stop = asyncio.Event()
        first = asyncio.ensure_future(new_pool().run(endpoint, stop))
        for _ in range(200):
            if endpoint.exists():
                break
            await asyncio.sleep(0.01)
        assert stat.S_IMODE(endpoint.stat().st_mode) == 0o600
        st = await asyncio.to_thread(status, endpoint)
        assert (st["ok"], st["ready"], st["key"]) == (True, 0, "k" * 24)
        with pytest.raises(CarapaceError, match="another VM shape"):
            await asyncio.to_thread(take, endpoint, "other", tmp_path / "a", tmp_path / "q")
        with pytest.raises(CarapaceError, match=f"a VM pool serves {endpoint} already"):
            await new_pool().run(endpoint, asyncio.Event())
        stop.set()
        await asyncio.wait_for(first, 10)
        assert not endpoint.exists() and not (tmp_path / ".pool").exists()

    asyncio.run(main())
