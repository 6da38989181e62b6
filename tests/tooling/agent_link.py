"""A host agent client connected to a fake agent's ttrpc server over a unix socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from carapace.agent.client import AgentClient
from carapace.ttrpc import Server


@asynccontextmanager
async def client_of(server: Server, tmp_path: Path) -> AsyncIterator[AgentClient]:
    """Serve ``server`` on a socket in ``tmp_path`` and connect an AgentClient to it;
    both are closed on the way out."""
    sock = str(tmp_path / "agent.sock")
    await server.serve_unix(sock)
    client = await AgentClient.connect(sock)
    try:
        yield client
    finally:
        await client.close()
        await server.close()
