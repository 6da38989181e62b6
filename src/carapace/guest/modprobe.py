"""The guest's modprobe, and the loading of a kernel module.

The guest kernel runs the program ``/proc/sys/kernel/modprobe`` names as
``modprobe -q -- NAME`` when a workload first needs what a module provides
(request_module): a link kind (``rtnl-link-bridge``), an nf_tables chain or
expression (``nft-chain-2-nat``, ``nft-expr-target``), an x_tables target
(``ipt_REDIRECT``), a netlink family (``net-pf-16-proto-12``), a filesystem
(``fs-overlay``), a device (``char-major-10-200``). The calling syscall waits for it.

The image installs this module's script as ``PROGRAM``, not at the kernel's default
/sbin/modprobe, and the agent names it in ``/proc/sys/kernel/modprobe`` when it starts
(``sysinit.early_init``): the kernel's own requests while it boots (crypto templates
it has built in: ``crypto-hmac(sha256)``...) then fail at once, as they did without a
modprobe, instead of each starting a Python on the way to the agent (seconds under TCG).

NAME is resolved as kmod's modprobe does: a module named so in ``modules.dep``, else
the modules ``modules.alias`` gives for it (``-`` and ``_`` are one character outside
brackets); a pattern with ``*?[`` (a device's modalias) is matched as a glob only when
no alias matches exactly (the kernel's requests are exact names). Each module is
loaded after the modules ``modules.dep`` says it needs and the ``pre:`` modules (names
or aliases) of its ``modules.softdep`` line, ``post:`` ones after it (a soft
dependency that is missing or fails is logged and skipped, as kmod does); a module
whose ``/sys/module/<name>/initstate`` exists is loaded (or loading) already and is
skipped. The image ships these three files for the modules it carries
(``carapace.image.kmod``). A module file ending ``.gz`` is inflated in memory and
handed to init_module(2); a plain ``.ko`` goes to finit_module(2).

Stdlib only and lean (no logging, argparse, dataclasses or typing): the kernel, and
the workload's syscall, wait while it starts. It says what it did in the kernel log
(/dev/kmsg): ``info`` for a load, with the time since exec, ``warning`` for a failure;
and on stderr, if it has one, unless -q.
"""

from __future__ import annotations

import errno
import os
import sys
import time

#: Where the image puts the modprobe script (``carapace.image.kmod.modprobe_script``).
PROGRAM = "/usr/lib/carapace/modprobe"
#: The kernel's setting naming the program request_module runs.
KERNEL_MODPROBE = "/proc/sys/kernel/modprobe"
SYS_INIT_MODULE = 175  # x86_64
SYS_FINIT_MODULE = 313
MODULE_SUFFIXES = (".ko.gz", ".ko.xz", ".ko.zst", ".ko")
SYSFS_MODULE = "/sys/module"
KMSG = "/dev/kmsg"
TAG = "carapace-modprobe"
USAGE = "usage: modprobe [-q] [-v] [-n] [-D] [-a] [--] NAME..."


def load_module(path: str, params: str = "") -> None:
    """Load the module file at ``path`` (gzip-compressed when it ends ``.gz``); a module
    loaded already is no error. Raises OSError naming the file."""
    import ctypes  # here: a request that resolves to nothing never pays for it

    libc = ctypes.CDLL(None, use_errno=True)  # the program's own handle: no file opened
    try:
        if path.endswith(".gz"):
            import zlib

            with open(path, "rb") as f:
                data = f.read()
            try:
                image = zlib.decompress(data, 16 + zlib.MAX_WBITS)
            except zlib.error as e:
                raise OSError(errno.ENOEXEC, f"cannot inflate it: {e}") from None
            rc = libc.syscall(SYS_INIT_MODULE, image, ctypes.c_ulong(len(image)), params.encode())
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                rc = libc.syscall(SYS_FINIT_MODULE, fd, params.encode(), 0)
            finally:
                os.close(fd)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise OSError(e.errno, f"loading {path}: {e.strerror}") from None


