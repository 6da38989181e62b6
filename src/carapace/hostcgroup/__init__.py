"""Host cgroups of sandboxes: v1/v2 drivers, cgroupsPath parsing, block I/O limits."""

from .blkio import (
    BLKIO_CGROUP_ANNOTATION,
    BlkioItem,
    BlkioLimit,
    BlkioResult,
    BlkioWrite,
    Device,
    ResolvedBlkioItem,
    UnappliedLimit,
    parse_blkio_cgroup,
    resolve_devices,
)
from .cgroupspath import CgroupsPath, expand_slice, parse_cgroups_path
from .driver import (
    DEFAULT_ROOT,
    CgroupDriver,
    CgroupHandle,
    CgroupStats,
    detect,
    driver,
)
from .files import Version
from .fs import CgroupFs
from .v1 import CgroupV1
from .v2 import CgroupV2

__all__ = [
    "BLKIO_CGROUP_ANNOTATION",
    "DEFAULT_ROOT",
    "BlkioItem",
    "BlkioLimit",
    "BlkioResult",
    "BlkioWrite",
    "CgroupDriver",
    "CgroupFs",
    "CgroupHandle",
    "CgroupStats",
    "CgroupV1",
    "CgroupV2",
    "CgroupsPath",
    "Device",
    "ResolvedBlkioItem",
    "UnappliedLimit",
    "Version",
    "detect",
    "driver",
    "expand_slice",
    "parse_blkio_cgroup",
    "parse_cgroups_path",
    "resolve_devices",
]
