"""`carapace install containerd`: register the carapace runtime with containerd's CRI.

Adds the tables of deploy/containerd-carapace.toml (kept identical to SNIPPET, a unit
test checks it) to a containerd config of version 2 (containerd 1.6 and 1.7):

- a missing file is created with ``version = 2`` and the tables;
- a file that already has the runtime is left alone and the command says so, so a
  second run changes nothing;
- other runtimes and settings are kept: the snippet is appended as text after
  checking with tomllib that its tables are absent (no TOML writer, the file's
  comments and layout stay as they were), and the result is parsed again before it
  is written, so that a file the snippet cannot be appended to (an inline table for
  the runtimes, say) is refused rather than broken;
- a version 1 (or version 3) config or one that does not parse is an error naming the
  file, and nothing is written;
- the file is replaced atomically (a temporary file in the same directory, fsync,
  rename), keeping its permission bits.

containerd reads its config at start: restart it afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carapace.errors import InvalidArgument

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
RUNTIME_NAME = "carapace"
RUNTIME_TYPE = "io.containerd.carapace.v2"
SHIM_BINARY = "containerd-shim-carapace-v2"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CARAPACE_CONFIG_PATH = "/etc/carapace/configuration.toml"
ANNOTATION_ALLOW_LIST = (
    "io.katacontainers.*",
    "com.github.containers.virtcontainers.*",
    "io.carapace.*",
)
#: Directories a containerd started by systemd has in its PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_TABLE = f'plugins."{CRI_PLUGIN}".containerd.runtimes.{RUNTIME_NAME}'
_ALLOW = "[" + ", ".join(f'"{a}"' for a in ANNOTATION_ALLOW_LIST) + "]"

#: The text appended to the containerd config (and the content of
#: deploy/containerd-carapace.toml).
SNIPPET = f"""\
# carapace: every pod in its own lightweight VM. The runtime handler "carapace" for
# containerd's CRI plugin (config version 2, containerd 1.6/1.7); Kubernetes selects
# it with a RuntimeClass whose handler is "carapace" (deploy/runtimeclass.yaml).
[{_TABLE}]
  runtime_type = "{RUNTIME_TYPE}"
  # annotations of the pod and of its containers passed to the runtime (sizing, tuning)
  pod_annotations = {_ALLOW}
  container_annotations = {_ALLOW}
  # a privileged container gets the VM's devices, never the host's
  privileged_without_host_devices = true
  [{_TABLE}.options]
    ConfigPath = "{CARAPACE_CONFIG_PATH}"
"""


@dataclass
class InstallPlan:
    """What `install containerd` does to one file (computed without touching it)."""

    path: Path
    new_text: str | None  # None: nothing to write
    created: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return self.new_text is not None


def _get(tree: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _runtimes(data: dict[str, Any]) -> Any:
    return _get(data, "plugins", CRI_PLUGIN, "containerd", "runtimes")


def _cri_disabled(data: dict[str, Any]) -> bool:
    disabled = data.get("disabled_plugins", [])
    return isinstance(disabled, list) and bool({"cri", CRI_PLUGIN} & set(disabled))


def _normalized(tree: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """``tree`` without the table at path ``drop`` and without empty tables."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if drop[:1] == (k,) and len(drop) == 1:
            continue
        if isinstance(v, dict):
            v = _normalized(v, drop[1:] if drop[:1] == (k,) else ())
            if not v:
                continue
        out[k] = v
    return out


def _our_table() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(SNIPPET)["plugins"][CRI_PLUGIN]["containerd"]
    return table["runtimes"][RUNTIME_NAME]  # type: ignore[no-any-return]


