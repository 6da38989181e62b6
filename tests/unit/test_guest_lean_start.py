"""What keeps the agent's start lean: modules /init defers until first used
(carapace.guest.defer_imports) and the network verbs' code imported at their first call
(carapace.guest.server.LazyNetwork)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from carapace.guest import DEFERRED_IMPORTS, defer_imports
from carapace.guest.netlink import NetlinkError
from carapace.guest.server import Agent, LazyNetwork, expected_code, guard
from carapace.image.builder import INIT_SCRIPT
from carapace.protocols import agent_pb2 as pb
from carapace.ttrpc import Code, TtrpcError

PKG = "lazyprobe"


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    """A directory on sys.path with a package ``lazyprobe`` whose modules record when
    their code runs (in ``lazyprobe.ran``)."""
    pkg = tmp_path / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("ran: list[str] = []\n")
    (pkg / "plain.py").write_text(
        textwrap.dedent(
            f"""
            import {PKG}
            {PKG}.ran.append(__name__)
            VALUE = 42
            def twice(x):
                return VALUE * x
            """
        )
    )
    (pkg / "broken.py").write_text(f"import {PKG}\n{PKG}.ran.append(__name__)\n1 / 0\n")
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text(f"import {PKG}\n{PKG}.ran.append(__name__)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == PKG or n.startswith(PKG + ".")]:
            del sys.modules[name]


def ran() -> list[str]:
    return list(sys.modules[PKG].ran)


def test_a_deferred_module_runs_at_the_first_read_of_its_attributes(modules: Path) -> None:
    assert defer_imports((f"{PKG}.plain",)) == [f"{PKG}.plain"]
    import lazyprobe.plain as plain  # type: ignore[import-not-found]
    from lazyprobe import plain as same  # type: ignore[import-not-found]

    assert same is plain
    assert ran() == []  # the import statements ran nothing
    assert plain.twice(2) == 84
    assert ran() == [f"{PKG}.plain"]
    assert type(plain).__name__ == "module"  # it is the module now
    assert plain.VALUE == 42
    assert ran() == [f"{PKG}.plain"]  # once
    assert plain.__file__ == str(modules / PKG / "plain.py")


def test_a_from_import_of_a_name_loads_the_module(modules: Path) -> None:
    defer_imports((f"{PKG}.plain",))
    from lazyprobe.plain import VALUE  # type: ignore[import-not-found]

    assert VALUE == 42
    assert ran() == [f"{PKG}.plain"]


def test_a_missing_attribute_is_an_attribute_error_after_loading(modules: Path) -> None:
    defer_imports((f"{PKG}.plain",))
    import lazyprobe.plain as plain

    with pytest.raises(AttributeError):
        _ = plain.nothing_here
    assert ran() == [f"{PKG}.plain"]


def test_packages_missing_and_already_imported_modules_are_left_alone(modules: Path) -> None:
    import lazyprobe.plain  # noqa: F401  (imported for real first)

    names = (f"{PKG}.plain", f"{PKG}.sub", f"{PKG}.nowhere", "json")
    assert defer_imports(names) == []
    assert ran() == [f"{PKG}.plain"]
    assert f"{PKG}.sub" not in sys.modules
    assert f"{PKG}.nowhere" not in sys.modules


def test_a_module_that_fails_to_load_raises_and_is_forgotten(modules: Path) -> None:
    defer_imports((f"{PKG}.broken",))
    import lazyprobe.broken as broken  # type: ignore[import-not-found]

    with pytest.raises(ZeroDivisionError):
        _ = broken.anything
    assert f"{PKG}.broken" not in sys.modules


def test_the_agent_imports_without_the_deferred_modules_and_they_still_work() -> None:
    """In a fresh interpreter set up as /init does: importing the agent leaves every
    deferred module unloaded; using one then works."""
    code = textwrap.dedent(
        """
        import sys
        from carapace.guest import DEFERRED_IMPORTS, defer_imports
        assert defer_imports() == list(DEFERRED_IMPORTS), defer_imports()
        import carapace.guest.agent
        loaded = [n for n in DEFERRED_IMPORTS if type(sys.modules[n]).__name__ == "module"]
        assert loaded == [], loaded
        import linecache, textwrap
        assert linecache.getline(carapace.guest.agent.__file__, 1)
        assert textwrap.indent("a", "> ") == "> a"
        from carapace.protocols import agent_pb2 as pb
        r = pb.CreateSandboxRequest(sandbox_id="x")
        assert pb.CreateSandboxRequest.FromString(r.SerializeToString()).sandbox_id == "x"
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_init_defers_the_modules_before_it_imports_the_agent() -> None:
    lines = INIT_SCRIPT.splitlines()
    assert lines.index("defer_imports()") < lines.index("from carapace.guest.agent import main")
    assert "google.protobuf.internal.python_message" in DEFERRED_IMPORTS


# -- the network verbs, imported at first use ---------------------------------------------


def test_the_network_service_is_made_at_the_first_network_verb() -> None:
    network = LazyNetwork()
    verb = network.verb("list_interfaces")
    assert verb.__name__ == "list_interfaces"
    assert network._service is None
    service = network.service()
    assert network.service() is service  # one service for every verb


def test_a_netlink_error_is_expected_and_answered_internal() -> None:
    assert expected_code(NetlinkError("add address", 17)) == Code.INTERNAL
    assert expected_code(RuntimeError("bug")) is None

    async def refused(req: pb.ListRoutesRequest) -> pb.Routes:
        raise NetlinkError("dump routes", 1)

    with pytest.raises(TtrpcError) as e:
        asyncio.run(guard("ListRoutes", refused)(pb.ListRoutesRequest()))
    assert e.value.code == Code.INTERNAL
    assert e.value.message.startswith("dump routes: Operation not permitted")


def test_a_network_verb_of_the_agent_reaches_the_network_service() -> None:
    agent = Agent()
    handlers = {name: h for name, _, h in agent.methods}
    # a malformed MAC is refused before any netlink request: no root needed
    req = pb.UpdateInterfaceRequest(interface=pb.Interface(mac="not-a-mac"))
    with pytest.raises(Exception, match="not a MAC address"):
        asyncio.run(handlers["UpdateInterface"](req))


# -- the boot benchmark's reading of the guest's timeline ---------------------------------


def boot_benchmark() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "boot.py"
    spec = importlib.util.spec_from_file_location("boot_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


CONSOLE = (
    '{"msg": "guest up: /init at 2.25s after boot, agent imported at 3.12s, early init '
    'done at 3.53s"}\n'
    '{"msg": "agent port /dev/vport0p1 opened at 3.74s after boot"}\n'
)


def test_the_benchmark_reads_each_step_of_the_guest_timeline() -> None:
    boot = boot_benchmark()
    assert boot.guest_timeline(CONSOLE) == {
        "/init started": 2.25,
        "agent imported": 3.12,
        "early init done": 3.53,
        "agent port opened": 3.74,
    }
    # an agent that prints no port line: the other steps still
    assert list(boot.guest_timeline(CONSOLE.splitlines()[0])) == list(boot.GUEST_STEPS)
    assert boot.guest_timeline("no agent here") == {}


def test_timeline_medians_keep_steps_some_boots_lack() -> None:
    boot = boot_benchmark()
    medians = boot.timeline_medians([{"a": 1.0}, {"a": 3.0, "b": 5.0}, {"a": 2.0, "b": 7.0}])
    assert medians == {"a": 2.0, "b": 6.0}
