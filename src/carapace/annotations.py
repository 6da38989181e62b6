"""Which of a pod's hypervisor and runtime annotations carapace honours: the
configuration's ``[hypervisor] enable_annotations`` allow-list (pure functions).

A pod's annotations come from whoever writes the pod: in a cluster, its user. The
annotations below change what the host gives the pod (the VM's size, QEMU's open files,
block I/O limits naming host devices), so, as Kata does since kata-containers#902, only
those the administrator enables are honoured, and a pod asking for another is refused
(never silently run without it). The allow-list is a list of Python regular
expressions; a key is enabled when one of them

* matches any part of the key's base name, the part after
  ``com.github.containers.virtcontainers.`` or ``io.katacontainers.config.hypervisor.``
  (Kata's rule: ``"_mem"`` enables ``sandbox_mem``; ``"^sandbox_mem$"`` only it), or
* matches the whole key (``"com\\.github\\.containers\\.virtcontainers\\.files_limit"``).

The default enables only openEuler's ``sandbox_cpu`` and ``sandbox_mem``: openEuler's
"Configuring Resources for a Secure Container" documents them as the way to size a pod,
and the size is capped by the host (``default_maxvcpus``/``default_maxmemory``, by
default the host's usable CPUs and memory) whatever asks for it. The others are off:

* ``blkio_cgroup``: throttles and weights in the sandbox's host cgroup naming host
  block devices (whose paths it makes the host look up); an administrator's tool.
* ``files_limit``: raises QEMU's open files limit on the host (up to the host's cap).
  The spec's own ``linux.resources.files.limit`` (openEuler's ``--files-limit``, which
  the engine writes, not the pod) is not an annotation and is not governed here.
* Kata's ``default_vcpus`` / ``default_memory``: off, as in Kata's own default.

containerd's sizing annotations (``io.kubernetes.cri.sandbox-cpu-*``,
``io.kubernetes.cri.sandbox-memory``) are written by containerd from the pod's limits,
not by the pod (containerd passes a pod's own annotations only when they match its
``pod_annotations``), so they are not governed here; they are capped by the host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from carapace.errors import InvalidArgument, shown
from carapace.protocols.contract import (
    BLKIO_CGROUP,
    FILES_LIMIT,
    KATA_MEMORY,
    KATA_VCPUS,
    SANDBOX_CPU,
    SANDBOX_MEM,
)

#: The annotations the allow-list governs (those carapace acts on that a pod can
#: set), and what each does.
GOVERNED: dict[str, str] = {
    SANDBOX_CPU: "openEuler's: the pod VM's CPUs",
    SANDBOX_MEM: "openEuler's: the pod VM's memory",
    BLKIO_CGROUP: "openEuler's: block I/O limits of host block devices in the host cgroup",
    FILES_LIMIT: "openEuler's: QEMU's open files limit on the host",
    KATA_VCPUS: "Kata's: the pod VM's vCPUs",
    KATA_MEMORY: "Kata's: the pod VM's memory in MiB",
}
#: The namespaces whose base names the patterns match (Kata matches the part after its
#: hypervisor prefix; openEuler's keys live under virtcontainers').
PREFIXES = ("com.github.containers.virtcontainers.", "io.katacontainers.config.hypervisor.")
#: openEuler documents these two: enabled unless the configuration says otherwise.
DEFAULT_ENABLE_ANNOTATIONS: tuple[str, ...] = ("^sandbox_cpu$", "^sandbox_mem$")


def base_name(key: str) -> str:
    """The part of ``key`` after its namespace prefix (the key itself if it has none)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def compile_patterns(patterns: Iterable[object], where: str) -> list[re.Pattern[str]]:
    """The allow-list's expressions compiled; anything that is not a string holding a
    regular expression raises InvalidArgument naming it."""
    out = []
    for i, p in enumerate(patterns):
        if not isinstance(p, str):
            raise InvalidArgument(
                f"{where}[{i}]: {shown(p)} is not a string; accepted: a string holding a "
                "regular expression over annotation names"
            )
        try:
            out.append(re.compile(p))
        except (re.error, OverflowError, RecursionError) as e:
            raise InvalidArgument(
                f"{where}[{i}]: {shown(p)} is not a regular expression ({e}); accepted: "
                "a Python regular expression such as '^sandbox_cpu$'"
            ) from None
    return out


def is_enabled(key: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    """Whether the allow-list enables ``key`` (see the module's doc for the rule)."""
    base = base_name(key)
    return any(p.search(base) is not None or p.fullmatch(key) is not None for p in patterns)


def check_enabled(
    annotations: Mapping[str, object], enable: Sequence[str], owner: str = "the pod"
) -> None:
    """Refuse the first governed annotation the allow-list ``enable`` (configuration
    ``[hypervisor] enable_annotations``) does not enable, naming it and the list."""
    patterns = compile_patterns(enable, "configuration [hypervisor] enable_annotations")
    for key in GOVERNED:
        if key in annotations and not is_enabled(key, patterns):
            listed = "[" + ", ".join(repr(p) for p in enable) + "]"
            raise InvalidArgument(
                f"{owner}: annotation {key}={shown(annotations[key])} is not enabled on this "
                f"host ({GOVERNED[key]}): configuration [hypervisor] enable_annotations = "
                f"{listed} does not match it; accepted: annotations that list matches; an "
                f"administrator enables this one by adding e.g. "
                f"'^{re.escape(base_name(key))}$' to it"
            )
