"""``carapace factory``: the VM templates of the configured ``[factory] template_dir``
(Kata's ``kata-runtime factory init|status|destroy``).

``status`` lists them (key, when built and in how long, the memory file's size on disk,
the QEMU, kernel and initrd they were made from) and says whether pods use them;
``destroy`` removes them all; ``init`` makes the template of the configuration's
default pod by starting one pod with templates on (the pod builds it on first use and
restores it) and ending it again.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carapace.config import Config
from carapace.errors import CarapaceError, HypervisorError

if TYPE_CHECKING:  # imported where used: the parser is built for every command
    from carapace.factory import Template

MiB = 1 << 20
#: The files each template was made from, as its inputs name them.
SOURCES = ("qemu", "kernel", "initrd")


def add_factory_parser(sub: Any) -> None:
    """Register ``factory init|status|destroy`` on the ``carapace`` subparsers."""
    f = sub.add_parser("factory", help="VM templates pods start from: make, list, remove")
    fsub = f.add_subparsers(dest="factory_command", required=True, parser_class=type(f))
    fsub.add_parser("init", help="make the template of the configuration's default pod")
    st = fsub.add_parser("status", help="list the templates and whether pods use them")
    st.add_argument("--json", action="store_true")
    fsub.add_parser("destroy", help="remove every template")
    pool = fsub.add_parser(
        "pool",
        help="keep pre-booted VMs for pods to take (runs until SIGTERM or SIGINT)",
    )
    pool.add_argument(
        "--size",
        type=int,
        default=0,
        help="VMs to keep ready (default: [factory] vm_cache_number)",
    )


def _source_path(inputs: object, name: str) -> str:
    """The path of the file ``name`` in a template's inputs ("" if it has none)."""
    if isinstance(inputs, dict):
        entry = inputs.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            return str(entry["path"])
    return ""


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def template_status(t: Template) -> dict[str, Any]:
    """What ``status`` says of one template: from its template.json and its memory
    file (the memory is the guest RAM the template touched: the blocks on disk)."""
    info = t.info()
    st = t.memory_file.stat()
    return {
        "key": t.key,
        "built": _number(info.get("built")),
        "build_seconds": _number(info.get("build_seconds")),
        "memory_mib_on_disk": round(st.st_blocks * 512 / MiB, 1),
        "guest_memory_mib": round(st.st_size / MiB, 1),
        **{name: _source_path(info.get("inputs"), name) for name in SOURCES},
    }


def factory_status(cfg: Config) -> dict[str, Any]:
    from carapace.factory import TemplateStore

    root = Path(cfg.factory.template_dir)
    templates = []
    for t in TemplateStore(root).templates():
        try:
            templates.append(template_status(t))
        except (OSError, ValueError):  # removed meanwhile
            continue
    return {
        "enabled": cfg.factory.template,
        "config": cfg.source,
        "template_dir": str(root),
        "templates": templates,
    }


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def format_status(status: dict[str, Any]) -> str:
    """``status`` for people: whether pods use templates, then one block per template."""
    enabled = "enabled" if status["enabled"] else "disabled"
    lines = [
        f"templates: {enabled} ([factory] template = {str(status['enabled']).lower()} "
        f"in {status['config'] or 'the defaults'})",
        f"template_dir: {status['template_dir']}",
    ]
    templates = status["templates"]
    if not templates:
        lines.append("no templates")
    for t in templates:
        took = "-" if t["build_seconds"] is None else f"{t['build_seconds']:.1f} s"
        lines.append(
            f"{t['key']}: built {_when(t['built'])} in {took}, memory "
            f"{t['memory_mib_on_disk']:.1f} MiB on disk of {t['guest_memory_mib']:.1f} MiB"
        )
        lines += [f"  {name + ':':<7} {t[name] or '-'}" for name in SOURCES]
    return "\n".join(lines) + "\n"


def format_destroyed(n: int, root: str) -> str:
    return f"removed {n} template{'' if n == 1 else 's'} from {root}\n"