def module_name(path: str) -> str:
    """The module a file holds, from its name: ``kernel/net/bridge/br_netfilter.ko.gz``
    is br_netfilter (``-`` read as ``_``)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def normalize(name: str) -> str:
    """An alias or module name as kmod compares them: ``-`` is ``_`` except inside
    ``[...]`` (a glob's character class)."""
    if "[" not in name:
        return name.replace("-", "_")
    out: list[str] = []
    depth = 0
    for c in name:
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        out.append("_" if c == "-" and not depth else c)
    return "".join(out)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def glob_match(name: str, pattern: str) -> bool:
    """fnmatch's ``*``, ``?`` and ``[...]`` (``[!...]``, ranges), case-sensitive, without
    importing fnmatch and re (whose start costs more than the rest of modprobe)."""
    if not pattern:
        return not name
    c = pattern[0]
    if c == "*":
        return any(glob_match(name[i:], pattern[1:]) for i in range(len(name) + 1))
    if not name:
        return False
    if c == "?":
        return glob_match(name[1:], pattern[1:])
    if c == "[" and "]" in pattern[2:]:
        end = pattern.index("]", 2)
        body, negate = pattern[1:end], False
        if body[0] in "!^":
            body, negate = body[1:], True
        hit, i = False, 0
        while i < len(body):
            if i + 2 < len(body) and body[i + 1] == "-":
                hit = hit or body[i] <= name[0] <= body[i + 2]
                i += 3
            else:
                hit = hit or body[i] == name[0]
                i += 1
        return hit != negate and glob_match(name[1:], pattern[end + 1 :])
    return c == name[0] and glob_match(name[1:], pattern[1:])


class ModuleIndex:
    """What ``modules.dep``, ``modules.alias`` and ``modules.softdep`` say, by module."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}  # module -> its file, relative to the directory
        self._needs: dict[str, str] = {}  # module -> its modules.dep line's dependencies
        self.aliases: dict[str, list[str]] = {}  # alias -> modules
        self.patterns: list[tuple[str, str]] = []  # (glob, module)
        self.pre: dict[str, list[str]] = {}  # module -> softdep pre: (names or aliases)
        self.post: dict[str, list[str]] = {}  # module -> softdep post:

    @classmethod
    def parse(
        cls, modules_dep: str, modules_alias: str = "", modules_softdep: str = ""
    ) -> ModuleIndex:
        index = cls()
        for line in modules_dep.splitlines():
            path, colon, rest = line.partition(":")
            if not colon or not path.strip():
                continue
            name = module_name(path.strip())
            index.paths[name] = path.strip()
            index._needs[name] = rest  # read when needed (``needs``): most never are
        for line in modules_alias.splitlines():
            words = line.split()
            if len(words) != 3 or words[0] != "alias":
                continue
            alias, module = normalize(words[1]), module_name(words[2])
            if _is_glob(alias):
                index.patterns.append((alias, module))
            else:
                index.aliases.setdefault(alias, []).append(module)
        for line in modules_softdep.splitlines():
            words = line.split()
            if len(words) < 2 or words[0] != "softdep":
                continue
            module, where = module_name(words[1]), None
            for w in words[2:]:
                if w in ("pre:", "post:"):
                    where = index.pre if w == "pre:" else index.post
                elif where is not None:
                    where.setdefault(module, []).append(normalize(w))
        return index

    @classmethod
    def read(cls, moddir: str) -> ModuleIndex:
        """The index of ``moddir`` (``/lib/modules/<release>``); the alias and softdep
        files may be missing, modules.dep may not."""
        texts = []
        for name in ("modules.dep", "modules.alias", "modules.softdep"):
            try:
                with open(os.path.join(moddir, name)) as f:
                    texts.append(f.read())
            except FileNotFoundError:
                if name == "modules.dep":
                    raise
                texts.append("")
        return cls.parse(*texts)

    def resolve(self, name: str) -> list[str]:
        """The modules ``name`` stands for: itself if a module has that name, else the
        modules its exact aliases name, else those of the glob aliases it matches (each
        once, in file order); [] if none."""
        key = normalize(name)
        if key in self.paths:
            return [key]
        found = list(self.aliases.get(key, []))
        if not found:
            found = [m for pattern, m in self.patterns if glob_match(key, pattern)]
        return [m for i, m in enumerate(found) if m in self.paths and m not in found[:i]]

    def load_order(self, modules: list[str]) -> list[str]:
        """``modules`` and what they need, each after what it needs (modules.dep, then
        softdep ``pre:`` ahead of and ``post:`` after the module); each module once.
        Raises LookupError for a module modules.dep does not list (a dependency
        included: the index is cut short) and for a dependency cycle."""
        order: list[str] = []
        visiting: list[str] = []

        def visit(name: str, soft: bool) -> None:
            if name in order:
                return
            if name in visiting:
                if soft:
                    return  # soft dependencies may go both ways
                raise LookupError(f"modules.dep has a dependency cycle through {name}")
            if name not in self.paths:
                raise LookupError(f"module {name} is not in modules.dep")
            visiting.append(name)
            for soft_dep in self.pre.get(name, []):
                for dep in self.resolve(soft_dep):
                    visit(dep, True)
            for dep in self.needs(name):
                visit(dep, False)
            if name not in order:
                order.append(name)
            for soft_dep in self.post.get(name, []):
                for dep in self.resolve(soft_dep):
                    visit(dep, True)
            visiting.pop()

        for m in modules:
            visit(m, False)
        return order

    def needs(self, name: str) -> list[str]:
        """The modules ``name`` depends on directly (its modules.dep line)."""
        return [module_name(p) for p in self._needs.get(name, "").split()]

    def dependencies(self, name: str) -> set[str]:
        """Every module ``name`` needs through modules.dep (not itself)."""
        seen: set[str] = set()
        todo = self.needs(name)
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += self.needs(m)
        return seen


def is_loaded(name: str, sysfs: str = SYSFS_MODULE) -> bool:
    """Whether module ``name`` is loaded or loading (its /sys/module/<name>/initstate
    exists; a built-in module has none)."""
    return os.path.exists(os.path.join(sysfs, name, "initstate"))


class Options:
    def __init__(self) -> None:
        self.quiet = False
        self.verbose = False
        self.dry_run = False
        self.show_depends = False
        self.names: list[str] = []


def parse_args(argv: list[str]) -> Options:
    """modprobe's options that the kernel and a person use; ValueError otherwise."""
    opts = Options()
    flags = {"q": "quiet", "v": "verbose", "n": "dry_run", "D": "show_depends", "a": ""}
    long = {"--quiet": "q", "--verbose": "v", "--dry-run": "n", "--show-depends": "D", "--all": "a"}
    many = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.names += args
            break
        if arg in long:
            arg = "-" + long[arg]
        if arg.startswith("-") and len(arg) > 1:
            for c in arg[1:]:
                if c not in flags:
                    raise ValueError(
                        f"option {arg!r} is not supported; accepted: -q, -v, -n, -D, -a, "
                        f"--quiet, --verbose, --dry-run, --show-depends, --all, --\n{USAGE}"
                    )
                if flags[c]:
                    setattr(opts, flags[c], True)
                else:
                    many = True
            continue
        opts.names.append(arg)
    if not opts.names:
        raise ValueError(f"no module name given\n{USAGE}")
    if not many and len(opts.names) > 1:
        # modprobe NAME PARAM=VALUE...: parameters are not supported
        raise ValueError(
            f"module parameters {' '.join(opts.names[1:])!r} are not supported; "
            f"accepted: one NAME (or -a NAME...)\n{USAGE}"
        )
    return opts


class Log:
    """Lines for the kernel log (``kmsg``, if any) and stderr (unless quiet)."""

    def __init__(self, quiet: bool, kmsg: str | None = KMSG) -> None:
        self.quiet = quiet
        self.kmsg = kmsg

    def __call__(self, level: int, message: str) -> None:
        if not self.quiet and sys.stderr is not None:
            print(f"modprobe: {message}", file=sys.stderr)
        if self.kmsg:
            self._kmsg(f"<{level}>{TAG}: {message}\n".encode(errors="replace"))

    def _kmsg(self, record: bytes) -> None:
        assert self.kmsg
        try:
            fd = os.open(self.kmsg, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            return  # no kernel log to write to: stderr said it, if anything can
        try:
            os.write(fd, record)
        except OSError:
            return
        finally:
            os.close(fd)


def since_exec() -> float:
    """Seconds since this process was exec'd (start time from /proc, 10 ms steps)."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError):
        return -1.0


def main(
    argv: list[str] | None = None,
    moddir: str | None = None,
    sysfs: str = SYSFS_MODULE,
    kmsg: str | None = KMSG,
) -> int:
    """modprobe's command line (``argv``: the arguments after the program name); the
    exit status. ``moddir``, ``sysfs``, ``kmsg``: where the module index, the loaded
    modules and the kernel log are (the guest's own by default)."""
    started = since_exec()  # what starting Python and importing this module took
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(args)
    except ValueError as e:
        if sys.stderr is not None:
            print(f"modprobe: {e}", file=sys.stderr)
        return 1
    log = Log(opts.quiet, None if opts.dry_run or opts.show_depends else kmsg)
    moddir = moddir or f"/lib/modules/{os.uname().release}"
    try:
        index = ModuleIndex.read(moddir)
    except OSError as e:
        log(4, f"cannot read {moddir}/modules.dep: {e.strerror}")
        return 1
    status = 0
    for name in opts.names:
        modules = index.resolve(name)
        if not modules:
            # the kernel asks for names that no module provides; kmod -q is silent too
            log(6, f"{name}: no module in {moddir} provides it (up {started:.2f} s after exec)")
            status = 1
            continue
        try:
            order = index.load_order(modules)
        except LookupError as e:
            log(4, f"{name}: {e}")
            status = 1
            continue
        needed = set(modules).union(*(index.dependencies(m) for m in modules))
        loaded: list[str] = []
        t0 = time.monotonic()
        for m in order:
            if is_loaded(m, sysfs):
                continue
            path = os.path.join(moddir, index.paths[m])
            if (opts.show_depends or opts.dry_run or opts.verbose) and sys.stdout is not None:
                print(f"insmod {path}")
            if opts.show_depends or opts.dry_run:
                continue
            try:
                load_module(path)
            except OSError as e:
                soft = m not in needed
                log(4, f"{name}: {e.strerror}" + (" (a soft dependency: skipped)" if soft else ""))
                if soft:
                    continue
                status = 1
                break
            loaded.append(m)
        if loaded:
            took = time.monotonic() - t0
            log(
                6,
                f"{name}: loaded {' '.join(loaded)} in {took:.2f} s "
                f"(up {started:.2f} s after exec, done {since_exec():.2f} s after)",
            )
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
