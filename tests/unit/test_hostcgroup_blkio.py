"""The blkio_cgroup annotation (seed 003): strict parsing, device resolution and the
cgroup v1 / v2 lines that apply it (carapace.hostcgroup.blkio)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from carapace.errors import InvalidArgument, shown
from carapace.hostcgroup import (
    BLKIO_CGROUP_ANNOTATION,
    BlkioItem,
    BlkioLimit,
    BlkioWrite,
    Device,
    ResolvedBlkioItem,
    parse_blkio_cgroup,
    resolve_devices,
)
from carapace.hostcgroup.blkio import (
    active_schedulers,
    blkio_writes,
    parse_scheduler,
    v2_io_weight,
    weight_warnings,
)

# The example of the openEuler secure-container guide, verbatim.
SEED = (
    '{"blkiocgroup":[{"path":"/dev/sda","limits":[{"type":"throttle_read_bps","value":400},'
    '{"type":"throttle_write_bps","value":400},{"type":"throttle_read_iops","value":700},'
    '{"type":"throttle_write_iops","value":699}]},{"limits":[{"type":"blkio_weight","value":78}]}]}'
)
THROTTLES = (
    BlkioLimit("throttle_read_bps", 400),
    BlkioLimit("throttle_write_bps", 400),
    BlkioLimit("throttle_read_iops", 700),
    BlkioLimit("throttle_write_iops", 699),
)
VDA = Device(254, 0)


def test_the_seed_example_parses() -> None:
    assert parse_blkio_cgroup(SEED) == [
        BlkioItem("/dev/sda", THROTTLES),
        BlkioItem(None, (BlkioLimit("blkio_weight", 78),)),
    ]


def test_empty_documents_mean_no_limits() -> None:
    assert parse_blkio_cgroup("{}") == []
    assert parse_blkio_cgroup('{"blkiocgroup": []}') == []


def test_items_for_one_device_merge_and_weights_may_name_a_device() -> None:
    text = json.dumps(
        {
            "blkiocgroup": [
                {"path": "/dev/vda", "limits": [{"type": "throttle_read_bps", "value": 0}]},
                {"path": "/dev/vda", "limits": [{"type": "blkio_weight", "value": 1000}]},
                {"limits": [{"type": "blkio_leaf_weight", "value": 10}]},
            ]
        }
    )
    assert parse_blkio_cgroup(text) == [
        BlkioItem(
            "/dev/vda", (BlkioLimit("throttle_read_bps", 0), BlkioLimit("blkio_weight", 1000))
        ),
        BlkioItem(None, (BlkioLimit("blkio_leaf_weight", 10),)),
    ]


def lim(kind: object, value: object) -> str:
    return json.dumps(
        {"blkiocgroup": [{"path": "/dev/vda", "limits": [{"type": kind, "value": value}]}]}
    )


@pytest.mark.parametrize(
    ("text", "seen", "accepted"),
    [
        ("not json", "not valid JSON", "not json"),
        ("[]", "not a JSON object", "blkiocgroup"),
        ('{"blkiocgroup": [], "extra": 1}', "'extra'", "accepted keys: 'blkiocgroup'"),
        ('{"blkioCgroup": []}', "'blkioCgroup'", "accepted keys"),
        ('{"blkiocgroup": {}}', "not a list", "list of items"),
        ('{"blkiocgroup": [5]}', "blkiocgroup[0] is not an object", "path"),
        ('{"blkiocgroup": [{"path": "/dev/vda", "limit": []}]}', "'limit'", "'path', 'limits'"),
        ('{"blkiocgroup": [{"path": "/dev/vda"}]}', "limits is null", "non-empty list"),
        ('{"blkiocgroup": [{"path": "/dev/vda", "limits": []}]}', "limits is []", "non-empty"),
        ('{"blkiocgroup": [{"path": "/dev/vda", "limits": {}}]}', "limits is {}", "non-empty list"),
        ('{"blkiocgroup": [{"path": 7, "limits": []}]}', "path is 7", "under /dev"),
        ('{"blkiocgroup": [{"path": "", "limits": []}]}', "path is ''", "under /dev"),
        ('{"blkiocgroup": [{"path": "dev/vda", "limits": []}]}', "'dev/vda'", "under /dev"),
        ('{"blkiocgroup": [{"path": "/etc/shadow", "limits": []}]}', "'/etc/shadow'", "/dev"),
        (lim("throttle_read", 1), "unknown type 'throttle_read'", "throttle_read_bps, "),
        (lim(5, 1), "unknown type 5", "blkio_leaf_weight"),
        (lim("throttle_read_bps", -1), "value -1", "non-negative integer"),
        (lim("throttle_read_bps", 1.5), "value 1.5", "non-negative integer"),
        (lim("throttle_read_bps", "400"), "value '400'", "non-negative integer"),
        (lim("throttle_read_bps", True), "value true", "non-negative integer"),
        (lim("throttle_read_bps", None), "value null", "non-negative integer"),
        (lim("throttle_read_bps", 2**64), f"value {2**64}", "non-negative integer"),
        (lim("blkio_weight", 0), "value 0", "1..1000"),
        (lim("blkio_weight", 1001), "value 1001", "1..1000"),
        (lim("blkio_leaf_weight", 9), "value 9", "10..1000"),
        (
            '{"blkiocgroup": [{"path": "/dev/vda", "limits": [{"type": "blkio_weight"}]}]}',
            "lacks 'type' or 'value'",
            "expected",
        ),
        (
            '{"blkiocgroup": [{"path": "/dev/vda", "limits": [{"type": "blkio_weight", '
            '"value": 5, "unit": "x"}]}]}',
            "'unit'",
            "'type', 'value'",
        ),
        ('{"blkiocgroup": [{"path": "/dev/vda", "limits": [3]}]}', "is not an object", "type"),
        (
            '{"blkiocgroup": [{"limits": [{"type": "throttle_write_iops", "value": 5}]}]}',
            "no 'path' but sets 'throttle_write_iops'",
            "give its 'path'",
        ),
        (
            '{"blkiocgroup": [{"limits": [{"type": "blkio_weight", "value": 5}]},'
            '{"limits": [{"type": "blkio_weight", "value": 6}]}]}',
            "blkio_weight is given twice for the whole cgroup",
            "give each limit once",
        ),
        (
            '{"blkiocgroup": [{"path": "/dev/a", "limits": [{"type": "throttle_read_bps", '
            '"value": 5}, {"type": "throttle_read_bps", "value": 6}]}]}',
            "throttle_read_bps is given twice for /dev/a",
            "once",
        ),
    ],
)
def test_each_bad_value_is_refused_with_what_is_accepted(
    text: str, seen: str, accepted: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_blkio_cgroup(text)
    message = str(info.value)
    assert message.startswith(f"annotation {BLKIO_CGROUP_ANNOTATION}:")
    assert seen in message
    assert accepted in message


def test_the_annotation_name_in_messages_is_the_one_used() -> None:
    with pytest.raises(InvalidArgument, match=r"^annotation io\.katacontainers\.x: "):
        parse_blkio_cgroup("[]", annotation="io.katacontainers.x")


# ------------------------------------------------------------------ device resolution


def block_device() -> str:
    for candidate in ("/dev/loop0", "/dev/vda", "/dev/sda", "/dev/nvme0n1"):
        if os.path.exists(candidate) and stat.S_ISBLK(os.stat(candidate).st_mode):
            return candidate
    pytest.skip("no block device on this machine")


def dev_tree(tmp_path: Path) -> tuple[Path, Device]:
    """A /dev of the test's own: a block device node ``vdz`` (7:99) and a symlink to it
    under disk/by-id, as udev makes them."""
    dev = tmp_path / "dev"
    (dev / "disk" / "by-id").mkdir(parents=True)
    try:
        os.mknod(dev / "vdz", stat.S_IFBLK | 0o600, os.makedev(7, 99))
    except PermissionError:
        pytest.skip("cannot make a device node here")
    (dev / "disk" / "by-id" / "virtio-x").symlink_to("../../vdz")
    return dev, Device(7, 99)


def test_resolve_devices_gives_major_minor(tmp_path: Path) -> None:
    dev, vdz = dev_tree(tmp_path)
    link = str(dev / "disk" / "by-id" / "virtio-x")
    weight = (BlkioLimit("blkio_weight", 78),)
    items = [BlkioItem(link, THROTTLES), BlkioItem(None, weight)]
    resolved = resolve_devices(items, sys_root=str(tmp_path), dev_root=str(dev))
    assert resolved == [
        ResolvedBlkioItem(link, vdz, THROTTLES),
        ResolvedBlkioItem(None, None, weight),
    ]


def test_resolve_devices_takes_the_hosts_dev() -> None:
    disk = block_device()
    st = os.stat(disk)
    got = resolve_devices([BlkioItem(disk, THROTTLES)], sys_root="/nonexistent")
    assert got[0].device == Device(os.major(st.st_rdev), os.minor(st.st_rdev))


def test_resolve_devices_reveals_nothing_of_host_files(tmp_path: Path) -> None:
    # before: "'/etc/shadow' is not a block device (mode -rw-r-----)", and "No such file
    # or directory" for a missing path: the pod could probe any host path's existence,
    # type and mode. Now only block devices under /dev are looked at, and every refusal
    # reads the same whatever the host has at the path.
    dev, _ = dev_tree(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o640)
    (dev / "evil").symlink_to(secret)  # a symlink under /dev that leaves it
    (dev / "fifo").mkdir()
    paths = [
        "/etc/shadow",
        "/nonexistent/sdz",
        str(secret),
        str(tmp_path / "missing"),
        str(dev / "evil"),
        str(dev / "fifo"),
        str(dev / "missing"),
        str(dev / ".." / "secret"),
        str(dev) + "/vdz\x00",
    ]
    messages = []
    for path in paths:
        with pytest.raises(InvalidArgument) as e:
            resolve_devices([BlkioItem(path, THROTTLES)], dev_root=str(dev))
        msg = str(e.value)
        assert "mode" not in msg and "-rw" not in msg and "No such" not in msg
        assert "not a block device under /dev" in msg
        messages.append(msg.replace(shown(path), "PATH"))
    assert len(set(messages)) == 1, messages
    # the host's own /dev: a character device is refused the same way
    with pytest.raises(InvalidArgument) as e:
        resolve_devices([BlkioItem("/dev/null", THROTTLES)])
    assert str(e.value).replace("'/dev/null'", "PATH") == messages[0]


def test_resolve_devices_refuses_partitions(tmp_path: Path) -> None:
    dev, vdz = dev_tree(tmp_path)
    part = tmp_path / "dev" / "block" / str(vdz)
    part.mkdir(parents=True)
    (part / "partition").write_text("1\n")
    with pytest.raises(InvalidArgument, match="is a partition"):
        resolve_devices(
            [BlkioItem(str(dev / "vdz"), THROTTLES)], sys_root=str(tmp_path), dev_root=str(dev)
        )


# ------------------------------------------------------------------ file lines

V1_THROTTLE_FILES = {
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
    "blkio.throttle.read_iops_device",
    "blkio.throttle.write_iops_device",
}
SEED_RESOLVED = [
    ResolvedBlkioItem("/dev/vda", VDA, THROTTLES),
    ResolvedBlkioItem(None, None, (BlkioLimit("blkio_weight", 78),)),
]


@pytest.mark.parametrize(
    ("existing", "weight_write"),
    [
        ({"blkio.weight", "blkio.weight_device"}, BlkioWrite("blkio.weight", "78")),
        ({"blkio.bfq.weight"}, BlkioWrite("blkio.bfq.weight", "78")),
        ({"blkio.bfq.weight", "blkio.weight"}, BlkioWrite("blkio.bfq.weight", "78")),
    ],
)
def test_v1_lines(existing: set[str], weight_write: BlkioWrite) -> None:
    result = blkio_writes("v1", SEED_RESOLVED, V1_THROTTLE_FILES | existing)
    assert result.applied == [
        BlkioWrite("blkio.throttle.read_bps_device", "254:0 400"),
        BlkioWrite("blkio.throttle.write_bps_device", "254:0 400"),
        BlkioWrite("blkio.throttle.read_iops_device", "254:0 700"),
        BlkioWrite("blkio.throttle.write_iops_device", "254:0 699"),
        weight_write,
    ]
    assert result.unapplied == []


def test_v1_without_any_weight_file_reports_the_weight_unapplied() -> None:
    result = blkio_writes("v1", SEED_RESOLVED, V1_THROTTLE_FILES)
    assert len(result.applied) == 4
    [miss] = result.unapplied
    assert (miss.path, miss.type, miss.value) == (None, "blkio_weight", 78)
    assert "neither blkio.bfq.weight nor blkio.weight exists" in miss.reason
    assert str(miss).startswith("blkio_weight=78 for the whole cgroup not applied: neither")


def test_v1_per_device_weight_leaf_weight_and_missing_throttles() -> None:
    items = [
        ResolvedBlkioItem(
            "/dev/vda",
            VDA,
            (
                BlkioLimit("blkio_weight", 300),
                BlkioLimit("blkio_leaf_weight", 200),
                BlkioLimit("throttle_read_bps", 0),
            ),
        ),
        ResolvedBlkioItem(None, None, (BlkioLimit("blkio_leaf_weight", 100),)),
    ]
    cfq = {"blkio.weight_device", "blkio.leaf_weight_device", "blkio.leaf_weight"}
    result = blkio_writes("v1", items, cfq)
    assert result.applied == [
        BlkioWrite("blkio.weight_device", "254:0 300"),
        BlkioWrite("blkio.leaf_weight_device", "254:0 200"),
        BlkioWrite("blkio.leaf_weight", "100"),
    ]
    [miss] = result.unapplied
    assert miss.type == "throttle_read_bps" and "CONFIG_BLK_DEV_THROTTLING" in miss.reason
    bfq_only = blkio_writes("v1", items, {"blkio.bfq.weight_device"} | V1_THROTTLE_FILES)
    assert bfq_only.applied[0] == BlkioWrite("blkio.bfq.weight_device", "254:0 300")
    assert bfq_only.applied[1] == BlkioWrite("blkio.throttle.read_bps_device", "254:0 0")
    assert [u.type for u in bfq_only.unapplied] == ["blkio_leaf_weight", "blkio_leaf_weight"]
    assert "only the CFQ I/O scheduler has leaf weights" in bfq_only.unapplied[0].reason


@pytest.mark.parametrize(
    ("existing", "weight_write"),
    [
        ({"io.max", "io.bfq.weight", "io.weight"}, BlkioWrite("io.bfq.weight", "default 78")),
        ({"io.max", "io.weight"}, BlkioWrite("io.weight", "default 15")),
    ],
)
def test_v2_lines(existing: set[str], weight_write: BlkioWrite) -> None:
    result = blkio_writes("v2", SEED_RESOLVED, existing)
    assert result.applied == [
        BlkioWrite("io.max", "254:0 rbps=400 wbps=400 riops=700 wiops=699"),
        weight_write,
    ]
    assert result.unapplied == []


def test_v2_zero_is_max_per_device_weight_and_no_leaf_weight() -> None:
    items = [
        ResolvedBlkioItem(
            "/dev/vda",
            VDA,
            (
                BlkioLimit("throttle_write_bps", 0),
                BlkioLimit("throttle_read_iops", 9),
                BlkioLimit("blkio_weight", 500),
                BlkioLimit("blkio_leaf_weight", 10),
            ),
        )
    ]
    result = blkio_writes("v2", items, {"io.max", "io.weight"})
    assert result.applied == [
        BlkioWrite("io.weight", "254:0 100"),
        BlkioWrite("io.max", "254:0 wbps=max riops=9"),
    ]
    assert [(u.type, u.reason) for u in result.unapplied] == [
        ("blkio_leaf_weight", "cgroup v2 has no leaf weight")
    ]
    nothing = blkio_writes("v2", items, set())
    assert nothing.applied == []
    assert [u.type for u in nothing.unapplied] == [
        "throttle_write_bps",
        "throttle_read_iops",
        "blkio_weight",
        "blkio_leaf_weight",
    ]
    assert "io controller is not enabled" in nothing.unapplied[0].reason


@pytest.mark.parametrize(("blkio", "io"), [(1, 1), (10, 2), (78, 15), (500, 100), (1000, 200)])
def test_v2_io_weight_keeps_the_ratio_to_the_default(blkio: int, io: int) -> None:
    assert v2_io_weight(blkio) == io


def test_schedulers_and_weight_warnings(tmp_path: Path) -> None:
    assert parse_scheduler("none [mq-deadline] kyber bfq\n") == "mq-deadline"
    assert parse_scheduler("[none] mq-deadline\n") == "none"
    for name, dev, sched in (("vda", "254:0", "none [mq-deadline] bfq"), ("sdb", "8:16", "[bfq]")):
        (tmp_path / "block" / name / "queue").mkdir(parents=True)
        (tmp_path / "block" / name / "dev").write_text(dev + "\n")
        (tmp_path / "block" / name / "queue" / "scheduler").write_text(sched + "\n")
    (tmp_path / "block" / "zram0").mkdir()  # no queue/scheduler: skipped
    schedulers = active_schedulers(str(tmp_path))
    assert schedulers == {"254:0": "mq-deadline", "8:16": "bfq"}
    assert active_schedulers(str(tmp_path / "missing")) == {}
    warnings = weight_warnings(
        [
            BlkioWrite("blkio.bfq.weight", "78"),  # sdb runs bfq: fine
            BlkioWrite("blkio.bfq.weight_device", "254:0 78"),  # vda does not
            BlkioWrite("blkio.weight", "78"),  # nobody runs cfq
            BlkioWrite("io.weight", "default 15"),  # iocost: no scheduler needed
            BlkioWrite("blkio.throttle.read_bps_device", "254:0 400"),
        ],
        schedulers,
    )
    assert warnings == [
        "blkio.bfq.weight_device '254:0 78' written, but device 254:0 uses the mq-deadline I/O "
        "scheduler, not bfq: the weight has no effect until it does",
        "blkio.weight '78' written, but no block device uses the cfq I/O scheduler "
        "(254:0=mq-deadline, 8:16=bfq): the weight has no effect until one does",
    ]
    planned = blkio_writes(
        "v1", SEED_RESOLVED, V1_THROTTLE_FILES | {"blkio.bfq.weight"}, {"254:0": "none"}
    )
    assert len(planned.warnings) == 1 and "no block device uses the bfq" in planned.warnings[0]
