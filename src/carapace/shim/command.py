"""The shim binary's command line, as containerd runs it (``-namespace … -id …
start``), and where a pod's shim listens. Light on purpose: containerd runs the binary
for every container's start and delete and waits for it, so what those need imports
only the standard library (``carapace.shim.main``)."""

from __future__ import annotations

import hashlib
import socket

from carapace.errors import InvalidArgument

#: Where shim sockets live (one per pod).
SOCKET_DIR = "/run/carapace-shim"
#: The environment variable naming the serving daemon's listening socket's descriptor.
LISTEN_FD_ENV = "CARAPACE_SHIM_LISTEN_FD"

_STRING_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
_BOOL_FLAGS = {"debug", "v"}
ACTIONS = ("start", "delete")
#: The boolean spellings Go's flag package accepts.
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


class ShimArgs:
    """The flags and the action of one run of the binary (a plain class: ``dataclasses``
    would cost each start and delete its import)."""

    def __init__(
        self,
        namespace: str = "",
        address: str = "",
        publish_binary: str = "",
        id: str = "",
        bundle: str = "",
        socket: str = "",
        debug: bool = False,
        version: bool = False,
        action: str = "",  # "start", "delete", or "" for the serving daemon
    ) -> None:
        self.namespace = namespace
        self.address = address
        self.publish_binary = publish_binary
        self.id = id
        self.bundle = bundle
        self.socket = socket
        self.debug = debug
        self.version = version
        self.action = action

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShimArgs) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"ShimArgs({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def parse_args(argv: list[str]) -> ShimArgs:
    """Parse a shim command line the way Go's flag package does (``-k v``, ``-k=v``,
    ``--k v``, booleans bare), followed by at most one action."""
    out = ShimArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            rest = argv[i:]
            if len(rest) > 1 or (rest and rest[0] not in ACTIONS):
                raise InvalidArgument(
                    f"unexpected arguments {rest!r}; accepted: one of {', '.join(ACTIONS)}"
                )
            out.action = rest[0] if rest else ""
            return out
        name, eq, value = arg.removeprefix("-").removeprefix("-").partition("=")
        if name in _BOOL_FLAGS:
            if eq and value not in _GO_BOOLS:
                raise InvalidArgument(
                    f"flag -{name}={value!r}: accepted: {', '.join(sorted(_GO_BOOLS))}"
                )
            flag = _GO_BOOLS[value] if eq else True
            if name == "debug":
                out.debug = flag
            else:
                out.version = flag
        elif name in _STRING_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise InvalidArgument(f"flag -{name} needs a value")
                value = argv[i]
            setattr(out, name.replace("-", "_"), value)
        else:
            raise InvalidArgument(
                f"unknown flag {arg!r}; accepted: "
                + ", ".join(f"-{f}" for f in sorted(_STRING_FLAGS | _BOOL_FLAGS))
            )
        i += 1
    return out


def connectable(path: str) -> bool:
    """Whether something answers on the unix socket ``path`` (a serving shim)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def socket_path(address: str, namespace: str, group: str, root: str = SOCKET_DIR) -> str:
    """The pod's shim socket: a hash of containerd's address, the namespace and the pod,
    so two containerds or namespaces never share a shim."""
    digest = hashlib.sha256(f"{address}\0{namespace}\0{group}".encode()).hexdigest()[:32]
    return f"{root}/{digest}.sock"
