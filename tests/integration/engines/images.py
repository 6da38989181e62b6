"""The shared test image: a busybox root filesystem built from the host's busybox-static
and imported into an engine (docker, podman) as a local image, no registry involved.

    tar = busybox_tar(tmp_dir)                      # build (or reuse) the rootfs tar
    ref = import_into(["docker", "-H", sock], tar)  # import once, returns the image ref
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
IMAGE_REF = "carapace-test/busybox:latest"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "user:x:1000:1000:user:/home/user:/bin/sh\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\nuser:x:1000:\n"
DIRS = ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home/user", "tmp",
        "dev", "proc", "sys", "run", "var", "var/www"]  # fmt: skip


def applets() -> list[str]:
    """Paths (relative to /) of busybox's applets, from ``busybox --list-full``."""
    out = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def busybox_tar(directory: Path) -> Path:
    """Write ``<directory>/busybox-rootfs.tar`` (once; reused when present) and return it.

    Contents: /bin/busybox, a symlink to it for every applet, /etc/passwd and
    /etc/group (root, nobody, user 1000), /home/user owned by 1000, /tmp 1777."""
    path = directory / "busybox-rootfs.tar"
    if path.is_file():
        return path
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} missing: install Debian's busybox-static")
    partial = path.with_suffix(".tar.partial")
    with tarfile.open(partial, "w") as tar:
        for d in DIRS:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            if d == "home/user":
                info.uid = info.gid = 1000
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in applets():
            if applet == "bin/busybox":
                continue
            info = tarfile.TarInfo(applet)
            info.type = tarfile.SYMTYPE
            info.linkname = "/bin/busybox"
            tar.addfile(info)
        _add_file(tar, "etc/passwd", PASSWD.encode())
        _add_file(tar, "etc/group", GROUP.encode())
        _add_file(tar, "etc/hostname", b"busybox\n")
    partial.rename(path)
    return path


def import_into(cli_argv: list[str], tar: Path, ref: str = IMAGE_REF) -> str:
    """Import ``tar`` into the engine whose CLI is ``cli_argv`` (e.g. ``["docker", "-H",
    "unix:///…"]`` or ``["podman", "--root", …]``) as ``ref``, unless an image by that name
    is already there. Returns ``ref``."""
    present = subprocess.run([*cli_argv, "image", "inspect", ref], capture_output=True, timeout=60)
    if present.returncode == 0:
        return ref
    done = subprocess.run(
        [*cli_argv, "import", "--change", 'CMD ["/bin/sh"]', str(tar), ref],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cli_argv)} import {tar} {ref} failed ({done.returncode}): "
            f"{done.stderr.strip()}"
        )
    return ref
