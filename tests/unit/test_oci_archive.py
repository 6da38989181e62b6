"""OCI image-layout archives written by tests/tooling/oci_archive.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import tarfile
from pathlib import Path
from typing import Any

import pytest

from carapace.errors import ImageError, InvalidArgument
from tests.tooling.oci_archive import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    ImageConfig,
    build_image,
    layer_tar,
    layout_archive,
    parse_reference,
    write_image_archive,
)

NAME = "carapace.local/busybox:latest"


def make_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "bin" / "busybox").write_bytes(b"\x7fELF fake busybox")
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "bin" / "ls").symlink_to("/bin/busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "passwd").chmod(0o644)
    os.link(root / "etc" / "passwd", root / "etc" / "passwd.hard")
    os.mkfifo(root / "tmp" / "fifo")
    return root


def members(archive: bytes) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isfile() else None
            out[m.name] = f.read() if f else None
    return out


def blob(files: dict[str, bytes | None], digest: str) -> bytes:
    data = files["blobs/sha256/" + digest.removeprefix("sha256:")]
    assert data is not None
    return data


def load(files: dict[str, bytes | None], name: str) -> Any:
    data = files[name]
    assert data is not None
    return json.loads(data)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path / "rootfs")


CONFIG = ImageConfig(
    entrypoint=("/pause",),
    cmd=("sh",),
    env=("PATH=/bin", "A=b"),
    working_dir="/root",
    labels={"k": "v"},
)


def test_archive_layout(rootfs: Path) -> None:
    files = members(layout_archive(build_image(NAME, rootfs, CONFIG)))
    assert files["oci-layout"] is not None
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    assert {"blobs", "blobs/sha256", "index.json", "oci-layout"} <= set(files)
    blobs = [n for n in files if n.startswith("blobs/sha256/")]
    assert len(blobs) == 3  # layer, config, manifest

    index = load(files, "index.json")
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == MEDIA_INDEX
    [entry] = index["manifests"]
    assert entry["mediaType"] == MEDIA_MANIFEST
    assert entry["annotations"] == {ANNOTATION_CONTAINERD_NAME: NAME, ANNOTATION_REF_NAME: "latest"}
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}


def test_digests_and_sizes_match_contents(rootfs: Path) -> None:
    image = build_image(NAME, rootfs, CONFIG)
    files = members(layout_archive(image))
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert data is not None
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]

    [entry] = load(files, "index.json")["manifests"]
    manifest_bytes = blob(files, entry["digest"])
    assert len(manifest_bytes) == entry["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == MEDIA_MANIFEST

    cdesc = manifest["config"]
    assert cdesc["mediaType"] == MEDIA_CONFIG
    config_bytes = blob(files, cdesc["digest"])
    assert len(config_bytes) == cdesc["size"]

    [ldesc] = manifest["layers"]
    assert ldesc["mediaType"] == MEDIA_LAYER_GZIP
    layer = blob(files, ldesc["digest"])
    assert len(layer) == ldesc["size"]
    raw = gzip.decompress(layer)

    config = json.loads(config_bytes)
    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()],
    }
    assert config["rootfs"]["diff_ids"] == [image.diff_id]
    assert entry["digest"] == image.manifest.digest


def test_config_fields(rootfs: Path) -> None:
    files = members(layout_archive(build_image(NAME, rootfs, CONFIG)))
    [entry] = load(files, "index.json")["manifests"]
    manifest = json.loads(blob(files, entry["digest"]))
    config = json.loads(blob(files, manifest["config"]["digest"]))
    assert config["os"] == "linux"
    assert config["architecture"] == "amd64"
    assert config["config"] == {
        "Entrypoint": ["/pause"],
        "Cmd": ["sh"],
        "Env": ["PATH=/bin", "A=b"],
        "WorkingDir": "/root",
        "Labels": {"k": "v"},
    }


def test_empty_entrypoint_and_cmd_are_left_out(rootfs: Path) -> None:
    image = build_image(NAME, rootfs, ImageConfig(cmd=("sh",)))
    run = json.loads(image.config.data)["config"]
    assert "Entrypoint" not in run
    assert run["Cmd"] == ["sh"]
    assert run["Env"][0].startswith("PATH=")


def test_layer_contents(rootfs: Path) -> None:
    raw = layer_tar(rootfs)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        ms = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
        busybox = tar.extractfile(ms["bin/busybox"])
        assert busybox is not None
        assert busybox.read() == b"\x7fELF fake busybox"
    assert names == [
        "bin",
        "bin/busybox",
        "bin/ls",
        "bin/sh",
        "etc",
        "etc/passwd",
        "etc/passwd.hard",
        "tmp",
        "tmp/fifo",
    ]
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in ms.values())
    assert all(m.uname == "" and m.gname == "" for m in ms.values())
    assert ms["tmp"].isdir() and ms["tmp"].mode == 0o1777
    assert ms["bin/busybox"].mode == 0o755
    assert ms["bin/sh"].issym() and ms["bin/sh"].linkname == "busybox"
    assert ms["bin/ls"].issym() and ms["bin/ls"].linkname == "/bin/busybox"
    assert ms["etc/passwd"].isfile()
    assert ms["etc/passwd.hard"].islnk() and ms["etc/passwd.hard"].linkname == "etc/passwd"
    assert ms["tmp/fifo"].isfifo()


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = make_rootfs(tmp_path / "a")
    b = make_rootfs(tmp_path / "b")
    # different times stamps and a different creation order give the same bytes
    os.utime(b / "etc" / "passwd", (1_700_000_000, 1_700_000_000))
    os.utime(b / "bin", (1_600_000_000, 1_600_000_000))
    out_a = tmp_path / "a.tar"
    out_b = tmp_path / "b.tar"
    ia = write_image_archive(out_a, NAME, a, CONFIG)
    ib = write_image_archive(out_b, NAME, b, CONFIG)
    assert out_a.read_bytes() == out_b.read_bytes()
    assert ia.manifest.digest == ib.manifest.digest
    assert out_a.read_bytes() == layout_archive(build_image(NAME, a, CONFIG))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.tar", "b", "b.tar"]  # no temp


def test_content_changes_change_digests(rootfs: Path) -> None:
    before = build_image(NAME, rootfs, CONFIG)
    (rootfs / "etc" / "hostname").write_text("x\n")
    after = build_image(NAME, rootfs, CONFIG)
    assert after.diff_id != before.diff_id
    assert after.manifest.digest != before.manifest.digest
    other_cmd = build_image(NAME, rootfs, ImageConfig(cmd=("true",)))
    assert other_cmd.layer == after.layer
    assert other_cmd.config.digest != after.config.digest


def test_uncompressed_layer(rootfs: Path) -> None:
    image = build_image(NAME, rootfs, CONFIG, compress=False)
    assert image.layer.media_type == MEDIA_LAYER
    assert image.layer.digest == image.diff_id
    assert json.loads(image.manifest.data)["layers"][0]["mediaType"] == MEDIA_LAYER


@pytest.mark.parametrize(
    ("name", "repo", "tag"),
    [
        ("carapace.local/busybox:latest", "carapace.local/busybox", "latest"),
        ("localhost:5000/a/b-c:v1.2", "localhost:5000/a/b-c", "v1.2"),
        ("busybox:1", "busybox", "1"),
    ],
)
def test_parse_reference(name: str, repo: str, tag: str) -> None:
    assert parse_reference(name) == (repo, tag)


@pytest.mark.parametrize("name", ["busybox", "Busybox:latest", "a/b@sha256:00", "a:", ""])
def test_bad_reference(name: str, rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a tagged reference"):
        build_image(name, rootfs, CONFIG)


def test_unsupported_file_type(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "tmp" / "sock"))
        with pytest.raises(ImageError, match=r"tmp/sock: unsupported file type"):
            layer_tar(root)
    finally:
        sock.close()


def test_rootfs_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is not a directory"):
        layer_tar(tmp_path / "missing")
