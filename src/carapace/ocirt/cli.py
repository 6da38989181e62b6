"""runc's command line, for Docker (``--add-runtime``), Podman (``[engine.runtimes]``)
and anyone who drives runc: ``carapace-runtime [global flags] VERB [flags] ID``.

``carapace VERB`` is the same for every runc verb but ``run``, which stays carapace's
own standalone ``run`` unless a runc global flag comes first (``carapace --root R run
ID``). Errors go to stderr and, with ``--log``, to that file (``--log-format json``:
one ``{"level":"error","msg":…}`` line, which Docker shows); the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from carapace import __version__
from carapace.errors import CarapaceError, InvalidArgument
from carapace.ocirt import lifecycle, verbs
from carapace.ocirt.layout import DEFAULT_ROOT, Root
from carapace.protocols import contract

PROG = "carapace-runtime"
VERBS = (
    "create", "start", "run", "state", "kill", "delete", "exec", "ps", "pause", "resume",
    "update", "list", "features", "spec", "events",
)  # fmt: skip
#: Global flags only runc's command line has; the ones carapace's own has too.
RUNC_GLOBAL_FLAGS = ("--root", "--log", "--log-format", "--systemd-cgroup", "--rootless", "--criu")
SHARED_FLAGS = ("--config", "--debug")
SHARED_VALUED = ("--config",)
#: Verbs runc has and carapace cannot do, refused with a reason.
UNSUPPORTED = {
    "checkpoint": "a container's memory lives in its pod's VM; checkpoints are not supported",
    "restore": "a container's memory lives in its pod's VM; checkpoints are not supported",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InvalidArgument(f"{self.prog}: {message}")


def parse_signal(text: str) -> int:
    """A signal as runc's kill takes it: a number, ``KILL`` or ``SIGKILL``."""
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if isinstance(sig, signal.Signals):
            return int(sig)
    raise InvalidArgument(
        f"signal {text[:32]!r} is not valid; accepted: a number 1-{signal.NSIG - 1} or a name "
        "such as TERM, SIGKILL"
    )


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="carapace's runc-compatible command line")
    p.add_argument("--root", default=DEFAULT_ROOT, help="state directory")
    p.add_argument("--log", help="log file (errors, as runc writes them)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted, ignored")
    p.add_argument("--config", help="carapace configuration file (default: CARAPACE_CONFIG)")
    p.add_argument("--rootless", default="auto", help="accepted; carapace runs as root")
    p.add_argument("--criu", help="accepted, unused")
    p.add_argument("-v", "--version", action="store_true")
    sub = p.add_subparsers(dest="verb", parser_class=Parser)

    def container(name: str, **kw: Any) -> Parser:
        s: Parser = sub.add_parser(name, **kw)
        s.add_argument("id")
        return s

    def creating(s: Parser) -> None:
        s.add_argument("-b", "--bundle", default=".")
        s.add_argument("--pid-file")
        s.add_argument("--console-socket")
        s.add_argument("--preserve-fds", type=int, default=0)
        for flag in ("--no-pivot", "--no-new-keyring"):
            s.add_argument(flag, action="store_true", help="accepted (the guest's crun pivots)")

    creating(container("create"))
    container("start")
    r = container("run")
    creating(r)
    r.add_argument("-d", "--detach", action="store_true")
    r.add_argument("--keep", action="store_true")
    r.add_argument("--no-subreaper", action="store_true")
    container("state")
    k = container("kill")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    k.add_argument("-a", "--all", action="store_true")
    d = container("delete")
    d.add_argument("-f", "--force", action="store_true")
    e = container("exec")
    e.add_argument("command", nargs=argparse.REMAINDER)
    e.add_argument("-p", "--process")
    e.add_argument("-d", "--detach", action="store_true")
    e.add_argument("--pid-file")
    e.add_argument("--console-socket")
    e.add_argument("-t", "--tty", action="store_true")
    e.add_argument("--cwd")
    e.add_argument("-e", "--env", action="append", default=[])
    e.add_argument("-u", "--user")
    e.add_argument("--no-new-privs", action="store_true")
    e.add_argument("--preserve-fds", type=int, default=0)
    e.add_argument("-c", "--cap", action="append", default=[])
    ps = container("ps")
    ps.add_argument("-f", "--format", choices=("table", "json"), default="table")
    container("pause")
    container("resume")
    u = container("update")
    u.add_argument("-r", "--resources")
    for flag in verbs.UPDATE_FLAGS:
        u.add_argument("--" + flag.replace("_", "-"), dest=flag)
    ls = sub.add_parser("list")
    ls.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ls.add_argument("-q", "--quiet", action="store_true")
    sub.add_parser("features")
    sp = sub.add_parser("spec")
    sp.add_argument("-b", "--bundle")
    sp.add_argument("--rootless", action="store_true")
    ev = container("events")
    ev.add_argument("--stats", action="store_true")
    ev.add_argument("--interval", type=float, default=5.0)
    for name in UNSUPPORTED:
        s = sub.add_parser(name)
        s.add_argument("rest", nargs=argparse.REMAINDER)
    return p


