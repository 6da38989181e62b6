"""Everything that runs inside the pod VM: the agent (PID 1) and what it uses.

Stdlib only here: the image builder and the boundary test read ``SHIPPED`` on the host.
"""

from __future__ import annotations

#: The parts of the carapace package that go into the guest image, as paths relative to
#: the carapace package directory; one ending in "/" is a package with every module
#: under it. The image builder ships exactly these, and the boundary test
#: (tests/unit/test_guest_imports.py) lets guest code import only these, the stdlib
#: and protobuf.
SHIPPED: tuple[str, ...] = (
    "__init__.py",
    "errors.py",
    "linux.py",
    "guest/",
    "ttrpc/",
    "protocols/",
)

#: Where the image lists the kernel modules the agent loads, one path a line in load
#: order: ``carapace.load`` at start, ``carapace.<group>.load`` the first time the group
#: is needed (``sysinit.need_modules``: a filesystem mounted, the network configured).
MODULE_LIST_DIR = "/lib/modules"


#: The kernel parameter that makes the agent load every on-demand group at start (a VM
#: template: the pods restored from it find the modules loaded).
ALL_MODULES_PARAM = "carapace.modules=all"


def module_list(group: str = "") -> str:
    """The module list of ``group`` ("" for the modules loaded at start)."""
    return f"{MODULE_LIST_DIR}/carapace{'.' + group if group else ''}.load"


#: The first line of ``crun --version`` of the image's crun, written when the image is
#: built: GetGuestDetails answers it without running crun.
CRUN_VERSION_FILE = "/usr/share/carapace/crun.version"
