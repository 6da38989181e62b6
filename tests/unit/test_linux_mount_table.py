"""Reading the host's mount table (carapace.linux): the table parsed once, and the
pure questions asked of it (which mounts lie under a path, which filesystem holds a
path), on a mountinfo text of our own."""

from __future__ import annotations

from pathlib import Path

from carapace import linux

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
30 22 0:30 / /srv/data rw shared:3 - tmpfs tmpfs rw
31 30 0:31 / /srv/data/sub rw shared:4 - tmpfs tmpfs rw
32 22 0:32 / /srv/data2 rw shared:5 - xfs /dev/sdb rw
33 30 0:33 / /srv/data/with\\040space rw - ext4 /dev/sdc rw
34 22 0:34 / /srv/data rw - ext4 /dev/sdd rw
"""


def table(tmp_path: Path) -> list[tuple[str, str]]:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return linux.mount_table(str(path))


def test_the_table_is_in_mount_order_and_unescaped(tmp_path: Path) -> None:
    t = table(tmp_path)
    assert t[0] == ("/", "ext4")
    assert ("/srv/data/with space", "ext4") in t
    assert [p for p, _ in t].count("/srv/data") == 2


def test_points_under_a_path_by_components_last_mounted_first(tmp_path: Path) -> None:
    t = table(tmp_path)
    assert linux.points_under(t, "/srv/data") == [
        "/srv/data",
        "/srv/data/with space",
        "/srv/data/sub",
        "/srv/data",
    ]
    assert linux.points_under(t, "/srv/data2") == ["/srv/data2"]  # not /srv/data's
    assert linux.points_under(t, "/nowhere") == []
    assert linux.points_under(t, "/srv/data/sub/deeper") == []


def test_the_filesystem_of_a_path_is_the_deepest_latest_mount_holding_it(
    tmp_path: Path,
) -> None:
    t = table(tmp_path)
    assert linux.fs_type_in(t, "/srv/data/sub/file") == "tmpfs"
    assert linux.fs_type_in(t, "/srv/data/file") == "ext4"  # mounted over the tmpfs later
    assert linux.fs_type_in(t, "/srv/data2/x") == "xfs"
    assert linux.fs_type_in(t, "/etc") == "ext4"
    assert linux.fs_type_in(t, "/proc/1") == "proc"


def test_the_readers_ask_the_same_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    assert linux.mounts_under("/srv/data", str(path)) == linux.points_under(
        linux.mount_table(str(path)), "/srv/data"
    )
    assert linux.fs_type("/srv/data/sub/f", str(path)) == "tmpfs"
