"""The newc cpio writer and reader (carapace.image.cpio)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from carapace.image.cpio import TRAILER, Entry, decode_archive, encode_archive, encode_entry

CPIO = "/usr/bin/cpio"


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    return Entry(name=name, mode=stat.S_IFREG | mode, data=data)


def directory(name: str, mode: int = 0o755) -> Entry:
    return Entry(name=name, mode=stat.S_IFDIR | mode)


def symlink(name: str, target: str) -> Entry:
    return Entry(name=name, mode=stat.S_IFLNK | 0o777, data=target.encode())


def test_header_bytes_of_a_small_file() -> None:
    out = encode_entry(reg("a", b"hi"), ino=1)
    expected_header = (
        b"070701"
        + b"00000001"  # ino
        + b"000081A4"  # mode: S_IFREG | 0644
        + b"00000000"  # uid
        + b"00000000"  # gid
        + b"00000001"  # nlink
        + b"00000000"  # mtime
        + b"00000002"  # filesize
        + b"00000000"  # devmajor
        + b"00000000"  # devminor
        + b"00000000"  # rdevmajor
        + b"00000000"  # rdevminor
        + b"00000002"  # namesize, with the NUL
        + b"00000000"  # check
    )
    assert len(expected_header) == 110
    # 110 + "a\0" = 112 is aligned; "hi" is padded to 4
    assert out == expected_header + b"a\0" + b"hi\0\0"


def test_header_fields_uid_gid_mtime_rdev_in_upper_hex() -> None:
    e = Entry(
        name="dev/console",
        mode=stat.S_IFCHR | 0o600,
        uid=1000,
        gid=0xABC,
        mtime=0x5F5E100,
        rdev_major=5,
        rdev_minor=1,
    )
    out = encode_entry(e, ino=0x1F)
    fields = [out[6 + 8 * i : 14 + 8 * i] for i in range(13)]
    assert fields[0] == b"0000001F"
    assert fields[1] == b"%08X" % (stat.S_IFCHR | 0o600)
    assert fields[2] == b"000003E8"
    assert fields[3] == b"00000ABC"
    assert fields[5] == b"05F5E100"
    assert fields[6] == b"00000000"
    assert fields[9] == b"00000005"
    assert fields[10] == b"00000001"
    assert fields[11] == b"%08X" % len(b"dev/console\0")


def test_directory_has_two_links() -> None:
    out = encode_entry(directory("etc"), ino=3)
    assert out[6 + 8 * 4 : 14 + 8 * 4] == b"00000002"


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", range(0, 9))
def test_every_entry_is_four_byte_aligned(name_len: int, data_len: int) -> None:
    name = "n" * name_len
    data = b"d" * data_len
    out = encode_entry(reg(name, data), ino=1)
    assert len(out) % 4 == 0
    # the data starts at the first aligned offset after the name
    data_off = 110 + name_len + 1
    data_off += (4 - data_off % 4) % 4
    assert out[110 : 110 + name_len + 1] == name.encode() + b"\0"
    assert set(out[110 + name_len + 1 : data_off]) <= {0}
    assert out[data_off : data_off + data_len] == data
    assert set(out[data_off + data_len :]) <= {0}
    assert len(out) - (data_off + data_len) < 4


def test_archive_ends_with_trailer() -> None:
    archive = encode_archive([reg("x", b"1")])
    trailer = encode_entry(Entry(name=TRAILER, mode=0), 0)
    assert archive.endswith(trailer)
    assert b"TRAILER!!!\0" in trailer
    assert encode_archive([]) == trailer


def test_round_trip_of_files_dirs_and_symlinks() -> None:
    entries = [
        directory("bin"),
        reg("bin/busybox", bytes(range(256)) * 3 + b"x", mode=0o755),
        symlink("bin/sh", "busybox"),
        directory("etc", mode=0o700),
        reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        reg("empty"),
        Entry(name="owned", mode=stat.S_IFREG | 0o600, data=b"z", uid=7, gid=8, mtime=99),
        Entry(name="dev/null", mode=stat.S_IFCHR | 0o666, rdev_major=1, rdev_minor=3),
    ]
    decoded = decode_archive(encode_archive(entries))
    assert decoded == sorted(entries, key=lambda e: e.name)


def test_entries_are_sorted_and_numbered_by_position() -> None:
    names = ["usr/bin", "bin", "usr", "bin/sh", "a"]
    archive = encode_archive([directory(n) for n in names])
    decoded = decode_archive(archive)
    assert [e.name for e in decoded] == sorted(names)
    # inode numbers follow the sorted position, starting at 1
    pos, inos = 0, []
    for _ in names:
        inos.append(int(archive[pos + 6 : pos + 14], 16))
        namesize = int(archive[pos + 94 : pos + 102], 16)
        pos += 110 + namesize
        pos += (4 - pos % 4) % 4
    assert inos == [1, 2, 3, 4, 5]


def test_archive_is_reproducible_regardless_of_input_order() -> None:
    a = [reg("b", b"2"), reg("a", b"1"), directory("c")]
    assert encode_archive(a) == encode_archive(list(reversed(a)))


def test_decode_rejects_bad_magic() -> None:
    archive = bytearray(encode_archive([reg("a", b"x")]))
    archive[0:6] = b"070707"  # the old "odc" format
    with pytest.raises(ValueError, match="bad cpio magic at offset 0"):
        decode_archive(bytes(archive))


@pytest.mark.skipif(not os.path.exists(CPIO), reason="no /usr/bin/cpio")
def test_cpio_binary_lists_our_archive(tmp_path: Path) -> None:
    entries = [
        directory("bin"),
        reg("bin/busybox", b"\x7fELF" + b"\0" * 1001, mode=0o755),
        symlink("bin/sh", "busybox"),
        directory("etc"),
        reg("etc/hostname", b"carapace\n"),
        reg("init", b"#!/bin/sh\n", mode=0o755),
    ]
    archive = tmp_path / "initrd.cpio"
    archive.write_bytes(encode_archive(entries))
    with archive.open("rb") as f:
        r = subprocess.run([CPIO, "-t", "--quiet"], stdin=f, capture_output=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == sorted(e.name for e in entries)


@pytest.mark.skipif(not os.path.exists(CPIO), reason="no /usr/bin/cpio")
def test_cpio_binary_extracts_our_archive(tmp_path: Path) -> None:
    entries = [
        directory("d"),
        reg("d/f", b"hello\n", mode=0o640),
        symlink("d/l", "f"),
    ]
    archive = tmp_path / "a.cpio"
    archive.write_bytes(encode_archive(entries))
    out = tmp_path / "out"
    out.mkdir()
    with archive.open("rb") as f:
        r = subprocess.run(
            [CPIO, "-i", "-d", "--quiet", "--no-absolute-filenames"],
            stdin=f,
            cwd=out,
            capture_output=True,
            timeout=10,
        )
    assert r.returncode == 0, r.stderr
    assert (out / "d/f").read_bytes() == b"hello\n"
    assert stat.S_IMODE((out / "d/f").stat().st_mode) == 0o640
    assert os.readlink(out / "d/l") == "f"