def plan_containerd_install(path: Path, current: str | None) -> InstallPlan:
    """The change to make to the containerd config ``path`` whose text is ``current``
    (None: the file does not exist). Raises InvalidArgument when it cannot be done."""
    if current is None:
        return InstallPlan(path, f"version = 2\n\n{SNIPPET}", created=True)
    try:
        data = tomllib.loads(current)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(
            f"{path} is not valid TOML ({e}); fix it first, nothing was written"
        ) from e
    version = data.get("version", 1)
    if version != 2:
        seen = f"version = {version!r}" if "version" in data else "no version key (version 1)"
        raise InvalidArgument(
            f"{path} is a containerd config with {seen}; carapace's tables are written for "
            "version 2 (containerd 1.6/1.7): convert the file to version 2 (or move it away "
            "to have a new one created), nothing was written"
        )
    notes: list[str] = []
    if _cri_disabled(data):
        notes.append(
            f"{path} disables the CRI plugin (disabled_plugins): Kubernetes cannot use "
            "the runtime until it is enabled"
        )
    existing = _get(_runtimes(data), RUNTIME_NAME)
    if existing is not None:
        seen_type = existing.get("runtime_type") if isinstance(existing, dict) else existing
        if seen_type != RUNTIME_TYPE or not isinstance(existing, dict):
            raise InvalidArgument(
                f"{path} already has a CRI runtime {RUNTIME_NAME!r} with runtime_type "
                f"{seen_type!r}, not {RUNTIME_TYPE!r}; remove or rename that table, "
                "nothing was written"
            )
        differing = sorted(
            k for k in {*existing, *_our_table()} if existing.get(k) != _our_table().get(k)
        )
        if differing:
            notes.append(
                f"the existing {RUNTIME_NAME!r} runtime differs from "
                f"deploy/containerd-carapace.toml in: {', '.join(differing)} (left as it is)"
            )
        return InstallPlan(path, None, notes=notes)
    sep = (
        ""
        if current == "" or current.endswith("\n\n")
        else "\n"
        if current.endswith("\n")
        else "\n\n"
    )
    new_text = f"{current}{sep}{SNIPPET}"
    try:
        new_data = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(
            f"cannot append carapace's tables to {path}: the result would not parse ({e}); "
            "the file probably defines the CRI runtimes as an inline table. Add the tables "
            "of deploy/containerd-carapace.toml by hand; nothing was written"
        ) from e
    ours = ("plugins", CRI_PLUGIN, "containerd", "runtimes", RUNTIME_NAME)
    if (
        _normalized(new_data, ours) != _normalized(data) or _get(new_data, *ours) != _our_table()
    ):  # defensive: an appended table header cannot change what was there before
        raise InvalidArgument(
            f"appending carapace's tables to {path} would change other settings; add the "
            "tables of deploy/containerd-carapace.toml by hand; nothing was written"
        )
    return InstallPlan(path, new_text, notes=notes)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` via a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def install_containerd(path: Path, *, dry_run: bool = False) -> InstallPlan:
    """Plan and (unless ``dry_run``) apply the change to ``path``."""
    try:
        current: str | None = path.read_text()
    except FileNotFoundError:
        current = None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read {path}: {e}; nothing was written") from e
    plan = plan_containerd_install(path, current)
    if plan.new_text is not None and not dry_run:
        write_atomically(path, plan.new_text)
    return plan


def add_install_parser(sub: Any) -> None:
    """Register `install containerd` on the `carapace` subparsers."""
    i = sub.add_parser("install", help="register carapace with a container engine")
    isub = i.add_subparsers(dest="install_target", required=True, parser_class=type(i))
    c = isub.add_parser("containerd", help="add the carapace runtime to containerd's config")
    c.add_argument(
        "--config",
        dest="containerd_config",  # not --config of carapace itself
        default=str(DEFAULT_CONTAINERD_CONFIG),
        metavar="PATH",
        help=f"containerd config file (default: {DEFAULT_CONTAINERD_CONFIG})",
    )
    c.add_argument("--dry-run", action="store_true", help="show the change, write nothing")


def cmd_install(args: argparse.Namespace) -> int:
    path = Path(args.containerd_config)
    plan = install_containerd(path, dry_run=args.dry_run)
    if not plan.changes:
        print(f"runtime {RUNTIME_NAME!r} is already registered in {path}; nothing changed")
    elif args.dry_run:
        verb = "would create" if plan.created else "would append to"
        added = plan.new_text if plan.created else SNIPPET
        print(f"{verb} {path} (dry run, nothing written):\n\n{added}", end="")
    else:
        verb = "created" if plan.created else "updated"
        print(f"{verb} {path}: runtime {RUNTIME_NAME!r} ({RUNTIME_TYPE}) registered for CRI")
        print("restart containerd to load it (systemctl restart containerd)")
    for note in plan.notes:
        print(f"note: {note}")
    if shutil.which(SHIM_BINARY, path=SYSTEM_PATH) is None:
        print(
            f"note: {SHIM_BINARY} is not in {SYSTEM_PATH}; containerd looks the shim up in "
            "its PATH: link it there (e.g. ln -s $(command -v "
            f"{SHIM_BINARY}) /usr/local/bin/)"
        )
    return 0
