"""A writer for the "newc" cpio format the Linux kernel unpacks as its initramfs.

Pure code: entries in, bytes out, so the archive is reproducible (fixed mtimes,
sorted order, inode numbers assigned by position).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One file in the archive; ``name`` is relative, without a leading slash."""

    name: str
    mode: int  # full st_mode: file type bits + permissions
    data: bytes = b""  # file content, or the target of a symlink
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def encode_entry(entry: Entry, ino: int) -> bytes:
    """Encode one entry (header, name, data, with newc's 4-byte alignment)."""
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        entry.mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check
    )
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name
    out += _pad4(len(out))
    out += entry.data
    out += _pad4(len(entry.data))
    return out


def encode_archive(entries: Iterable[Entry]) -> bytes:
    """Encode a whole archive, parents before children, ending with the trailer."""
    parts = []
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        parts.append(encode_entry(entry, ino))
    parts.append(encode_entry(Entry(name=TRAILER, mode=0), 0))
    return b"".join(parts)


def decode_archive(data: bytes) -> list[Entry]:
    """Decode a newc archive (used by tests and by `carapace guest inspect`)."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {pos}: {data[pos : pos + 6]!r}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += (4 - pos % 4) % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += (4 - pos % 4) % 4
        if name == TRAILER:
            return entries
        entries.append(
            Entry(
                name=name,
                mode=f[1],
                data=body,
                uid=f[2],
                gid=f[3],
                mtime=f[5],
                rdev_major=f[9],
                rdev_minor=f[10],
            )
        )
