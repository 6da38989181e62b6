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