class ErrorLog:
    """Where errors go: stderr, and the ``--log`` file in its format."""

    def __init__(self, path: str | None, fmt: str) -> None:
        self.path = path
        self.fmt = fmt

    def error(self, message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr)
        if not self.path:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.fmt == "json":
            line = json.dumps({"level": "error", "msg": message, "time": stamp})
        else:
            line = f'time="{stamp}" level=error msg={json.dumps(message)}'
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass


def _exec_args(e: argparse.Namespace) -> list[str]:
    cmd = list(e.command)
    return cmd[1:] if cmd[:1] == ["--"] else cmd


def dispatch(a: argparse.Namespace) -> int:
    g = lifecycle.Globals(Root(a.root), a.config, a.debug)
    out = sys.stdout
    if a.verb in UNSUPPORTED:
        raise InvalidArgument(f"{a.verb}: {UNSUPPORTED[a.verb]}")
    if a.verb == "create":
        lifecycle.create(g, a.id, a.bundle, a.pid_file, a.console_socket, a.preserve_fds)
    elif a.verb == "run":
        return lifecycle.run(
            g, a.id, a.bundle, a.pid_file, a.console_socket, a.detach, a.keep, a.preserve_fds
        )
    elif a.verb == "start":
        lifecycle.start(g, a.id)
    elif a.verb == "state":
        out.write(json.dumps(lifecycle.state(g, a.id), indent=2) + "\n")
    elif a.verb == "kill":
        lifecycle.kill(g, a.id, parse_signal(a.signal), a.all)
    elif a.verb == "delete":
        lifecycle.delete(g, a.id, a.force)
    elif a.verb == "exec":
        if a.preserve_fds:
            raise InvalidArgument(f"--preserve-fds {a.preserve_fds}: accepted: 0")
        if a.cap:
            raise InvalidArgument(
                f"--cap {', '.join(a.cap)}: extra capabilities for an exec are not supported; "
                "accepted: the process's own (--process FILE)"
            )
        process = verbs.exec_spec(
            g, a.id, a.process, _exec_args(a), a.tty, a.cwd, a.env, a.user, a.no_new_privs
        )
        return verbs.exec_process(g, a.id, process, a.detach, a.pid_file, a.console_socket)
    elif a.verb == "ps":
        pids = verbs.ps(g, a.id)
        out.write(json.dumps(pids) + "\n" if a.format == "json" else verbs.ps_table(pids))
    elif a.verb in ("pause", "resume"):
        verbs.pause(g, a.id, resume=a.verb == "resume")
    elif a.verb == "update":
        flags = {name: getattr(a, name) for name in verbs.UPDATE_FLAGS}
        verbs.update(g, a.id, verbs.update_resources(a.resources, flags))
    elif a.verb == "list":
        states = verbs.list_states(g)
        if a.quiet:
            out.write("".join(s["id"] + "\n" for s in states))
        else:
            out.write(json.dumps(states) + "\n" if a.format == "json" else verbs.list_table(states))
    elif a.verb == "features":
        out.write(json.dumps(verbs.features(), indent=2) + "\n")
    elif a.verb == "spec":
        verbs.write_spec(a.bundle)
    elif a.verb == "events":
        verbs.events(g, a.id, a.stats, a.interval, out.write)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    log = ErrorLog(None, "text")
    try:
        a = build_parser().parse_args(args)
        log = ErrorLog(a.log, a.log_format)
        logging.basicConfig(
            level=logging.DEBUG if a.debug else logging.WARNING,
            format=f"{PROG}: %(message)s",
        )
        if a.version:
            print(f"{PROG} version {__version__}\nspec: {contract.OCI_VERSION}")
            return 0
        if not a.verb:
            raise InvalidArgument(f"no command given; accepted: {', '.join(VERBS)}")
        return dispatch(a)
    except CarapaceError as e:
        log.error(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


def is_runc_call(argv: Sequence[str]) -> bool:
    """Whether ``carapace ARGV`` is runc's command line (see the module's doc): a
    runc-only global flag, or a runc verb other than ``run``."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in RUNC_GLOBAL_FLAGS or arg in ("-v", "--version"):
            return True
        if name in SHARED_FLAGS:  # carapace's own too: look past them
            i += 2 if name in SHARED_VALUED and "=" not in arg else 1
            continue
        if arg.startswith("-"):
            return False
        return (arg in VERBS and arg != "run") or arg in UNSUPPORTED
    return False


def carapace_main() -> int:
    """The ``carapace`` command: runc's verbs, else carapace's own commands."""
    if is_runc_call(sys.argv[1:]):
        return main()
    from carapace.cli.main import main as carapace_cli

    return carapace_cli()