async def init_template(cfg: Config) -> tuple[str, bool]:
    """Make the template of the configuration's default pod: one pod started with
    templates on (it builds the template on first use, then restores it) and ended.
    Returns (its key, whether it was made now)."""
    from carapace.factory import TemplateStore
    from carapace.sandbox import Sandbox, SandboxOptions

    cfg = dataclasses.replace(cfg, factory=dataclasses.replace(cfg.factory, template=True))
    store = TemplateStore(Path(cfg.factory.template_dir))
    before = {t.key for t in store.templates()}
    sandbox = Sandbox(cfg, SandboxOptions())
    try:
        await sandbox.start()
        key = sandbox.template
    finally:
        await asyncio.shield(sandbox.destroy())
    if not key:
        raise HypervisorError(
            f"the pod booted cold, no template was made in {cfg.factory.template_dir} "
            "(the reason is logged above)"
        )
    return key, key not in before


#: Where a pool keeps its VMs' sockets and logs until a pod takes them: in the runtime's
#: run dir (a pod's run dir is beside it, on the same filesystem, so a VM's sockets are
#: renamed into it); a name no sandbox id can have (``ID_RE`` begins alphanumeric).
POOL_DIR = ".pool"


async def serve_pool(cfg: Config, size: int) -> None:
    """The VM pool of the configuration's default pod, until SIGTERM or SIGINT."""
    import signal

    from carapace.daemons import CAP_MKNOD, drop_capabilities
    from carapace.factory.pool import VMPool, pool_key, why_not_pooled
    from carapace.hypervisor import choose_accelerator, new_vm, vm_command_line
    from carapace.sandbox import Sandbox, SandboxOptions
    from carapace.sandbox.plan import NIC_SLOTS
    from carapace.sandbox.restore import pool_base

    hv, rt = cfg.hypervisor, cfg.runtime
    pod = Sandbox(cfg, SandboxOptions())
    kernel, initrd = pod.kernel_initrd()
    accel = choose_accelerator(hv.accel, hv.path, kernel, initrd, Path(rt.state_dir) / "accel.json")
    spec = pod.vm_spec(kernel, initrd, accel.accel, ())
    why = why_not_pooled(spec)
    if why is not None:
        raise CarapaceError(f"no VM pool for this configuration's pods: {why}")
    base = pool_base(spec, NIC_SLOTS)
    key, _ = pool_key(hv.path, base, vm_command_line)
    run_root = Path(rt.run_dir)
    pre_exec = [drop_capabilities(CAP_MKNOD)]
    pool = VMPool(
        hv.path,
        base,
        key,
        size,
        run_root / POOL_DIR,
        run_root,
        new_vm,
        hv.boot_timeout,
        pre_exec,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await pool.run(Path(cfg.factory.vm_cache_endpoint), stop)


def cmd_factory(cfg: Config, args: argparse.Namespace) -> int:
    if args.factory_command == "status":
        status = factory_status(cfg)
        print(json.dumps(status, indent=2) if args.json else format_status(status), end="")
        if args.json:
            print()
        return 0
    if args.factory_command == "destroy":
        from carapace.factory import TemplateStore

        n = TemplateStore(Path(cfg.factory.template_dir)).remove_all()
        print(format_destroyed(n, cfg.factory.template_dir), end="")
        return 0
    if args.factory_command == "init":
        key, made = asyncio.run(init_template(cfg))
        done = "made" if made else "was there already"
        print(f"template {key} {done} in {cfg.factory.template_dir}")
        if not cfg.factory.template:
            print("note: pods start from templates only with [factory] template = true")
        return 0
    if args.factory_command == "pool":
        from carapace.factory.pool import MAX_POOL_SIZE

        size = args.size or cfg.factory.vm_cache_number
        if not 1 <= size <= MAX_POOL_SIZE:
            raise CarapaceError(
                f"pool size {size}; accepted: 1 to {MAX_POOL_SIZE} (--size, or [factory] "
                "vm_cache_number)"
            )
        # a service: what it boots and hands over is logged (stderr), debug or not
        pool_log = logging.getLogger("carapace.factory")
        if not pool_log.isEnabledFor(logging.INFO):
            pool_log.setLevel(logging.INFO)
        asyncio.run(serve_pool(cfg, size))
        return 0
    raise CarapaceError(f"unknown factory command {args.factory_command!r}")
