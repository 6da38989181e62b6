"""configuration.toml: schema, defaults and loading.

Looked up at $CARAPACE_CONFIG, else /etc/carapace/configuration.toml; a missing
file means all defaults. Unknown sections or keys are errors, so a typo never
silently does nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carapace.annotations import DEFAULT_ENABLE_ANNOTATIONS, compile_patterns
from carapace.errors import InvalidArgument, shown
from carapace.protocols.contract import (
    SANDBOX_CGROUP_PREFIXES,
    SHARED_FS_KINDS,
    SHARED_FS_VIRTIOFS,
)

DEFAULT_CONFIG_PATH = Path("/etc/carapace/configuration.toml")
ACCELERATORS = ("auto", "kvm", "tcg")
#: The largest integer a key takes (what TOML itself promises: a signed 64-bit one).
INT_MAX = (1 << 63) - 1
#: [hypervisor] tcg_tb_size_mib: the default, and the most QEMU takes on x86_64 hosts.
DEFAULT_TCG_TB_SIZE_MIB = 64
MAX_TCG_TB_SIZE_MIB = 2048


@dataclass
class HypervisorConfig:
    path: str = "/usr/bin/qemu-system-x86_64"
    #: "auto" probes KVM (and caches the verdict); "kvm" or "tcg" force one.
    accel: str = "auto"
    #: Guest image directory (vmlinux, initrd.img, rootfs/); kernel/initrd override files.
    image_dir: str = "/var/lib/carapace/guest"
    kernel: str = ""
    initrd: str = ""
    default_vcpus: float = 1.0
    default_memory: int = 1024  # MiB
    #: Most vCPUs a VM can have (boot size and hotplug headroom): 0 or more than the
    #: host's usable CPUs mean the host's usable CPUs.
    default_maxvcpus: int = 0
    #: Most memory a VM can have, in MiB (boot size and hotplug headroom): 0 or more
    #: than the host's memory mean the host's memory (and never more than 256 GiB).
    default_maxmemory: int = 0
    #: Boot VMs with CPU and memory hotplug headroom (up to default_maxvcpus /
    #: default_maxmemory), so that a running pod can be resized.
    enable_cpu_memory_hotplug: bool = False
    boot_timeout: float = 90.0
    shutdown_timeout: float = 10.0
    kernel_params: str = ""
    #: How the pod's share (rootfs and volumes) reaches the guest: "virtio-fs" (a
    #: virtiofsd per pod; guest memory is a shared memfd) or "virtio-9p" (QEMU's 9p).
    shared_fs: str = SHARED_FS_VIRTIOFS
    #: The virtio-fs daemon.
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    #: The pod annotations carapace honours (Kata's allow-list): regular expressions
    #: over the annotation names carapace acts on (see carapace.annotations); a pod
    #: carrying one that no expression matches is refused.
    enable_annotations: list[str] = field(default_factory=lambda: list(DEFAULT_ENABLE_ANNOTATIONS))
    #: Under TCG, the size of QEMU's translation cache in MiB (``-accel tcg,tb-size=``):
    #: part of every pod's memory. 0 leaves QEMU's own default (1 GiB, filled lazily),
    #: as do VMs with vCPU hotplug headroom (QEMU 7.2 aborts when a hot-added vCPU
    #: finds a small cache used up).
    tcg_tb_size_mib: int = DEFAULT_TCG_TB_SIZE_MIB
    #: Give the VM a virtio-balloon device with free page reporting: memory the guest
    #: frees goes back to the host (Kata's reclaim_guest_freed_memory).
    reclaim_guest_freed_memory: bool = True


@dataclass
class RuntimeConfig:
    run_dir: str = "/run/carapace"
    state_dir: str = "/var/lib/carapace"
    #: Kill the VM when the process that owns the sandbox dies (in-process owners).
    kill_vm_with_owner: bool = True
    #: The sandbox's host cgroup is <pod cgroup>/<prefix><sandbox id> (the pod cgroup is
    #: the parent of the sandbox container's cgroupsPath): "carapace-sandbox-" or Kata's
    #: "kata-sandbox-" for tools that look for that name.
    sandbox_cgroup_prefix: str = "carapace-sandbox-"
    #: true: the shim, QEMU and all its threads live in the sandbox cgroup below the pod
    #: cgroup, which the caller sizes (pod overhead). false (legacy): only the vCPU
    #: threads go into the pod cgroup, limited by the sum of the containers' limits;
    #: QEMU and its other threads go to carapace/<id>, the shim to the sandbox
    #: container's cgroup <pod>/<container_cgroup_prefix><id>. cgroup v1 only.
    sandbox_cgroup_only: bool = True
    container_cgroup_prefix: str = "carapace_"
    #: Seconds a SIGKILL of a process waits for the guest to end it (for the pod's
    #: sandbox container: every process of the pod); after that the shim stops the VM
    #: from the host and reports the pod's processes exited with 137.
    kill_timeout: float = 10.0


#: The most VMs a pool of pre-booted VMs may keep (``factory.pool.MAX_POOL_SIZE``).
MAX_VM_CACHE = 64
#: The longest unix socket path (sun_path holds 108 bytes with its NUL).
MAX_UNIX_PATH = 107


@dataclass
class FactoryConfig:
    """VM templates (Kata's VM factory): pods start by restoring a VM saved once it
    booted to "agent ready", instead of booting their own."""

    #: Start pods from a template (made on first use for each VM shape and image).
    #: Clones share the template's memory copy-on-write (9p) or copy it (virtio-fs).
    template: bool = False
    #: Where templates live: their RAM is a file here, so this must be a tmpfs.
    template_dir: str = "/dev/shm/carapace/templates"
    #: Take pods' VMs from a pool of pre-booted ones (Kata's VMCache) when one is
    #: ready: the number of VMs ``carapace factory pool`` keeps (0: no pool).
    vm_cache_number: int = 0
    #: Where the pool serves (a unix socket) and pods ask it.
    vm_cache_endpoint: str = "/run/carapace/vmcache.sock"


@dataclass
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    source: str = ""

    @property
    def image_dir(self) -> Path:
        return Path(self.hypervisor.image_dir)


def _apply(section: Any, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        f = fields.get(key)
        if f is None:
            raise InvalidArgument(
                f"{where}: unknown key {shown(key)}; accepted: {', '.join(sorted(fields))}"
            )
        current = getattr(section, key)
        expected = type(current)
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if isinstance(value, bool) and expected is not bool:
            ok = False
        if not ok:
            raise InvalidArgument(
                f"{where}.{key}: {shown(value)} is a {type(value).__name__}; expected a "
                f"{expected.__name__}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
            raise InvalidArgument(
                f"{where}.{key}: {shown(value)} is out of range; accepted: a 64-bit integer"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{where}.{key}: {value}; accepted: a finite number")
        if isinstance(value, str) and "\x00" in value:
            raise InvalidArgument(
                f"{where}.{key}: {shown(value)} holds a NUL character; accepted: text without one"
            )
        if isinstance(value, list):
            compile_patterns(value, f"{where}.{key}")
        setattr(section, key, expected(value))


def parse_config(text: str, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, or an int of 4301 digits
        raise InvalidArgument(f"{source}: not valid TOML: {shown(str(e), 200)}") from e
    cfg = Config(source=source)
    sections = {"hypervisor": cfg.hypervisor, "runtime": cfg.runtime, "factory": cfg.factory}
    for name, values in data.items():
        if name not in sections or not isinstance(values, dict):
            raise InvalidArgument(
                f"{source}: unknown section [{name}]; accepted: "
                f"{', '.join('[' + s + ']' for s in sections)}"
            )
        _apply(sections[name], values, f"{source} [{name}]")
    if cfg.hypervisor.accel not in ACCELERATORS:
        raise InvalidArgument(
            f"{source} [hypervisor] accel: {cfg.hypervisor.accel!r}; accepted: "
            f"{', '.join(ACCELERATORS)}"
        )
    if cfg.hypervisor.shared_fs not in SHARED_FS_KINDS:
        raise InvalidArgument(
            f"{source} [hypervisor] shared_fs: {cfg.hypervisor.shared_fs!r}; accepted: "
            f"{', '.join(SHARED_FS_KINDS)}"
        )
    for key in ("boot_timeout", "shutdown_timeout"):
        if getattr(cfg.hypervisor, key) <= 0:
            raise InvalidArgument(
                f"{source} [hypervisor] {key}: {getattr(cfg.hypervisor, key)}; accepted: a "
                "positive number of seconds"
            )
    for key in ("default_maxvcpus", "default_maxmemory"):
        if getattr(cfg.hypervisor, key) < 0:
            raise InvalidArgument(
                f"{source} [hypervisor] {key}: {getattr(cfg.hypervisor, key)}; accepted: 0 "
                "(the host's size) or a positive number"
            )
    if not 0 <= cfg.hypervisor.tcg_tb_size_mib <= MAX_TCG_TB_SIZE_MIB:
        raise InvalidArgument(
            f"{source} [hypervisor] tcg_tb_size_mib: {cfg.hypervisor.tcg_tb_size_mib}; accepted: "
            f"0 (QEMU's default) or MiB from 1 to {MAX_TCG_TB_SIZE_MIB}"
        )
    if not 0 < cfg.runtime.kill_timeout <= 3600:
        raise InvalidArgument(
            f"{source} [runtime] kill_timeout: {cfg.runtime.kill_timeout!r}; accepted: "
            "seconds, more than 0 and at most 3600"
        )
    if not os.path.isabs(cfg.factory.template_dir) or len(cfg.factory.template_dir) > 56:
        raise InvalidArgument(
            f"{source} [factory] template_dir: {cfg.factory.template_dir!r}; accepted: an "
            "absolute path (on a tmpfs) of at most 56 characters (the template VM's "
            "sockets are made below it)"
        )
    if not 0 <= cfg.factory.vm_cache_number <= MAX_VM_CACHE:
        raise InvalidArgument(
            f"{source} [factory] vm_cache_number: {cfg.factory.vm_cache_number}; accepted: 0 "
            f"(no pool) to {MAX_VM_CACHE}"
        )
    endpoint = cfg.factory.vm_cache_endpoint
    if not os.path.isabs(endpoint) or len(endpoint.encode()) > MAX_UNIX_PATH:
        raise InvalidArgument(
            f"{source} [factory] vm_cache_endpoint: {endpoint!r}; accepted: an absolute path "
            f"of at most {MAX_UNIX_PATH} bytes (a unix socket)"
        )
    if cfg.runtime.sandbox_cgroup_prefix not in SANDBOX_CGROUP_PREFIXES:
        raise InvalidArgument(
            f"{source} [runtime] sandbox_cgroup_prefix: {cfg.runtime.sandbox_cgroup_prefix!r}; "
            f"accepted: {', '.join(SANDBOX_CGROUP_PREFIXES)}"
        )
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    """The configuration from ``path``, $CARAPACE_CONFIG or the default location."""
    if path is None:
        env = os.environ.get("CARAPACE_CONFIG")
        path = Path(env) if env else DEFAULT_CONFIG_PATH
        if not env and not path.exists():
            return Config(source="defaults")
    p = Path(path)
    if p == DEFAULT_CONFIG_PATH and not p.exists():
        return Config(source="defaults")  # the default location may hold nothing
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read configuration {p}: {e.strerror}") from e
    return parse_config(text, str(p))
