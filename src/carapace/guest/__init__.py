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


#: Modules the agent's imports pull in but the boot path never uses: protobuf's
#: pure-Python backend (with its text format, decoders and containers), which the upb
#: backend never calls; what traceback uses to print a traceback (linecache with
#: tokenize, textwrap); locale (subprocess's text mode) and calendar (protobuf's
#: Timestamp helpers). /init defers them (``defer_imports``): each is loaded the first
#: time something reads one of its attributes, if ever. (Not inspect: asyncio's
#: add_signal_handler calls it when the reaper starts.)
DEFERRED_IMPORTS: tuple[str, ...] = (
    "google.protobuf.internal.python_message",
    "linecache",
    "textwrap",
    "locale",
    "calendar",
)


def defer_imports(names: tuple[str, ...] = DEFERRED_IMPORTS) -> list[str]:
    """Put a stand-in for each module of ``names`` into ``sys.modules``: ``import``
    statements get it at no cost, and the first read of an attribute it lacks runs the
    module's code in it (it then is the module). Only plain modules (not packages) not
    imported yet; the others are left alone. Returns the names deferred.

    (Not the stdlib's ``importlib.util.LazyLoader``: its module loads at the first read
    of any attribute, not only of one it lacks; tried, linecache, textwrap, locale and
    calendar were all loaded again by the time the agent was imported.)"""
    import sys
    import threading
    import types
    from importlib.machinery import PathFinder

    lock = threading.RLock()

    class Deferred(types.ModuleType):
        def __getattr__(self, attr: str) -> object:
            with lock:
                if type(self) is Deferred:
                    self.__class__ = types.ModuleType  # type: ignore[assignment]
                    try:
                        self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
                    except BaseException:
                        sys.modules.pop(self.__name__, None)
                        raise
            return object.__getattribute__(self, attr)

    deferred: list[str] = []
    for name in names:
        if name in sys.modules:
            continue
        parent, _, child = name.rpartition(".")
        path = None
        if parent:
            __import__(parent)
            path = getattr(sys.modules[parent], "__path__", None)
            if path is None:
                continue
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or spec.submodule_search_locations is not None:
            continue
        module = Deferred(name)
        module.__spec__ = spec
        module.__loader__ = spec.loader
        module.__package__ = parent
        if spec.has_location:
            module.__file__ = spec.origin
        sys.modules[name] = module
        if parent:
            setattr(sys.modules[parent], child, module)
        deferred.append(name)
    return deferred
