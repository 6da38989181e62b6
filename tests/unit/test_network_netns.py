"""carapace.network.netns: the checks of a namespace's path that need no root (running
inside a namespace is tested in tests/integration/test_network_host.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from carapace.errors import InvalidArgument, NotFound
from carapace.network.netns import NotNetworkNamespace, check_netns


def test_the_host_network_namespace_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="/proc/self/ns/net is the host's own"):
        check_netns("/proc/self/ns/net")


def test_what_is_not_a_network_namespace_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "gone"  # what /var/run/netns/NAME is once its namespace is unmounted
    empty.touch()
    with pytest.raises(NotNetworkNamespace, match=f"{empty} is not a namespace"):
        check_netns(str(empty))
    with pytest.raises(NotNetworkNamespace, match="not a network namespace"):
        check_netns("/proc/self/ns/uts")
    with pytest.raises(NotFound, match="/var/run/netns/carapace-no-such"):
        check_netns("/var/run/netns/carapace-no-such")
