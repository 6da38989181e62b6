"""The `carapace` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NoReturn

from carapace.config import Config, load_config
from carapace.errors import CarapaceError, InvalidArgument, NotFound, StateError

log = logging.getLogger("carapace")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are CarapaceErrors (one line, exit status 125)."""

    def error(self, message: str) -> NoReturn:
        raise InvalidArgument(message if self.prog == "carapace" else f"{self.prog}: {message}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="carapace", description="Run containers in lightweight VMs.")
    p.add_argument(
        "--config",
        help="configuration.toml (default: $CARAPACE_CONFIG or /etc/carapace/configuration.toml)",
    )
    p.add_argument("--debug", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    r = sub.add_parser("run", help="run a command in a container in a new pod VM")
    r.add_argument("--cpus", help="CPUs of the pod VM, 0.5 to the host's CPUs (e.g. 1, 2, 0.5)")
    r.add_argument("--memory", "-m", help="memory of the pod VM, 1G to 256G (e.g. 1G, 2048m)")
    r.add_argument(
        "--annotation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an OCI annotation of the container, which is also the pod's sandbox container "
        "(e.g. com.github.containers.virtcontainers.sandbox_cpu=2)",
    )
    r.add_argument(
        "--files-limit",
        type=int,
        help="open files limit of the hypervisor process (0: fs.file-max / 400; below 1024: 1024)",
    )
    r.add_argument(
        "--net",
        help="the pod's network: none (default: loopback only), user (user-mode NAT; "
        "see -p) or netns:PATH (the interfaces of an existing network namespace)",
    )
    r.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[IP:]HOSTPORT:GUESTPORT[/tcp|udp]",
        help="forward a host port into the pod (--net user; bound to 127.0.0.1 by default)",
    )
    r.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="HOST:GUEST[:ro|:rw]",
        help="bind a host directory or file into the container (shared with the pod VM)",
    )
    src = r.add_mutually_exclusive_group()
    src.add_argument("--rootfs", help="root filesystem directory (default: built-in busybox)")
    src.add_argument("--bundle", help="OCI bundle directory (config.json + rootfs)")
    r.add_argument("-i", "--interactive", action="store_true", help="relay stdin")
    r.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    r.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("-w", "--workdir", default="/", help="working directory in the container")
    r.add_argument("--name", help="sandbox id (default: random)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")

    c = sub.add_parser("check", help="what this host has and lacks")
    c.add_argument("--json", action="store_true")

    g = sub.add_parser("guest", help="the guest image")
    gsub = g.add_subparsers(dest="guest_command", required=True, parser_class=ArgumentParser)
    gb = gsub.add_parser("build", help="build the guest kernel + initramfs")
    gb.add_argument("--force", action="store_true", help="rebuild even if up to date")
    gb.add_argument("--dir", help="output directory (default: [hypervisor] image_dir)")
    gsub.add_parser("info", help="show the guest image manifest")

    sub.add_parser("gc", help="clean sandboxes whose owner process died")
    ov = sub.add_parser(
        "overhead", help="measure a pod's host cost and recommend RuntimeClass overhead"
    )
    ov.add_argument("--idle-seconds", type=float, default=10.0)
    ov.add_argument("--load-seconds", type=float, default=5.0)
    ov.add_argument("--json", action="store_true")
    st = sub.add_parser("stats", help="a sandbox's host cost, from its host cgroup")
    st.add_argument("sandbox", help="sandbox id (a CRI pod's id for the shim)")
    st.add_argument("--json", action="store_true")
    from carapace.cli.factory import add_factory_parser
    from carapace.cli.install import add_install_parser

    add_factory_parser(sub)
    add_install_parser(sub)
    return p


# -- run ----------------------------------------------------------------------------


