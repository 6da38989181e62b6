"""Writes OCI image-layout archives from a root filesystem directory (no registry needed).

The archive is what ``ctr image import`` (and ``podman load``, ``skopeo copy
oci-archive:``) reads: a tar holding ``oci-layout``, ``index.json`` and
``blobs/sha256/<hex>`` for one image made of a single layer. The index entry carries
both ``io.containerd.image.name`` (the full reference, which containerd uses as the
image name on import) and ``org.opencontainers.image.ref.name`` (the tag only, as
containerd's own exporter writes it).

The output is deterministic: entries are sorted, owned by root, dated ``mtime``
(the epoch by default), gzip is written without a file name or time stamp and JSON
with sorted keys, so the same rootfs always gives the same bytes and digests.

Pure: reads the rootfs, writes the archive; runs nothing. Test tooling, no part of
carapace: scripts/build-test-images and tests/unit/test_oci_archive.py use it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from carapace.errors import ImageError, InvalidArgument

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# name[:port]/path:tag — lower-case path components, a tag as the distribution spec allows
_REFERENCE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r":(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$"
)


@dataclass(frozen=True)
class ImageConfig:
    """What the image's config says about how to run it (the OCI image config ``config``)."""

    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    env: tuple[str, ...] = (DEFAULT_PATH,)
    working_dir: str = "/"
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    os: str = "linux"
    architecture: str = "amd64"


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob of the layout."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class OciImage:
    """One image: its layer, config and manifest blobs and the layout's index.json."""

    name: str
    layer: Blob
    config: Blob
    manifest: Blob
    index: bytes
    diff_id: str  # digest of the uncompressed layer tar


def canonical_json(value: object) -> bytes:
    """JSON with sorted keys and no insignificant white space (stable digests)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_reference(name: str) -> tuple[str, str]:
    """(repository, tag) of a reference like ``carapace.local/busybox:latest``."""
    m = _REFERENCE.match(name)
    if m is None:
        raise InvalidArgument(
            f"image name {name!r} is not a tagged reference; expected e.g. "
            "'carapace.local/busybox:latest' (lower-case repository, ':' and a tag)"
        )
    return m.group("repo"), m.group("tag")


def layer_tar(rootfs: Path, *, mtime: int = 0) -> bytes:
    """An uncompressed, deterministic tar of ``rootfs``: sorted entries, owned by 0:0,
    dated ``mtime``; permission bits (with setuid/setgid/sticky) kept, hard links
    preserved, regular files, directories, symbolic links and FIFOs only."""
    if not rootfs.is_dir():
        raise ImageError(f"rootfs {rootfs} is not a directory")
    buf = io.BytesIO()
    seen: dict[tuple[int, int], str] = {}  # (dev, ino) -> first name, for hard links
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk_sorted(rootfs):
            rel = path.relative_to(rootfs).as_posix()
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = mtime
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    info.type = tarfile.LNKTYPE
                    info.linkname = seen[key]
                    tar.addfile(info)
                    continue
                seen[key] = rel
                info.size = st.st_size
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                raise ImageError(
                    f"{path}: unsupported file type {stat.filemode(st.st_mode)!r} in a rootfs "
                    "(only files, directories, symbolic links and FIFOs go into a layer)"
                )
    return buf.getvalue()


def _walk_sorted(root: Path) -> list[Path]:
    out: list[Path] = []

    def visit(d: Path) -> None:
        for child in sorted(d.iterdir(), key=lambda p: p.name):
            out.append(child)
            if child.is_dir() and not child.is_symlink():
                visit(child)

    visit(root)
    return out


def gzip_deterministic(data: bytes) -> bytes:
    """gzip without a file name and with a zero time stamp."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def build_image(
    name: str,
    rootfs: Path,
    config: ImageConfig,
    *,
    compress: bool = True,
    created_by: str = "carapace",
) -> OciImage:
    """The blobs and index of a one-layer image of ``rootfs`` named ``name``."""
    _, tag = parse_reference(name)
    raw = layer_tar(rootfs)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer = Blob(MEDIA_LAYER_GZIP, gzip_deterministic(raw)) if compress else Blob(MEDIA_LAYER, raw)
    run: dict[str, object] = {"Env": list(config.env), "WorkingDir": config.working_dir}
    if config.entrypoint:
        run["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        run["Cmd"] = list(config.cmd)
    if config.user:
        run["User"] = config.user
    if config.labels:
        run["Labels"] = dict(config.labels)
    config_blob = Blob(
        MEDIA_CONFIG,
        canonical_json(
            {
                "architecture": config.architecture,
                "os": config.os,
                "config": run,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created_by": created_by}],
            }
        ),
    )
    manifest = Blob(
        MEDIA_MANIFEST,
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": config_blob.descriptor(),
                "layers": [layer.descriptor()],
            }
        ),
    )
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    **manifest.descriptor(),
                    "annotations": {ANNOTATION_CONTAINERD_NAME: name, ANNOTATION_REF_NAME: tag},
                    "platform": {"architecture": config.architecture, "os": config.os},
                }
            ],
        }
    )
    return OciImage(
        name=name, layer=layer, config=config_blob, manifest=manifest, index=index, diff_id=diff_id
    )


def layout_archive(image: OciImage) -> bytes:
    """The OCI image-layout tar of ``image`` (deterministic)."""
    files: list[tuple[str, bytes | None]] = [
        ("blobs", None),
        ("blobs/sha256", None),
    ]
    blobs = {b.digest: b.data for b in (image.layer, image.config, image.manifest)}
    for digest in sorted(blobs):
        files.append(("blobs/sha256/" + digest.removeprefix("sha256:"), blobs[digest]))
    files.append(("index.json", image.index))
    files.append(("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files:
            info = tarfile.TarInfo(path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_image_archive(
    out: Path,
    name: str,
    rootfs: Path,
    config: ImageConfig,
    *,
    compress: bool = True,
    created_by: str = "carapace",
) -> OciImage:
    """Write the OCI archive of ``rootfs`` as image ``name`` to ``out`` (atomically)."""
    image = build_image(name, rootfs, config, compress=compress, created_by=created_by)
    data = layout_archive(image)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return image