def _stdin_chunks() -> AsyncIterator[bytes]:
    """stdin as an async iterator, read by a daemon thread (works for ttys, pipes, files)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    def reader() -> None:
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            fut = asyncio.run_coroutine_threadsafe(queue.put(data), loop)
            try:
                fut.result()
            except Exception:
                return
            if not data:
                return

    threading.Thread(target=reader, daemon=True, name="stdin").start()

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            data = await queue.get()
            if not data:
                return
            yield data

    return chunks()


def _writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    return write


def _annotations(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(
                f"--annotation {item!r}: accepted: KEY=VALUE (e.g. "
                "com.github.containers.virtcontainers.sandbox_mem=2G)"
            )
        out[key] = value
    return out


async def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from carapace.oci import Bundle, Spec
    from carapace.oci.spec import default_spec, parse_env
    from carapace.sandbox import ProcessIO, Sandbox, SandboxOptions
    from carapace.sandbox.netplan import port_forwards
    from carapace.storage.volumes import parse_volume

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    parse_env(args.env)
    rootfs: Path | None = None  # None: the guest image's busybox
    if args.bundle:
        bundle = Bundle.load(args.bundle, rootfs_inside=False)  # as runc's run
        spec, rootfs = bundle.spec, bundle.rootfs
        if cmd:
            spec = spec.with_args(cmd)
        spec = spec.with_terminal(bool(args.tty))
    else:
        if args.rootfs:
            rootfs = Path(args.rootfs)
            if not rootfs.is_dir():
                raise NotFound(f"--rootfs {args.rootfs}: no such directory")
        if not cmd:
            raise InvalidArgument("run: no command given; usage: carapace run [OPTIONS] -- CMD")
        spec = Spec.from_dict(
            default_spec(cmd, env=args.env, cwd=args.workdir, terminal=args.tty), "carapace run"
        )
    # the container is also the pod's sandbox container: its annotations are the pod's
    spec = spec.with_annotations(_annotations(args.annotation))
    spec = spec.with_mounts(spec.mounts + tuple(parse_volume(v) for v in args.volume))
    sandbox = Sandbox(
        cfg,
        SandboxOptions(
            cpus=args.cpus,
            memory=args.memory,
            sandbox_id=args.name,
            sandbox_spec=spec,
            files_limit=args.files_limit,
            net=args.net,
            ports=port_forwards(args.publish),
        ),
    )
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    cid = "main"
    signals_seen = 0
    background: set[asyncio.Future[None]] = set()

    def spawn(coro: Awaitable[None]) -> None:
        fut = asyncio.ensure_future(coro)
        background.add(fut)
        fut.add_done_callback(background.discard)

    async def forward(sig: signal.Signals) -> None:
        try:
            await sandbox.kill(cid, sig)
        except CarapaceError:  # no container (yet, or any more) to take it: abort
            main_task.cancel()

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            spawn(forward(sig))
        else:
            main_task.cancel()

    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, on_signal, s)
    saved_tty = None
    io = ProcessIO(stdout=_writer(1), stderr=_writer(2))
    if args.interactive or args.tty:
        io.stdin = _stdin_chunks()
    if args.tty and os.isatty(0):
        saved_tty = termios.tcgetattr(0)

        def on_started(resize: Callable[[int, int], Awaitable[None]]) -> None:
            def winch() -> None:
                size = os.get_terminal_size(0)
                spawn(resize(size.lines, size.columns))

            loop.add_signal_handler(signal.SIGWINCH, winch)
            winch()

        io.on_started = on_started
    try:
        await sandbox.start()
        if saved_tty is not None:
            tty.setraw(0)
        return await sandbox.run(
            spec=spec, rootfs=rootfs, overlay=not args.bundle, io=io, container_id=cid
        )
    finally:
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
        await asyncio.shield(sandbox.destroy())


# -- check ----------------------------------------------------------------------------


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    from carapace.hostcheck import host_checks, ready

    results = host_checks(cfg)
    verdict = ready(results)
    if args.json:
        checks = [r.to_dict() for r in results]
        print(json.dumps({"ready": verdict, "checks": checks}, indent=2))
    else:
        for r in results:
            print(f"{'ok ' if r.ok else 'NO '} {r.name:14} {r.detail}")
        print(
            "verdict: ready to run pods"
            if verdict
            else "verdict: NOT ready (see the NO lines above)"
        )
    return 0 if verdict else 1


# -- guest, gc ----------------------------------------------------------------------------


def cmd_guest(cfg: Config, args: argparse.Namespace) -> int:
    if args.guest_command == "build":
        from carapace.image.builder import ImageBuilder

        out = Path(args.dir) if args.dir else cfg.image_dir
        ImageBuilder(out, progress=lambda m: print(m, file=sys.stderr, flush=True)).build(
            force=args.force
        )
        return 0
    from carapace.image.store import current_image

    img = current_image(cfg.image_dir)
    if img is None:
        raise NotFound(f"no guest image in {cfg.image_dir}; run `carapace guest build`")
    print(json.dumps(img.manifest, indent=2))
    return 0


def cmd_gc(cfg: Config, args: argparse.Namespace) -> int:
    from carapace.sandbox.state import release, stale_sandboxes

    status = 0
    for rec in stale_sandboxes(Path(cfg.runtime.run_dir)):
        problems = release(rec, cfg.runtime.run_dir)
        if problems:
            status = 1
            print(f"{rec.id}: {'; '.join(problems)}", file=sys.stderr)
        else:
            print(f"removed sandbox {rec.id}")
    return status


def cmd_stats(cfg: Config, args: argparse.Namespace) -> int:
    from carapace.hostcgroup import CgroupHandle
    from carapace.network.stats import record_network_stats
    from carapace.sandbox.state import SandboxRecord

    run_dir = Path(cfg.runtime.run_dir) / args.sandbox
    try:
        rec = SandboxRecord.load(run_dir)
    except FileNotFoundError:
        raise NotFound(f"no sandbox {args.sandbox!r} (nothing in {run_dir})") from None
    except (OSError, ValueError, TypeError) as e:
        raise StateError(f"sandbox {args.sandbox}: unreadable state: {e}") from e
    if not rec.cgroup:
        raise StateError(f"sandbox {args.sandbox} has no host cgroup (state {rec.state})")
    handle = CgroupHandle.from_record(rec.cgroup)
    stats = handle.stats()
    out = {
        "sandbox": rec.id,
        "cgroup": handle.path,
        "cpu_usage_ns": stats.cpu_usage_ns,
        "memory_bytes": stats.memory_bytes,
        "pids": stats.pids,
        "vcpus": rec.vcpus,
        "vm_memory_mib": rec.memory_mib,
    }
    network = [dataclasses.asdict(n) for n in record_network_stats(rec.network)]
    if args.json:
        print(json.dumps({**out, "network": network}, indent=2))
    else:
        for key, value in out.items():
            print(f"{key + ':':<15} {'-' if value is None else value}")
        for n in network:
            print(
                f"{'network:':<15} {n['name']} rx {n['rx_bytes']} bytes {n['rx_packets']} "
                f"packets, tx {n['tx_bytes']} bytes {n['tx_packets']} packets"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s"
        )
        if args.command == "install":  # needs no carapace configuration
            from carapace.cli.install import cmd_install

            return cmd_install(args)
        cfg = load_config(args.config)
        if args.command == "run":
            return asyncio.run(cmd_run(cfg, args))
        if args.command == "check":
            return cmd_check(cfg, args)
        if args.command == "guest":
            return cmd_guest(cfg, args)
        if args.command == "gc":
            return cmd_gc(cfg, args)
        if args.command == "stats":
            return cmd_stats(cfg, args)
        if args.command == "factory":
            from carapace.cli.factory import cmd_factory

            return cmd_factory(cfg, args)
        if args.command == "overhead":
            from carapace.cli.overhead import cmd_overhead

            return cmd_overhead(cfg, args.idle_seconds, args.load_seconds, args.json)
        raise InvalidArgument(f"unknown command {args.command!r}")
    except CarapaceError as e:
        print(f"carapace: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
